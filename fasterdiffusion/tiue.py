"""TiUE distillation pieces (arXiv 2505.21960 §3, SwiftBrush-style variational score distillation), host-free.

The trainer (``tools/train_tiue.py``) alternates two updates:
  * student: one-pass sample x0 (``onepass.one_pass``) -> noise it to a random t -> the frozen teacher's and
    the online "fake score" model's noise predictions (both with CFG) -> ``vsd_loss`` + ``kl_loss`` on the
    K*B noise maps the student's decoders predicted;
  * fake score: ``denoising_loss`` on the detached student samples (it learns the student's distribution).
Also here: the metadata that marks a saved UNet as a TiUE student, and the weights fingerprint by which a
host recognises one after its own loader dropped that metadata.
Reimplemented from the paper and the method notes; no code of the official (CC BY-NC) trainer is used.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

METADATA_KEY = "fasterdiffusion.tiue"
METADATA_FORMAT = 1
# small tensors every ldm-layout UNet has (input conv, output conv): what the fingerprint hashes
FINGERPRINT_KEYS = ("input_blocks.0.0.weight", "out.2.weight", "out.2.bias")
FINGERPRINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kl_loss(outputs: Iterable[torch.Tensor], weight: float = 0.1) -> torch.Tensor:
    """weight * sum over every predicted noise map of KL(N(mu, var) || N(0, 1)) = 1/2 (var + mu^2 - 1 - log var),
    mu and var taken over all elements of one map (one sample's [C, H, W] at one step); summed, not averaged,
    over the K*B maps (the paper's rule)."""
    total = None
    for out in outputs:
        flat = out.float().flatten(1)                       # [B, C*H*W]: one map per row
        mu = flat.mean(dim=1)
        var = flat.var(dim=1, correction=0).clamp_min(1e-8)
        kl = 0.5 * (var + mu * mu - 1.0 - torch.log(var))
        total = kl.sum() if total is None else total + kl.sum()
    if total is None:
        raise ValueError("kl_loss needs at least one output")
    return weight * total


def vsd_loss(x0: torch.Tensor, eps_teacher: torch.Tensor, eps_fake: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """Variational score distillation: grad = sigma_t^2 (eps_teacher - eps_fake), sigma_t^2 = 1 - alpha_t, and
    L = 1/2 MSE(x0, stopgrad(x0 - grad)), whose gradient w.r.t. x0 is grad / numel."""
    w = (1.0 - alpha_t).view(-1, *[1] * (x0.dim() - 1)).to(x0)
    grad = w * (eps_teacher.float() - eps_fake.float())
    target = (x0 - grad).detach()
    return 0.5 * F.mse_loss(x0.float(), target.float())


def denoising_loss(pred: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """The fake score model's loss: MSE of the noise prediction, prediction and target both scaled by sqrt(alpha_t)."""
    r = alpha_t.sqrt().view(-1, *[1] * (pred.dim() - 1)).to(pred)
    return F.mse_loss((r * pred).float(), (r * eps).float())


def noised(x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(alpha_t) x0 + sqrt(1 - alpha_t) eps (the UNet's input in VP form)."""
    a = alpha_t.view(-1, *[1] * (x0.dim() - 1)).to(x0)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * eps


def guided(eps_cond: torch.Tensor, eps_uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance; ``eps_uncond`` None or scale 1 means the conditional prediction."""
    if eps_uncond is None or scale == 1.0:
        return eps_cond
    return eps_uncond + scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------------------------------- marking

def fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict:
    """{dtype name: sha256} of the FINGERPRINT_KEYS tensors cast to each common weight dtype: a host that
    loaded the student in fp32, fp16 or bf16 finds the same hash from its own weights."""
    out = {}
    for dtype in FINGERPRINT_DTYPES:
        h = hashlib.sha256()
        for key in FINGERPRINT_KEYS:
            t = tensors[key].detach().to("cpu", dtype).contiguous()
            h.update(key.encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[str(dtype).removeprefix("torch.")] = h.hexdigest()
    return out


def fingerprint_of_weights(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """(dtype name, sha256) of loaded weights in their own dtype, or None if that dtype is not fingerprinted."""
    dtypes = {tensors[k].dtype for k in FINGERPRINT_KEYS}
    if len(dtypes) != 1 or next(iter(dtypes)) not in FINGERPRINT_DTYPES:
        return None
    dtype = next(iter(dtypes))
    h = hashlib.sha256()
    for key in FINGERPRINT_KEYS:
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return str(dtype).removeprefix("torch."), h.hexdigest()


def student_metadata(state: Mapping[str, torch.Tensor], *, timesteps, prediction="eps", **info) -> dict:
    """The safetensors metadata (str -> str) that marks a saved UNet as a TiUE student."""
    doc = dict(format=METADATA_FORMAT, k=len(timesteps), timesteps=[int(t) for t in timesteps],
               prediction=prediction, fingerprint=fingerprint(state), **info)
    return {METADATA_KEY: json.dumps(doc, sort_keys=True)}


def read_student_metadata(metadata: Mapping[str, str] | None) -> dict | None:
    """The student document in a file's safetensors metadata, or None (not a student, or unreadable)."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        doc = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != METADATA_FORMAT or not isinstance(doc.get("fingerprint"), dict):
        return None
    return doc
