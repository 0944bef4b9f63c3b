"""The UNet adapter for ComfyUI's ldm ``UNetModel`` (SD1.x, SD2.x, SDXL): encoder and decoder apart.

The split functions mirror ``UNetModel._forward`` (comfy/ldm/modules/diffusionmodules/openaimodel.py)
line for line, so the decoder run on freshly computed features equals the host's forward exactly
(pinned by tests/test_comfy_unet.py).  Differences from the host, all deliberate:
  * ControlNet ``middle``/``output`` residuals are added out of place, so cached features stay clean
    and every decoder call gets *its own* step's residuals;
  * cached tensors handed to ``output_block_patch`` patches are cloned (FreeU edits ``h`` in place);
  * with ControlNet reuse (``comfy_controlnet``) a key step keeps each ControlNet's own residuals with
    its features, and the decoder of every step of the group sums those active at its own step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, forward_timestep_embed, timestep_embedding

from ..fasterdiffusion.runtime import Features, ModelCall, repeat_rows as _rows
from .comfy_controlnet import DeferredControl, StepsControl, is_reused, merge_chain, reused_decoder_control

log = logging.getLogger("FasterDiffusion")


def unsupported_reason(unet) -> str | None:
    """Why this adapter cannot serve ``unet``, or None if it can."""
    if type(unet) is not UNetModel:
        return f"{type(unet).__name__} is not ComfyUI's UNetModel (SD1.x, SD2.x, SDXL)"
    if getattr(unet, "use_temporal_resblocks", False):
        return "video UNets (SVD) are not supported yet"
    return None


# --------------------------------------------------------------------------------------------------
# The split, line for line with UNetModel._forward
# --------------------------------------------------------------------------------------------------

def embed_time(unet, timesteps, y, dtype, to):
    """Timestep embedding (+ emb_patch, + ADM ``y`` for SDXL): what every decoder step needs anew."""
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(dtype))
    for p in to.get("patches", {}).get("emb_patch", []):
        emb = p(emb, unet.model_channels, to)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    return emb


def run_encoder(unet, x, emb, context, control, to, kwargs) -> Features:
    """conv_in + input blocks + middle block; ``control['input']`` (T2I adapters) is applied here."""
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    patches = to.get("patches", {})
    vid = _video_kwargs(unet, kwargs)
    hs, h = [], x
    for i, module in enumerate(unet.input_blocks):
        to["block"] = ("input", i)
        h = forward_timestep_embed(module, h, emb, context, to, **vid)
        h = _control(h, control, "input", in_place=True)
        for p in patches.get("input_block_patch", []):
            h = p(h, to)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", []):
            h = p(h, to)
    to["block"] = ("middle", 0)
    if unet.middle_block is not None:
        h = forward_timestep_embed(unet.middle_block, h, emb, context, to, **vid)
    return Features(hs, h, LdmMeta(to["transformer_index"], x.dtype))


def run_decoder(unet, feats: Features, emb, context, control, to, kwargs):
    """Output blocks + ``out`` on cached features; never reads the latent."""
    to["transformer_index"] = feats.meta.transformer_index
    dtype = feats.meta.dtype
    patches = to.get("patches", {})
    out_patches = patches.get("output_block_patch", [])
    vid = _video_kwargs(unet, kwargs)
    h = _control(feats.mid, control, "middle", in_place=False)
    hs = list(feats.skips)
    for i, module in enumerate(unet.output_blocks):
        to["block"] = ("output", i)
        hsp = _control(hs.pop(), control, "output", in_place=False)
        if out_patches:
            h, hsp = (h.clone() if h is feats.mid else h), (hsp.clone() if hsp is feats.skips[len(hs)] else hsp)
            for p in out_patches:
                h, hsp = p(h, hsp, to)
        h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = hs[-1].shape if hs else None
        h = forward_timestep_embed(module, h, emb, context, to, output_shape, **vid)
    h = h.type(dtype)
    return unet.id_predictor(h) if unet.predict_codebook_ids else unet.out(h)


def _control(h, control, name, in_place):
    """The host's ``apply_control``; out of place where ``h`` is a cached tensor."""
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            try:
                h = h.add_(ctrl) if in_place else h + ctrl
            except RuntimeError:
                log.warning("control could not be applied %s %s", h.shape, ctrl.shape)
    return h


