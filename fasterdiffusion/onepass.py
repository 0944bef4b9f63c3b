"""TiUE one-pass sampling (Li et al., "One-Way Ticket", arXiv 2505.21960): no sampling loop.

The encoder (E+B) runs **once**, on the initial noise z_K at the first of K DDIM timesteps; the K
decoders run on those features in one batched call (each row with its own timestep; split under a row
cap, which is exact because rows are independent); and DDIM with eta = 0 is a fixed linear map of the K
outputs, so the final latent is one weighted sum:

    z_0 = S * z_K + sum_i E_i * out_i

with S and E_i depending only on the schedule (``ddim_coefficients``).  For an epsilon-prediction model
this is the paper's closed form; for a v-prediction model the same derivation gives other coefficients
(x0 and eps are both linear in (z_t, v)), so v-models are served exactly too.

Everything goes through the ``UNetAdapter`` protocol of ``runtime`` (embed / encode / decode / tile), so
one function serves every host the engine serves.  Reimplemented from the paper and the method notes;
no code of the official (CC BY-NC) implementation is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .runtime import ModelCall, UNetAdapter, decode_steps

PREDICTIONS = ("eps", "v")
MAX_K = 100          # the most K a host offers: a one-pass student is distilled for a few steps (TiUE: 4)


class OnePassError(ValueError):
    """A request the one-pass sampler cannot serve (bad K, bad schedule, unknown parametrisation)."""


def ddim_timesteps(k: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """The K DDIM timesteps, first (noisiest) first: diffusers' "leading" spacing with ``steps_offset``
    (SD's scheduler configuration), the rule TiUE uses.  K = 4 gives [751, 501, 251, 1]."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise OnePassError(f"one-pass sampling needs K >= 1 DDIM steps, got {k!r}")
    ratio = num_train_timesteps // k
    ts = [i * ratio + steps_offset for i in range(k)][::-1]
    if ratio < 1 or ts[0] >= num_train_timesteps:
        raise OnePassError(f"K = {k} is too many DDIM steps for {num_train_timesteps} train timesteps "
                           f"(timestep {ts[0]} is out of range)")
    return ts


def ddim_coefficients(alphas: Sequence[float], final_alpha: float, prediction: str = "eps"):
    """(S, [E_1..E_K]) of the loop-free DDIM (eta 0): z_final = S * z_K + sum_i E_i * out_i.

    ``alphas``: alpha-bar at each of the K timesteps (noisiest first); ``final_alpha``: alpha-bar the last
    update lands on (diffusers with set_alpha_to_one=False: alpha-bar of timestep 0, as in SD);
    ``prediction``: what the decoder outputs, "eps" or "v".  One DDIM update is
        z' = a_i * z + b_i * out_i
      eps: a = sqrt(ab'/ab),                 b = sqrt(1 - ab') - sqrt(ab') * sqrt(1 - ab) / sqrt(ab)
      v:   a = sqrt(ab' ab) + sqrt((1-ab')(1-ab)),  b = sqrt((1-ab') ab) - sqrt(ab' (1-ab))
    and the K updates compose to S = prod a_i, E_i = b_i * prod_{j>i} a_j (computed in float64).
    """
    if prediction not in PREDICTIONS:
        raise OnePassError(f"one-pass sampling serves eps- and v-prediction models, not {prediction!r}")
    chain = [float(a) for a in alphas] + [float(final_alpha)]
    if len(chain) < 2:
        raise OnePassError("one-pass sampling needs at least one timestep")
    if not all(0.0 < a <= 1.0 for a in chain):
        raise OnePassError(f"alpha-bar values must lie in (0, 1], got {chain}")
    a_list, b_list = [], []
    for ab, ab_next in zip(chain[:-1], chain[1:]):
        s, s_next = math.sqrt(1.0 - ab), math.sqrt(1.0 - ab_next)
        r, r_next = math.sqrt(ab), math.sqrt(ab_next)
        if prediction == "eps":
            a_list.append(r_next / r)
            b_list.append(s_next - r_next * s / r)
        else:
            a_list.append(r_next * r + s_next * s)
            b_list.append(s_next * r - r_next * s)
    e = []
    for i, b in enumerate(b_list):
        tail = 1.0
        for a in a_list[i + 1:]:
            tail *= a
        e.append(b * tail)
    return math.prod(a_list), e


def ddim_step(z, out, alpha, alpha_next, prediction="eps"):
    """One sequential DDIM (eta 0) update from alpha-bar ``alpha`` to ``alpha_next`` (the reference the
    closed form must equal; also what a host without a closed form would do)."""
    r, s = math.sqrt(alpha), math.sqrt(1.0 - alpha)
    if prediction == "eps":
        eps = out
        x0 = (z - s * eps) / r
    elif prediction == "v":
        x0 = r * z - s * out
        eps = s * z + r * out
    else:
        raise OnePassError(f"unknown prediction {prediction!r}")
    return math.sqrt(alpha_next) * x0 + math.sqrt(1.0 - alpha_next) * eps


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def combine(z_k: torch.Tensor, outputs: Sequence[torch.Tensor], s: float, e: Sequence[float]) -> torch.Tensor:
    """S * z_K + sum_i E_i * out_i, accumulated in float32 (or wider) whatever the model's dtype."""
    acc = accumulation_dtype(z_k)
    z = z_k.to(acc) * s
    for coef, out in zip(e, outputs):
        z = z + coef * out.to(acc)
    return z


@dataclass
class OnePassResult:
    latent: torch.Tensor              # z_0, in the model's input space, float32
    outputs: list                     # the K decoder outputs (eps or v), [B, C, H, W] each, first step first
    timesteps: list                   # the K timesteps
    coefficients: tuple               # (S, [E_i])
    decoder_batches: list             # steps per batched decoder call


def alphas_at(alphas_cumprod, timesteps) -> list[float]:
    table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    for t in timesteps:
        if not 0 <= int(t) < table.numel():
            raise OnePassError(f"timestep {t} is outside the schedule's {table.numel()} timesteps")
    return [float(table[int(t)]) for t in timesteps]


def one_pass(adapter: UNetAdapter, call: ModelCall, timesteps: Sequence[int], alphas_cumprod,
             final_alpha_cumprod: float, max_decoder_batch: int = 32, prediction: str = "eps",
             sigmas: Sequence[float] | None = None) -> OnePassResult:
    """Loop-free K-step DDIM through ``adapter``.

    ``call``: the model call of the first step: ``call.x`` is z_K (the initial noise, in the model's input
    space), ``call.timesteps`` the first timestep per row (it is checked against ``timesteps[0]``),
    ``call.context``/``call.host`` the conditioning.  ``timesteps``: the K DDIM timesteps, noisiest first
    (``ddim_timesteps``); ``alphas_cumprod``: the schedule's alpha-bar per train timestep;
    ``final_alpha_cumprod``: where the last update lands; ``max_decoder_batch``: most rows in one decoder call
    (0 = no cap; the K steps are split into several calls with identical results); ``sigmas``: the host's
    sigma for each timestep, or None for hosts that do not track them.
    """
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise OnePassError("one-pass sampling needs at least one timestep")
    if call.x is None:
        raise OnePassError("one-pass sampling needs the initial noise in call.x")
    if not torch.all(call.timesteps.double().round() == timesteps[0]):
        raise OnePassError(f"the call's timesteps {call.timesteps.tolist()} are not the first DDIM timestep "
                           f"{timesteps[0]}")
    if sigmas is not None and len(sigmas) != len(timesteps):
        raise OnePassError("one sigma per timestep, please")
    s, e = ddim_coefficients(alphas_at(alphas_cumprod, timesteps), final_alpha_cumprod, prediction)
    emb = adapter.embed(call)
    feats = adapter.encode(call, emb)
    rows = []
    for i, t in enumerate(timesteps):
        ts = call.timesteps if i == 0 else torch.full_like(call.timesteps, float(t))
        sig = None
        if call.sigmas is not None and sigmas is not None:
            sig = call.sigmas if i == 0 else torch.full_like(call.sigmas, float(sigmas[i]))
        rows.append((ts, sig))
    outs, widths = decode_steps(adapter, call, feats, rows, max_decoder_batch)
    return OnePassResult(combine(latent_part(call.x, outs[0]), outs, s, e), list(outs), timesteps, (s, e), widths)


def latent_part(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The latent channels of a UNet input: all of it, or the first ones where conditioning channels were
    concatenated after the latent (inpainting models' mask + masked image, as ComfyUI and diffusers do)."""
    return x if x.shape[1] == out.shape[1] else x[:, :out.shape[1]]


def sequential(adapter: UNetAdapter, call: ModelCall, timesteps: Sequence[int], alphas_cumprod,
               final_alpha_cumprod: float, prediction: str = "eps", sigmas: Sequence[float] | None = None):
    """The reference ``one_pass`` must equal: the same frozen encoder features, the K decoders one call
    at a time, and K sequential DDIM updates.  Returns (z_0, the K outputs)."""
    timesteps = [int(t) for t in timesteps]
    alphas = alphas_at(alphas_cumprod, timesteps) + [float(final_alpha_cumprod)]
    feats = adapter.encode(call, adapter.embed(call))
    z, outs = None, []
    for i, t in enumerate(timesteps):
        ts = call.timesteps if i == 0 else torch.full_like(call.timesteps, float(t))
        sig = None
        if call.sigmas is not None and sigmas is not None:
            sig = call.sigmas if i == 0 else torch.full_like(call.sigmas, float(sigmas[i]))
        one = adapter.tile(call, 1, ts, sig)
        out = adapter.decode(one, feats, adapter.embed(one))
        outs.append(out)
        z = latent_part(call.x, out).to(accumulation_dtype(call.x)) if z is None else z
        z = ddim_step(z, out.to(z.dtype), alphas[i], alphas[i + 1], prediction)
    return z, outs
