"""Locate a model evaluation on the sampler's schedule."""
from __future__ import annotations

import math
from typing import Sequence


def match_step(schedule: Sequence[float], sigma: float, rel_tol: float = 1e-4) -> int | None:
    """Index ``i`` with ``schedule[i] == sigma`` (to ``rel_tol``), or None for an off-schedule sigma.

    ``schedule`` is the run's sigma list (steps + 1 entries, last usually 0).  Samplers that evaluate
    between schedule points (DPM2, DPM++ 2S, the SDE midpoints) give None here; Heun's corrector
    evaluates at sigma[i+1] and so maps to step i+1.  The last entry is never a model step.
    """
    for i, s in enumerate(schedule[:-1]):
        if math.isclose(s, sigma, rel_tol=rel_tol, abs_tol=1e-9):
            return i
    return None
