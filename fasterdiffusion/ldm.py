"""The ldm-family UNet split: ``UNetModel`` of ``openaimodel.py`` as ComfyUI (0.3.75 and 0.33) and Forge Classic's
``ldm_patched`` (a ComfyUI fork) write it.  One mirror of its forward, encoder and decoder apart, for every host.

Host-free: the host's helpers (``forward_timestep_embed``, ``timestep_embedding``) are looked up in the UNet class's
own module, so each host's version of them applies to the split exactly as to its forward (ComfyUI 0.33's
``forward_timestep_embed_patch`` on every layer, Forge's ``block_inner_modifiers``).  Which patch points the
host's forward honours is read from its source (``HostForward``), not from a version string:

  emb_patch                  ComfyUI: patches of the timestep embedding
  block_modifiers            Forge: "before"/"after" every block, and around the head as block ("last", 0)
  middle_block_after_patch   ComfyUI 0.33 (SUPIR): after the middle block; it reads the step's latent ``x``, so
                             it runs in every step's decoder on that step's own call (never in a batch), on a
                             copy of the cached middle features
  hsp=None                   ComfyUI 0.33: an ``output_block_patch`` that returns no skip skips the concat

A forward that touches anything else (``KNOWN``) runs unpatched, with one log line, rather than giving a
different image.  Deliberate differences from the host: ControlNet ``middle``/``output`` residuals are added
out of place (cached features stay clean; every decoder call gets its own step's residuals) and cached
tensors handed to patches are cloned (FreeU edits ``h`` in place).  The decoder on fresh features equals the
host's forward bit for bit (tests/test_comfy_unet.py, tests/test_webui.py).
"""
from __future__ import annotations

import ast
import builtins
import functools
import inspect
import logging
import sys
import textwrap
from dataclasses import dataclass, replace

import torch

from .runtime import Features, ModelCall, repeat_rows

log = logging.getLogger("FasterDiffusion")

# What the mirror below knows of a UNetModel forward (the union of ComfyUI 0.3.75's and 0.33's ``_forward`` and
# Forge Classic's ``forward``, by ``forward_outline``): the attributes of ``self``, module functions, option keys.
KNOWN = {
    "self": {"default_image_only_indicator", "default_num_video_frames", "id_predictor", "input_blocks",
             "label_emb", "middle_block", "model_channels", "num_classes", "out", "output_blocks",
             "predict_codebook_ids", "time_embed"},
    "calls": {"apply_control", "forward_timestep_embed", "timestep_embedding"},
    "keys": {"block", "block_modifiers", "emb_patch", "h", "image_only_indicator", "input_block_patch",
             "input_block_patch_after_skip", "middle_block_after_patch", "num_video_frames", "original_shape",
             "output_block_patch", "patches", "time_context", "transformer_index"},
}


def forward_outline(tree: ast.AST) -> dict[str, set[str]]:
    """The attributes of ``self``, module functions and string keys a forward's parsed source uses (formatting and
    comments do not count)."""
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


def outline_difference(outline: dict, known: dict, missing: str | None, model: str, hosts: str) -> str | None:
    """What a host forward's outline (``forward_outline``) uses beyond ``known``, and ``missing`` (what it does not
    run itself, or None), in words: the model then runs unpatched with this reason.  None where the mirror knows it
    all."""
    unknown = [f"uses {kind} {', '.join(sorted(outline[kind] - known[kind]))}"
               for kind in known if outline[kind] - known[kind]] + ([missing] if missing else [])
    if not unknown:
        return None
    return (f"this host's {model} forward differs from the ones FasterDiffusion mirrors ({hosts}): " + "; ".join(unknown)
            + ". Update FasterDiffusion, or report it with your host's version")


