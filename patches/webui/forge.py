"""Forge Classic (and Forge 1 / reForge: the ComfyUI-like ``ldm_patched`` line): the UNet adapter and the
patch on a clone of ``p.sd_model.forge_objects.unet`` (hosts.md C5).

Forge resets ``forge_objects`` right before every ``process_before_every_sampling``, so each pass clones the
UNet patcher, adds an object patch ``diffusion_model.forward`` (applied while that clone is loaded, undone
when it is unloaded: nothing leaks into the next generation) and assigns the clone back; doing it twice
(Forge's hires pass calls the hook twice) only replaces the same patch.

The split is the ComfyUI one (``fasterdiffusion/ldm.py``): ``ldm_patched`` is a ComfyUI fork, and what its
``UNetModel.forward`` adds (``block_modifiers`` "before"/"after" every block and around the head) is read from
its source there.  Forge 2 (``backend.nn.unet``) is not served yet: it passes through unchanged with one log line.
"""
from __future__ import annotations

import logging
import types

import torch

from fasterdiffusion import ldm

log = logging.getLogger("FasterDiffusion")

SERVED_MODULES = ("ldm_patched.ldm.modules.diffusionmodules.openaimodel",)
PATCH_KEY = "diffusion_model.forward"


def unet_reason(dm) -> str | None:
    if type(dm).__name__ != "UNetModel" or type(dm).__module__ not in SERVED_MODULES + _extra_modules():
        return (f"{type(dm).__module__}.{type(dm).__name__} is not ldm_patched's UNetModel "
                f"(Forge 2 is not served yet)")
    return ldm.unsupported_reason(dm)


_EXTRA: list = []     # tests register the module of a stand-in UNet class here


def _extra_modules() -> tuple:
    return tuple(_EXTRA)


def diffusion_model(p):
    return p.sd_model.forge_objects.unet.model.diffusion_model


def unsupported_reason(p) -> str | None:
    reason = unet_reason(diffusion_model(p))
    return None if reason is None else f"passing the model through unchanged: {reason}"


def timesteps(p, sigmas):
    return p.sd_model.forge_objects.unet.model.model_sampling.timestep(sigmas)


def denoised_shift(p):
    ms = p.sd_model.forge_objects.unet.model.model_sampling
    return lambda sigma, dx: ms.calculate_denoised(sigma.to(dx), torch.zeros_like(dx), dx)


def patch_unet(p, gen):
    """Clone the UNet patcher, patch the clone's ``diffusion_model.forward``, assign it back."""
    unet = p.sd_model.forge_objects.unet.clone()
    dm = unet.model.diffusion_model
    if unet_reason(dm) is None:
        unet.add_object_patch(PATCH_KEY, types.MethodType(make_forward(gen), dm))
    p.sd_model.forge_objects.unet = unet
    return unet


def make_forward(gen):
    def fd_forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        def full():
            return type(self).forward(self, x, timesteps, context, y, control, transformer_options, **kwargs)

        run = gen.run
        if run is None:
            return full()
        to = transformer_options
        call = ldm.make_call(x, timesteps, context, y, control, to, kwargs, call_slot(x, to))
        return run.forward(ldm.LdmSplit(self), call, gen.step, full)
    fd_forward._fd_forge = True
    return fd_forward


def call_slot(x, to) -> tuple:
    """Calls whose features differ: their cond/uncond chunks, shape, and per-call patches."""
    patches = tuple(sorted((str(k), tuple(map(id, v))) for k, v in to.get("patches", {}).items()))
    return (tuple(to.get("cond_or_uncond", ())), tuple(x.shape), patches)
