"""Prior noise injection (paper §3.3): late in sampling, add a little of the run's initial noise back.

Paper (VP latents): z_t <- z_t + alpha * z_T for every step with model timestep t < threshold
(alpha 0.003, threshold 500).  In k-diffusion sigma space (x = x0 + sigma * eps, VP latent
z = x / sqrt(1 + sigma^2)) the same change is  x <- x + alpha * sqrt(1 + sigma^2) * z_T,
with z_T the unit-variance noise the run started from.
"""
from __future__ import annotations

import math
from typing import Sequence

DEFAULT_ALPHA = 0.003
DEFAULT_THRESHOLD = 500.0


def injection_steps(timesteps: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> list[int]:
    """Steps (indices into the run's schedule, the final sigma excluded) whose model timestep is below
    ``threshold``: DDIM-50 gives steps 25-49, a 20-step schedule its last 10 or so."""
    return [i for i, t in enumerate(timesteps[:-1]) if t < threshold]


def injection_scale(alpha: float, sigma: float) -> float:
    """The multiple of z_T added to the sigma-space latent at ``sigma``."""
    return alpha * math.sqrt(1.0 + sigma * sigma)