def _video_kwargs(unet, kwargs):
    return dict(time_context=kwargs.get("time_context"),
                num_video_frames=kwargs.get("num_video_frames", unet.default_num_video_frames),
                image_only_indicator=kwargs.get("image_only_indicator"))


# --------------------------------------------------------------------------------------------------
# The adapter the runtime calls
# --------------------------------------------------------------------------------------------------

@dataclass
class LdmMeta:
    """What the decoder needs from the key step besides the tensors; ``controls``: each ControlNet's own
    residuals at the key step, [(member, residuals)], when they are reused."""
    transformer_index: int
    dtype: torch.dtype
    controls: list | None = None


@dataclass
class LdmCall:
    """The ComfyUI side of one call: ADM ``y``, ControlNet residuals, transformer_options, extra kwargs."""
    y: torch.Tensor | None
    control: dict | None
    to: dict
    kwargs: dict


def make_call(x, timesteps, context, y, control, to, kwargs, slot=()) -> ModelCall:
    return ModelCall(x, timesteps, context, to.get("sigmas"), x.dtype, slot, LdmCall(y, control, to, kwargs))


class LdmUNetAdapter:
    def __init__(self, unet):
        self.unet = unet

    def embed(self, call: ModelCall):
        h = call.host
        return embed_time(self.unet, call.timesteps, h.y, call.dtype, h.to)

    def encode(self, call: ModelCall, emb) -> Features:
        h = call.host
        if not isinstance(h.control, DeferredControl):
            return run_encoder(self.unet, call.x, emb, call.context, h.control, h.to, h.kwargs)
        kept = h.control.own_residuals()     # the ControlNets run here, once for the group
        feats = run_encoder(self.unet, call.x, emb, call.context, merge_chain([r for _, r in kept]), h.to, h.kwargs)
        feats.meta.controls = kept
        return feats

    def decode(self, call: ModelCall, features: Features, emb):
        h = call.host
        control = reused_decoder_control(h.control, features.meta.controls) if is_reused(h.control) else h.control
        return run_decoder(self.unet, features, emb, call.context, control, h.to, h.kwargs)

    def tile(self, call: ModelCall, n, timesteps, sigmas) -> ModelCall:
        h = call.host
        to = dict(h.to)   # the batched call sees a consistent, step-major view of the batch
        b = call.rows
        to["cond_or_uncond"] = list(h.to.get("cond_or_uncond", [])) * n
        to["uuids"] = list(h.to.get("uuids", [])) * n
        if sigmas is not None:
            # ComfyUI gives one sigma per latent row (each cond chunk of the call repeats them); a batched
            # call over steps has no such period, so it gets one sigma per call row, step-major: a patch
            # that repeats to["sigmas"] up to its rows (the host's layout) reads each row's own sigma
            per_step = sigmas.view(n, -1)
            to["sigmas"] = per_step.repeat(1, b // per_step.shape[1]).flatten()
        to["original_shape"] = [b * n] + list(h.to.get("original_shape", [b]))[1:]
        control = None   # fresh residuals are per step (never batched); reused ones are summed per step
        if isinstance(h.control, DeferredControl):
            control = StepsControl(h.control, list(sigmas.view(n, -1)[:, :1]), b)
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=_rows(call.context, n),
                       host=LdmCall(_rows(h.y, n), control, to, h.kwargs))

    def has_decoder_control(self, call: ModelCall) -> bool:
        """Whether the call's decoder needs residuals of its own step that a batch cannot give it: fresh ones
        (reuse off) always; reused ones only where the rows' sigmas are unknown."""
        control = call.host.control
        if isinstance(control, DeferredControl):
            return call.sigmas is None
        return control is not None and any(len(control.get(k) or []) for k in ("middle", "output"))
