"""TiUE distillation pieces (arXiv 2505.21960 §3, SwiftBrush-style variational score distillation), host-free.

The trainer (``tools/train_tiue.py``) alternates two updates:
  * student: one-pass sample x0 (``onepass.one_pass``) -> noise it to a random t -> the frozen teacher's and
    the online "fake score" model's noise predictions (both with CFG) -> ``vsd_loss`` + ``kl_loss`` on the
    K*B noise maps the student's decoders predicted;
  * fake score: ``denoising_loss`` on the detached student samples (it learns the student's distribution);
  optionally ``regression_loss`` to the teacher's guided multi-step samples of fixed noises (DMD's pairs).
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


def kl_loss(outputs: Iterable[torch.Tensor], weight: float = 0.1, reduce: str = "sum") -> torch.Tensor:
    """weight * KL(N(mu, var) || N(0, 1)) = 1/2 (var + mu^2 - 1 - log var) of every predicted noise map, mu and var
    taken over all elements of one map (one sample's [C, H, W] at one step).  ``reduce``: "sum" over the K*B maps
    (the paper's rule: its pull grows with batch and K while VSD's, a mean over elements, does not) or "mean"
    (per map: the same scale per element as ``vsd_loss``, whatever the batch and K)."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"kl_loss reduce must be 'sum' or 'mean', not {reduce!r}")
    maps = []
    for out in outputs:
        flat = out.float().flatten(1)                       # [B, C*H*W]: one map per row
        mu = flat.mean(dim=1)
        var = flat.var(dim=1, correction=0).clamp_min(1e-8)
        maps.append(0.5 * (var + mu * mu - 1.0 - torch.log(var)))
    if not maps:
        raise ValueError("kl_loss needs at least one output")
    kl = torch.cat(maps)
    return weight * (kl.sum() if reduce == "sum" else kl.mean())


def vsd_loss(x0: torch.Tensor, eps_teacher: torch.Tensor, eps_fake: torch.Tensor, alpha_t: torch.Tensor,
             weighting: str = "sigma2", x_t: torch.Tensor | None = None) -> torch.Tensor:
    """Variational score distillation: L = 1/2 MSE(x0, stopgrad(x0 - grad)), whose gradient w.r.t. x0 is grad / numel.
    ``weighting`` "sigma2" (SwiftBrush, the TiUE paper): grad = sigma_t^2 (eps_teacher - eps_fake), sigma_t^2 =
    1 - alpha_t.  "dmd" (Yin et al. 2024, distribution matching): grad = (x0_fake - x0_teacher) / mean|x0 -
    x0_teacher| per sample, the two models' x0 predictions at ``x_t``: a per-sample normalised step whose size does
    not fade where the scores are small."""
    a = alpha_t.view(-1, *[1] * (x0.dim() - 1)).to(x0)
    diff = eps_teacher.float() - eps_fake.float()
    if weighting == "sigma2":
        grad = (1.0 - a) * diff
    elif weighting == "dmd":
        if x_t is None:
            raise ValueError("vsd_loss weighting 'dmd' needs x_t")
        x0_teacher = (x_t.float() - (1.0 - a).sqrt() * eps_teacher.float()) / a.sqrt()
        scale = (x0.detach().float() - x0_teacher).abs().flatten(1).mean(1).clamp_min(1e-6)
        scale = scale.view(-1, *[1] * (x0.dim() - 1))
        grad = ((1.0 - a) / a).sqrt() * diff / scale
    else:
        raise ValueError(f"vsd_loss weighting must be 'sigma2' or 'dmd', not {weighting!r}")
    target = (x0 - grad).detach()
    return 0.5 * F.mse_loss(x0.float(), target.float())


def regression_loss(x0: torch.Tensor, target: torch.Tensor, hf: float = 0.0, to_image=None) -> torch.Tensor:
    """DMD's regression term (Yin et al. 2024): MSE between the student's one-pass sample and the teacher's
    multi-step (guided) DDIM sample from the same noise and condition; it anchors the student to the teacher's
    noise-to-image map where VSD alone only matches distributions.  ``hf`` adds that weight times the MSE of the
    difference's Laplacian in image space (``to_image``: the latent's decoder where it is cheap, e.g. the test
    models' pixel unshuffle; None: per latent channel): the high frequencies, left-over noise that a plain MSE
    weighs by its small energy (DMD uses LPIPS for the same reason)."""
    diff = x0.float() - target.float()
    loss = diff.pow(2).mean()
    if hf:
        img = diff if to_image is None else to_image(diff)
        img = img if img.dim() == 4 else img.unsqueeze(1)
        lap = img.new_tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(img.shape[1], 1, 3, 3)
        loss = loss + hf * F.conv2d(img, lap, groups=img.shape[1]).pow(2).mean()
    return loss


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
