"""Calibration measurements: how far the encoder features move between steps of one full run.

A host runs every on-schedule call through its adapter's split (identical to its forward), hands the
features to ``DriftRecorder.record``, and ``drift()`` gives the matrix ``fasterdiffusion.calibrate``
chooses key steps from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .runtime import Features

POOL = 16   # features are average-pooled to at most 16x16 per channel: enough to see drift, small to keep


def pool(t: torch.Tensor) -> torch.Tensor:
    h, w = t.shape[-2:]
    if h > POOL or w > POOL:
        t = F.adaptive_avg_pool2d(t, (min(h, POOL), min(w, POOL)))
    return t.detach().float().cpu()


def feature_drift(per_step: list[list[torch.Tensor]]) -> list[list[float]]:
    """drift[a][j] (a < j): mean over feature tensors of |f_j - f_a|^2 / |f_j|^2; 0 on and below the
    diagonal.  ``per_step[i]`` is the list of (pooled) feature tensors of step i."""
    n = len(per_step)
    out = [[0.0] * n for _ in range(n)]
    for j in range(n):
        norms = [float((t ** 2).sum()) + 1e-12 for t in per_step[j]]
        for a in range(j):
            out[a][j] = sum(float(((fj - fa) ** 2).sum()) / nj
                            for fj, fa, nj in zip(per_step[j], per_step[a], norms)) / len(norms)
    return out


class DriftRecorder:
    """Pooled encoder features per step and cond chunk of one full run."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.steps: dict[int, dict[tuple, list[torch.Tensor]]] = {}
        self.encoder_share = None     # encoder+middle share of the UNet's FLOPs, set by measure_share

    def record(self, step: int, chunk: tuple, feats: Features):
        # cond and uncond may come in separate calls; a second call of the same chunk at the same step (a
        # Heun-type corrector lands on the next step first) is replaced by the later one
        self.steps.setdefault(step, {})[chunk] = [pool(t) for t in feats.skips + [feats.mid]]

    def drift(self) -> list[list[float]]:
        missing = [i for i in range(self.num_steps) if i not in self.steps]
        if missing:
            raise RuntimeError(f"calibration saw no model call at steps {missing}: the sampler skipped them")
        return feature_drift([[torch.cat(parts) for parts in zip(*(self.steps[i][c] for c in sorted(self.steps[i])))]
                              for i in range(self.num_steps)])

    def forward(self, adapter, call, step: int, chunk: tuple):
        """The split UNet's output for an on-schedule call, recording its features (and, on the first
        call, the encoder's FLOP share)."""
        emb = adapter.embed(call)
        if self.encoder_share is not None:
            feats = adapter.encode(call, emb)
            self.record(step, chunk, feats)
            return adapter.decode(call, feats, emb)
        with FlopCounterMode(display=False) as enc:
            feats = adapter.encode(call, emb)
        self.record(step, chunk, feats)
        with FlopCounterMode(display=False) as dec:
            out = adapter.decode(call, feats, emb)
        total = enc.get_total_flops() + dec.get_total_flops()
        self.encoder_share = enc.get_total_flops() / total if total else 0.31
        return out
