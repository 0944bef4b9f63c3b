"""Forge Classic (and Forge 1 / reForge: the ComfyUI-like ``ldm_patched`` line): the UNet adapter and the
patch on a clone of ``p.sd_model.forge_objects.unet`` (hosts.md C5).

Forge resets ``forge_objects`` right before every ``process_before_every_sampling``, so each pass clones the
UNet patcher, adds an object patch ``diffusion_model.forward`` (applied while that clone is loaded, undone
when it is unloaded: nothing leaks into the next generation) and assigns the clone back; doing it twice
(Forge's hires pass calls the hook twice) only replaces the same patch.

The split mirrors ``ldm_patched/ldm/modules/diffusionmodules/openaimodel.py`` ``UNetModel.forward`` line for
line, with ``block_modifiers`` ("before"/"after" every block and the final ``("last", 0)``), the
``input_block_patch`` / ``input_block_patch_after_skip`` / ``output_block_patch`` patches and
``apply_control``.  Deliberate differences, as in the ComfyUI adapter: ControlNet ``middle``/``output``
residuals are added out of place (cached features stay clean; every decoder call gets its own step's
residuals) and cached tensors handed to output patches are cloned.  Forge 2 (``backend.nn.unet``) is not
served yet: it passes through unchanged with one log line.
"""
from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass, replace

import torch

from fasterdiffusion.runtime import Features, ModelCall, repeat_rows as _rows

log = logging.getLogger("FasterDiffusion")

SERVED_MODULES = ("ldm_patched.ldm.modules.diffusionmodules.openaimodel",)
PATCH_KEY = "diffusion_model.forward"


def unet_reason(dm) -> str | None:
    if type(dm).__name__ != "UNetModel" or type(dm).__module__ not in SERVED_MODULES + _extra_modules():
        return (f"{type(dm).__module__}.{type(dm).__name__} is not ldm_patched's UNetModel "
                f"(Forge 2 is not served yet)")
    if getattr(dm, "use_temporal_resblocks", False):
        return "video UNets are not supported"
    return None


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
        call = ModelCall(x, timesteps, context, to.get("sigmas"), x.dtype, call_slot(x, to),
                         ForgeCall(y, control, to, kwargs))
        return run.forward(ForgeUNetAdapter(self), call, gen.step, full)
    fd_forward._fd_forge = True
    return fd_forward


def call_slot(x, to) -> tuple:
    """Calls whose features differ: their cond/uncond chunks, shape, and per-call patches."""
    patches = tuple(sorted((str(k), tuple(map(id, v))) for k, v in to.get("patches", {}).items()))
    return (tuple(to.get("cond_or_uncond", ())), tuple(x.shape), patches)


# --------------------------------------------------------------------------------------------------
# The split, line for line with ldm_patched UNetModel.forward
# --------------------------------------------------------------------------------------------------

@dataclass
class ForgeCall:
    y: torch.Tensor | None
    control: dict | None
    to: dict
    kwargs: dict


def _video(unet, kwargs):
    return dict(time_context=kwargs.get("time_context", None),
                num_video_frames=kwargs.get("num_video_frames", unet.default_num_video_frames),
                image_only_indicator=kwargs.get("image_only_indicator", getattr(unet, "default_image_only_indicator", None)))


def _control(h, control, name, in_place):
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            try:
                h = h.add_(ctrl) if in_place else h + ctrl
            except RuntimeError:
                log.warning("control could not be applied %s %s", h.shape, ctrl.shape)
    return h


class ForgeUNetAdapter:
    def __init__(self, unet):
        self.unet = unet
        self.module = sys.modules[type(unet).__module__]

    def embed(self, call: ModelCall):
        u = self.unet
        t_emb = self.module.timestep_embedding(call.timesteps, u.model_channels, repeat_only=False).to(call.dtype)
        emb = u.time_embed(t_emb)
        if u.num_classes is not None:
            emb = emb + u.label_emb(call.host.y)
        return emb

    def encode(self, call: ModelCall, emb) -> Features:
        u, hc = self.unet, call.host
        to = hc.to
        to["original_shape"] = list(call.x.shape)
        to["transformer_index"] = 0
        patches = to.get("patches", {})
        mods = to.get("block_modifiers", [])
        fte = self.module.forward_timestep_embed
        vid = _video(u, hc.kwargs)
        hs, h = [], call.x
        for i, module in enumerate(u.input_blocks):
            to["block"] = ("input", i)
            for m in mods:
                h = m(h, "before", to)
            h = fte(module, h, emb, call.context, to, **vid)
            h = _control(h, hc.control, "input", in_place=True)
            for m in mods:
                h = m(h, "after", to)
            for p in patches.get("input_block_patch", []):
                h = p(h, to)
            hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, to)
        to["block"] = ("middle", 0)
        for m in mods:
            h = m(h, "before", to)
        h = fte(u.middle_block, h, emb, call.context, to, **vid)
        # the middle residual and the "after" modifiers belong to every step: applied in decode
        return Features(hs, h, to["transformer_index"])

    def decode(self, call: ModelCall, feats: Features, emb):
        u, hc = self.unet, call.host
        to = hc.to
        to["transformer_index"] = feats.meta
        patches = to.get("patches", {})
        mods = to.get("block_modifiers", [])
        out_patches = patches.get("output_block_patch", [])
        fte = self.module.forward_timestep_embed
        vid = _video(u, hc.kwargs)
        to["block"] = ("middle", 0)
        h = _control(feats.mid, hc.control, "middle", in_place=False)
        if mods and h is feats.mid:
            h = h.clone()
        for m in mods:
            h = m(h, "after", to)
        hs = list(feats.skips)
        for i, module in enumerate(u.output_blocks):
            to["block"] = ("output", i)
            hsp = _control(hs.pop(), hc.control, "output", in_place=False)
            if out_patches:
                h = h.clone() if h is feats.mid else h
                hsp = hsp.clone() if hsp is feats.skips[len(hs)] else hsp
                for p in out_patches:
                    h, hsp = p(h, hsp, to)
            h = torch.cat([h, hsp], dim=1)
            del hsp
            output_shape = hs[-1].shape if len(hs) > 0 else None
            for m in mods:
                h = m(h, "before", to)
            h = fte(module, h, emb, call.context, to, output_shape, **vid)
            for m in mods:
                h = m(h, "after", to)
        to["block"] = ("last", 0)
        for m in mods:
            h = m(h, "before", to)
        h = u.id_predictor(h) if u.predict_codebook_ids else u.out(h)
        for m in mods:
            h = m(h, "after", to)
        return h.type(call.dtype)

    def tile(self, call: ModelCall, n, timesteps, sigmas) -> ModelCall:
        hc = call.host
        to = dict(hc.to)
        to["cond_or_uncond"] = list(hc.to.get("cond_or_uncond", [])) * n
        if sigmas is not None:
            to["sigmas"] = sigmas
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=_rows(call.context, n),
                       host=ForgeCall(_rows(hc.y, n), None, to, hc.kwargs))

    def has_decoder_control(self, call: ModelCall) -> bool:
        c = call.host.control
        return c is not None and any(len(c.get(k) or []) for k in ("middle", "output"))