def tile_options(to: dict, n: int, rows: int, sigmas) -> dict:
    """transformer_options of a decoder-only call of ``n`` steps' ``rows`` each, stacked step-major: cond_or_uncond
    and uuids repeated, one sigma per call row.  ComfyUI gives one sigma per latent row (each cond chunk of the call
    repeats them); a batched call over steps has no such period, so it gets one sigma per call row, step-major: a
    patch that repeats to["sigmas"] up to its rows (the host's layout) reads each row's own sigma."""
    to = dict(to)
    to["cond_or_uncond"] = list(to.get("cond_or_uncond", [])) * n
    to["uuids"] = list(to.get("uuids", [])) * n
    if sigmas is not None:
        per_step = sigmas.view(n, -1)
        to["sigmas"] = per_step.repeat(1, rows // per_step.shape[1]).flatten()
    return to


def tile_kwargs(kwargs: dict, n: int) -> dict:
    """The forward's extra arguments for ``n`` steps stacked step-major: tensors are per row or per video (SVD's
    time_context, image_only_indicator; a transformer's attention mask) and are repeated like the rows; the rest
    (num_video_frames: the frames of one video) is kept."""
    return {k: repeat_rows(v, n) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


@dataclass(frozen=True)
class HostForward:
    """What one host's UNetModel forward does, read from its source; ``difference``: what the mirror does not
    know of it, in words (the model then runs unpatched), or None."""
    emb_patch: bool = True
    block_modifiers: bool = False
    middle_after_patch: bool = False
    optional_skip: bool = False        # ``if hsp is not None: h = cat([h, hsp])``
    cast_last: bool = False            # Forge: ``return out(h).type(x.dtype)``; ComfyUI: ``out(h.type(x.dtype))``
    default_indicator: bool = False    # Forge: image_only_indicator defaults to self.default_image_only_indicator
    difference: str | None = None


def read_forward(source: str) -> HostForward:
    """The ``HostForward`` of a forward's source."""
    tree = ast.parse(textwrap.dedent(source))
    outline = forward_outline(tree)
    optional_skip = any(isinstance(n, ast.Compare) and isinstance(n.left, ast.Name) and n.left.id == "hsp"
                        and isinstance(n.ops[0], ast.IsNot) for n in ast.walk(tree))
    returns = [n.value for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value is not None]
    cast_last = any(isinstance(r, ast.Call) and isinstance(r.func, ast.Attribute) and r.func.attr == "type"
                    for r in returns)
    covered = {"input_blocks", "middle_block", "output_blocks"} <= outline["self"]
    difference = outline_difference(outline, KNOWN, None if covered else "does not run input_blocks, middle_block "
                                    "and output_blocks itself", "UNetModel", "ComfyUI 0.3.75 and 0.33, Forge Classic")
    keys = outline["keys"]
    return HostForward("emb_patch" in keys, "block_modifiers" in keys, "middle_block_after_patch" in keys,
                       optional_skip, cast_last, "default_image_only_indicator" in outline["self"], difference)


@functools.cache
def host_forward(cls) -> HostForward:
    """``read_forward`` of ``cls``'s forward (ComfyUI's ``_forward``, which its ``forward`` wraps; Forge's
    ``forward``)."""
    try:
        source = inspect.getsource(getattr(cls, "_forward", cls.forward))
    except (OSError, TypeError):
        return HostForward(difference=f"the source of {cls.__name__}'s forward is not shipped, so FasterDiffusion "
                                      f"cannot tell which patch points it honours")
    return read_forward(source)


def unsupported_reason(unet) -> str | None:
    """Why the split cannot serve this UNetModel (checked by the host that it is the ldm family's), or None.  Video
    UNets (SVD: temporal res blocks and attention, frames folded into the batch) are served: a batched decoder call
    stacks whole calls step-major, so every video keeps its frames together."""
    return host_forward(type(unet)).difference


# --------------------------------------------------------------------------------------------------
# The split, line for line with the host's forward
# --------------------------------------------------------------------------------------------------

@dataclass
class LdmMeta:
    """What the decoder needs from the key step besides the tensors; ``controls``: each ControlNet's own
    residuals at the key step, [(member, residuals)], where a host reuses them (ComfyUI)."""
    transformer_index: int
    dtype: torch.dtype
    controls: list | None = None


@dataclass
class LdmCall:
    """The host side of one call: ADM ``y``, ControlNet residuals, transformer_options, extra kwargs."""
    y: torch.Tensor | None
    control: dict | None
    to: dict
    kwargs: dict


def make_call(x, timesteps, context, y, control, to, kwargs, slot=()) -> ModelCall:
    return ModelCall(x, timesteps, context, to.get("sigmas"), x.dtype, slot, LdmCall(y, control, to, kwargs))


def control_residual(h, control, name, in_place):
    """The host's ``apply_control``; out of place where ``h`` is a cached tensor."""
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            try:
                h = h.add_(ctrl) if in_place else h + ctrl
            except RuntimeError:
                log.warning("control could not be applied %s %s", h.shape, ctrl.shape)
    return h


def _modify(modifiers, h, where, to):
    for m in modifiers:
        h = m(h, where, to)
    return h


class LdmSplit:
    """The runtime's ``UNetAdapter`` for an ldm-family UNetModel.  Hosts adapt by overriding a method
    (ComfyUI's ControlNet reuse overrides encode/decode/tile)."""

    def __init__(self, unet):
        self.unet = unet
        self.host = host_forward(type(unet))
        self.module = sys.modules[type(unet).__module__]

    def _video(self, kwargs):
        u = self.unet
        indicator = getattr(u, "default_image_only_indicator", None) if self.host.default_indicator else None
        return dict(time_context=kwargs.get("time_context"),
                    num_video_frames=kwargs.get("num_video_frames", u.default_num_video_frames),
                    image_only_indicator=kwargs.get("image_only_indicator", indicator))

    def _modifiers(self, to):
        return to.get("block_modifiers", []) if self.host.block_modifiers else []

    def _after_patches(self, to):
        return to.get("patches", {}).get("middle_block_after_patch", []) if self.host.middle_after_patch else []

    def embed(self, call: ModelCall):
        """Timestep embedding (+ emb_patch, + ADM ``y`` for SDXL): what every decoder step needs anew."""
        u, to = self.unet, call.host.to
        emb = u.time_embed(self.module.timestep_embedding(call.timesteps, u.model_channels, repeat_only=False)
                           .to(call.dtype))
        if self.host.emb_patch:
            for p in to.get("patches", {}).get("emb_patch", []):
                emb = p(emb, u.model_channels, to)
        if u.num_classes is not None:
            emb = emb + u.label_emb(call.host.y)
        return emb

    def encode(self, call: ModelCall, emb) -> Features:
        return self.run_encoder(call, emb, call.host.control)

    def decode(self, call: ModelCall, feats: Features, emb):
        return self.run_decoder(call, feats, emb, call.host.control)

    def run_encoder(self, call: ModelCall, emb, control) -> Features:
        """Input blocks + middle block on ``call.x``; ``control['input']`` (T2I adapters) is applied here."""
        u, hc = self.unet, call.host
        to = hc.to
        to["original_shape"] = list(call.x.shape)
        to["transformer_index"] = 0
        patches = to.get("patches", {})
        mods = self._modifiers(to)
        fte = self.module.forward_timestep_embed
        vid = self._video(hc.kwargs)
        hs, h = [], call.x
        for i, module in enumerate(u.input_blocks):
            to["block"] = ("input", i)
            h = _modify(mods, h, "before", to)
            h = fte(module, h, emb, call.context, to, **vid)
            h = control_residual(h, control, "input", in_place=True)
            h = _modify(mods, h, "after", to)
            for p in patches.get("input_block_patch", []):
                h = p(h, to)
            hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, to)
        to["block"] = ("middle", 0)
        h = _modify(mods, h, "before", to)
        if u.middle_block is not None:
            h = fte(u.middle_block, h, emb, call.context, to, **vid)
        # the middle residual, Forge's "after" modifiers and middle_block_after_patch belong to every step: decode
        return Features(hs, h, LdmMeta(to["transformer_index"], call.x.dtype))

    def run_decoder(self, call: ModelCall, feats: Features, emb, control):
        """The middle block's per-step part, the output blocks and the head on cached features.  Reads the
        latent only for a ``middle_block_after_patch`` (then ``own_step_reason`` kept the call its own)."""
        u, hc = self.unet, call.host
        to = hc.to
        if call.x is not None:   # a step's own call skips the encoder, which sets this for attention patches
            to["original_shape"] = list(call.x.shape)   # (ToMe, HyperTile); batched calls carry their own
        to["transformer_index"] = feats.meta.transformer_index
        patches = to.get("patches", {})
        out_patches = patches.get("output_block_patch", [])
        mods, after = self._modifiers(to), self._after_patches(to)
        fte = self.module.forward_timestep_embed
        vid = self._video(hc.kwargs)
        to["block"] = ("middle", 0)
        h = control_residual(feats.mid, control, "middle", in_place=False)
        if (mods or after) and h is feats.mid:
            h = h.clone()
        h = _modify(mods, h, "after", to)
        for p in after:
            h = p({"h": h, "x": call.x, "emb": emb, "context": call.context, "y": hc.y, "timesteps": call.timesteps,
                   "transformer_options": to})["h"]
        hs = list(feats.skips)
        for i, module in enumerate(u.output_blocks):
            to["block"] = ("output", i)
            hsp = control_residual(hs.pop(), control, "output", in_place=False)
            if out_patches:
                h = h.clone() if h is feats.mid else h
                hsp = hsp.clone() if hsp is feats.skips[len(hs)] else hsp
                for p in out_patches:
                    h, hsp = p(h, hsp, to)
            if hsp is not None or not self.host.optional_skip:
                h = torch.cat([h, hsp], dim=1)
            del hsp
            output_shape = hs[-1].shape if hs else None
            h = _modify(mods, h, "before", to)
            h = fte(module, h, emb, call.context, to, output_shape, **vid)
            h = _modify(mods, h, "after", to)
        dtype = feats.meta.dtype
        if not self.host.cast_last:
            h = h.type(dtype)
            return u.id_predictor(h) if u.predict_codebook_ids else u.out(h)
        to["block"] = ("last", 0)
        h = _modify(mods, h, "before", to)
        h = u.id_predictor(h) if u.predict_codebook_ids else u.out(h)
        h = _modify(mods, h, "after", to)
        return h.type(dtype)

    def tile(self, call: ModelCall, n, timesteps, sigmas) -> ModelCall:
        """A decoder-only call for ``n`` steps' rows stacked step-major, with no ControlNet residuals."""
        hc = call.host
        b = call.rows
        to = tile_options(hc.to, n, b, sigmas)   # the batched call sees a consistent, step-major view of the batch
        to["original_shape"] = [b * n] + list(hc.to.get("original_shape", [b]))[1:]
        kwargs = tile_kwargs(hc.kwargs, n)
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=repeat_rows(call.context, n),
                       host=LdmCall(repeat_rows(hc.y, n), None, to, kwargs))

    def own_step_reason(self, call: ModelCall) -> str | None:
        """Why this call's decoder must run on the step's own call, never in a batch of steps, or None."""
        if self._after_patches(call.host.to):
            return "a middle_block_after_patch (SUPIR) reads each step's latent"
        control = call.host.control
        if isinstance(control, dict) and any(len(control.get(k) or []) for k in ("middle", "output")):
            return "ControlNet residuals change every step"
        return None
