"""Prior noise injection (paper §3.3): late in sampling, add a little of the run's initial noise back.

Paper (VP latents): z_t <- z_t + alpha * z_T for every step with model timestep t < threshold
(alpha 0.003, threshold 500).  In k-diffusion sigma space (x = x0 + sigma * eps, VP latent
z = x / sqrt(1 + sigma^2)) the same change is  x <- x + alpha * sqrt(1 + sigma^2) * z_T,
with z_T the unit-variance noise the run started from.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from .schedule import match_step

DEFAULT_ALPHA = 0.003
DEFAULT_THRESHOLD = 500.0


def injection_steps(timesteps: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> list[int]:
    """Steps (indices into the run's schedule, the final sigma excluded) whose model timestep is below
    ``threshold``: DDIM-50 gives steps 25-49, a 20-step schedule its last 10 or so."""
    return [i for i, t in enumerate(timesteps[:-1]) if t < threshold]


def injection_scale(alpha: float, sigma: float) -> float:
    """The multiple of z_T added to the sigma-space latent at ``sigma``."""
    return alpha * math.sqrt(1.0 + sigma * sigma)


class Injector:
    """One run's injection, applied after the model call of each injected step, in the sampler's own
    latent ``x`` (before its update: the paper's parallel pipeline).

    ``denoised_shift(sigma, dx)``: how the host's denoised prediction moves when the model input moves
    by ``dx`` with the model output held (``dx`` for eps models; ComfyUI's
    ``model_sampling.calculate_denoised(sigma, 0, dx)`` in general)."""

    def __init__(self, sigmas: Sequence[float], timesteps: Sequence[float], z_T, alpha: float,
                 threshold: float, denoised_shift: Callable):
        self.sigmas, self.alpha, self.z_T, self.denoised_shift = list(sigmas), alpha, z_T, denoised_shift
        self.steps = injection_steps(timesteps, threshold)
        self.done: set[int] = set()

    def after_call(self, x, sigma, denoised):
        """``sigma``: the call's per-row sigma tensor; returns the prediction for the injected latent."""
        step = match_step(self.sigmas, float(sigma.flatten()[0]))
        if step is None or step in self.done or step not in self.steps:
            return denoised
        self.done.add(step)
        inj = self.z_T.to(x) * injection_scale(self.alpha, self.sigmas[step])
        x.add_(inj)
        return denoised + self.denoised_shift(sigma, inj)
