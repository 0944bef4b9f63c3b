"""Forecast propagation: at a non-key step, extrapolate the encoder features from the last key steps
instead of reusing the last one's (the paper's ``reuse``).

With the key steps k_0 < ... < k_m <= s of one call slot (m = order, fewer where fewer keys lie behind)
and a variable u (the step index by default), the features at step s are the Lagrange polynomial through
them, written around the newest key so that equal key features give exactly the reused ones:

    f(s) = f(k_m) + damping * sum_{j<m} L_j(u_s) * (f(k_j) - f(k_m))

Order 1 is ``f(k) + (s - k) / (k - k') * (f(k) - f(k'))``.  Only key-step features enter, never a
non-key latent, so a group's decoders still run as one batch.  Pure functions on torch tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROPAGATIONS = ("forecast", "reuse")
DEFAULT_PROPAGATION = "forecast"      # what every surface (nodes, A1111/Forge, diffusers) defaults to
VARIABLES = ("step", "timestep", "log_sigma")
PARTS = ("both", "skips", "mid")


@dataclass(frozen=True)
class Forecast:
    """How features are forecast.  ``order`` 0 is reuse; ``variable`` is what the polynomial runs in
    (the step index, the model timestep, or log sigma); ``damping`` scales the extrapolated change (1 =
    the full polynomial, 0 = reuse); ``parts`` which features are forecast (the others are reused);
    ``clamp`` holds the forecast at ``clamp`` key spacings past the newest key (the last two keys' spacing),
    so a long group does not extrapolate far beyond what its keys span."""
    order: int = 1
    variable: str = "step"
    damping: float = 1.0
    parts: str = "both"
    clamp: float | None = None      # extrapolate at most this many key spacings past the newest key (None: no limit)

    def __post_init__(self):
        if not isinstance(self.order, int) or not 0 <= self.order <= 3:
            raise ValueError(f"FasterDiffusion: forecast order must be 0, 1, 2 or 3, not {self.order!r}")
        if self.variable not in VARIABLES:
            raise ValueError(f"FasterDiffusion: forecast variable must be one of {VARIABLES}, not {self.variable!r}")
        if self.parts not in PARTS:
            raise ValueError(f"FasterDiffusion: forecast parts must be one of {PARTS}, not {self.parts!r}")


REUSE = Forecast(order=0)
# no further than one key spacing past the newest key: uniform plans never reach it; long groups after short
# spacings (the paper's keys) stop there (docs/quality/forecast_digits_clamp.md)
DEFAULT_CLAMP = 1.0


def forecast_settings(propagation) -> Forecast:
    """The ``Forecast`` a user-facing ``propagation`` name stands for (a ``Forecast`` stands for itself)."""
    if isinstance(propagation, Forecast):
        return propagation
    if propagation not in PROPAGATIONS:
        raise ValueError(f"FasterDiffusion: propagation must be one of {', '.join(PROPAGATIONS)}, not {propagation!r}")
    return REUSE if propagation == "reuse" else Forecast(order=1, clamp=DEFAULT_CLAMP)


def weights(us: list[float], u: float) -> list[float]:
    """Lagrange weights L_j(u) of the older points ``us[:-1]`` (the newest, ``us[-1]``, is the anchor)."""
    out = []
    for j, uj in enumerate(us[:-1]):
        w = 1.0
        for i, ui in enumerate(us):
            if i != j:
                w *= (u - ui) / (uj - ui)
        out.append(w)
    return out


def variable_of(f: Forecast, step: int, timesteps, sigmas) -> float:
    """The value of the forecast variable at schedule ``step``."""
    if f.variable == "step":
        return float(step)
    if f.variable == "timestep":
        return float(timesteps[step])
    return math.log(max(float(sigmas[step]), 1e-6))        # the last sigma is often 0: clamp


def extrapolate(f: Forecast, history: list, step: int, timesteps=None, sigmas=None):
    """The features at ``step`` from ``history`` = [(key step, Features)], oldest first (this slot's
    last key steps): the newest alone where the forecast has nothing to add."""
    return extrapolate_steps(f, history, [step], timesteps, sigmas)


def extrapolate_steps(f: Forecast, history: list, steps: list, timesteps=None, sigmas=None):
    """``extrapolate`` for each of ``steps``, stacked step-major on the batch dim (what one batched decoder
    call of those steps needs); the differences to the newest key are taken once for all of them."""
    newest = history[-1][1]
    keys = None if f.order == 0 else _keys_used(f, history, timesteps, sigmas)
    if keys is None:
        return newest.tile(len(steps))
    used, us = keys
    ws = [[0.0] * (len(used) - 1) if s == used[-1][0] else _weights_at(f, us, variable_of(f, s, timesteps, sigmas))
          for s in steps]
    if not any(any(w) for w in ws):
        return newest.tile(len(steps))
    olds = [feats for _, feats in used[:-1]]

    def combine(get):
        anchor = get(newest)
        if len(steps) == 1:
            out = anchor
            for w, old in zip(ws[0], olds):
                out = out + w * (get(old) - anchor)
            return out
        out = anchor.unsqueeze(0)
        for j, old in enumerate(olds):
            w = torch.tensor([row[j] for row in ws], dtype=anchor.dtype, device=anchor.device)
            out = out + w.view(-1, *[1] * anchor.dim()) * (get(old) - anchor).unsqueeze(0)
        return out.reshape(len(steps) * anchor.shape[0], *anchor.shape[1:])

    tiled = newest.tile(len(steps)) if f.parts != "both" else None
    skips = ([combine(lambda x, i=i: x.skips[i]) for i in range(len(newest.skips))]
             if f.parts in ("both", "skips") else tiled.skips)
    mid = combine(lambda x: x.mid) if f.parts in ("both", "mid") else tiled.mid
    return type(newest)(skips, mid, newest.meta)


def _keys_used(f: Forecast, history: list, timesteps, sigmas):
    """(the keys a forecast fits, their values of the variable), or None where it has nothing to add."""
    used = history[-(f.order + 1):]
    # only keys whose features have the newest's shapes (a patch such as deep shrink changes them over the run)
    shapes = _shapes(history[-1][1])
    while len(used) > 1 and _shapes(used[0][1]) != shapes:
        used = used[1:]
    if len(used) < 2 or f.damping == 0:
        return None
    us = [variable_of(f, k, timesteps, sigmas) for k, _ in used]
    if len(set(us)) < len(us):              # two keys at one value of the variable: nothing to fit
        return None
    return used, us


def _weights_at(f: Forecast, us: list, u: float) -> list:
    """The damped Lagrange weights of the older keys at ``u`` (held at ``clamp`` key spacings past the newest)."""
    if f.clamp is not None:
        spacing = us[-1] - us[-2]
        u = min(u, us[-1] + f.clamp * spacing) if spacing > 0 else max(u, us[-1] + f.clamp * spacing)
    return [f.damping * w for w in weights(us, u)]


def _shapes(feats) -> tuple:
    return tuple(tuple(t.shape) for t in feats.skips) + (tuple(feats.mid.shape),)
