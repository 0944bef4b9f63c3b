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

import ast
import builtins
import functools
import inspect
import logging
import textwrap
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
    return host_forward_difference()


# --------------------------------------------------------------------------------------------------
# Is the host's forward still the one mirrored below?
# --------------------------------------------------------------------------------------------------

# What UNetModel._forward of ComfyUI 0.3.75 touches (forward_outline of its source).  A host whose forward
# reads another attribute, calls another helper or reads another options/patch key does something the split
# below does not: such a model runs unpatched, with one log line, rather than giving a different image.
MIRRORED_FORWARD = {
    "self": {"default_num_video_frames", "id_predictor", "input_blocks", "label_emb", "middle_block", "model_channels",
             "num_classes", "out", "output_blocks", "predict_codebook_ids", "time_embed"},
    "calls": {"apply_control", "forward_timestep_embed", "timestep_embedding"},
    "keys": {"block", "emb_patch", "image_only_indicator", "input_block_patch", "input_block_patch_after_skip",
             "num_video_frames", "original_shape", "output_block_patch", "patches", "time_context",
             "transformer_index"},
}


def forward_outline(source: str) -> dict[str, set[str]]:
    """The attributes of ``self``, module functions and string keys a forward's source uses (formatting and
    comments do not count)."""
    tree = ast.parse(textwrap.dedent(source))
    local = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    out = {"self": set(), "calls": set(), "keys": set()}
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            out["self"].add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id not in local and not hasattr(builtins, node.func.id):
                out["calls"].add(node.func.id)
        elif isinstance(node, ast.Subscript):
            key = node.slice                                               # options["key"]
        elif isinstance(node, ast.Compare):
            key = node.left                                                # "key" in options
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            key = node.args[0] if node.args else None                      # options.get("key", ...)
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            out["keys"].add(key.value)
    return out


def forward_difference(source: str) -> str | None:
    """How a forward's outline differs from the mirrored one, in words, or None."""
    outline = forward_outline(source)
    diffs = []
    for kind, mirrored in MIRRORED_FORWARD.items():
        for verb, names in (("uses", outline[kind] - mirrored), ("no longer uses", mirrored - outline[kind])):
            if names:
                diffs.append(f"{verb} {kind} {', '.join(sorted(names))}")
    if not diffs:
        return None
    return ("this ComfyUI's UNetModel._forward differs from the one FasterDiffusion mirrors (ComfyUI 0.3.75): "
            + "; ".join(diffs) + ". Update FasterDiffusion, or report it with your ComfyUI version")


@functools.cache
def host_forward_difference() -> str | None:
    try:
        source = inspect.getsource(getattr(UNetModel, "_forward", UNetModel.forward))
    except (OSError, TypeError):         # no source shipped (a frozen build): nothing to compare, trust the tests
        return None
    return forward_difference(source)


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
        if call.x is not None:   # a step's own call skips the encoder, which sets this for attention patches
            h.to["original_shape"] = list(call.x.shape)   # (ToMe, HyperTile); tiled calls carry their own
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
