"""ComfyUI's Wan adapter: the transformer split (``fasterdiffusion/transformer.py``) on ComfyUI's ``WanModel`` (Wan 2.1
T2V / I2V / FLF / Fun, each expert of Wan 2.2 A14B, Wan 2.2 TI2V 5B), mirrored line for line from ``WanModel._forward``
and ``forward_orig`` of ComfyUI 0.3.75 and 0.33.

Per step only the time embedding changes (``embed``: ``e`` and its projection ``e0`` of the call's timesteps, per
token where Wan 2.2's ``process_timestep`` makes them so).  The encoder (key steps): padding, ``time_dim_concat``,
``patch_embedding``, the reference latent's tokens (``ref_conv``), 0.33's in-context latents (Bernini), the rotary
freqs (``rope_encode``, which reads ``rope_options``), the text (+ CLIP image) context and ``blocks[:N]``; its
features are the hidden state after block N (``Features.mid``).  The decoder (every step, batched over a group):
``blocks[N:]``, ``head`` with the step's own ``e``, the crops and ``unpatchify``.  The freqs and the context are the
same at every step of a call slot; the decoder recomputes them from its own (possibly tiled) call, as the host does.

Which of the host's patch points a forward honours is read from its source (``host_forward``): ComfyUI 0.33 sets
``grid_sizes`` / ``total_blocks`` / ``block_type`` / ``block_index`` in transformer_options and runs ``double_block``
patches after every block (they read the step's latent, so decoders with them run on the step's own call).  A forward
that does anything the mirror does not know (``KNOWN``) runs unpatched with one reason.  Subclasses (VaceWanModel,
CameraWanModel, HumoWanModel, WanModel_S2V, the animate / SCAIL / dancer models) are other classes: they pass
through (``adapters.adapter_class`` matches the exact class).  Deliberate difference from the host: a cached hidden
state handed to a patch is cloned first (patches may add into it in place).
"""
from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from dataclasses import dataclass, replace

import torch

import comfy.ldm.common_dit
from comfy.ldm.wan.model import WanModel

from ...fasterdiffusion import transformer
from ...fasterdiffusion.ldm import forward_outline, outline_difference, tile_kwargs, tile_options
from ...fasterdiffusion.runtime import Features, ModelCall, repeat_rows

MODEL = "Wan"
ENCODER_FRACTION = transformer.PAPER_FRACTION     # the encoder's share of Wan's blocks (the paper's DiT split)

# What the mirror knows of WanModel's forward: the union of ComfyUI 0.3.75's and 0.33's ``_forward`` + ``forward_orig``
# outlines (``forward_outline``; 0.3.75's is a subset of 0.33's).
KNOWN = {
    "self": {"blocks", "dim", "forward_orig", "freq_dim", "head", "img_emb", "patch_embedding", "patch_size",
             "ref_conv", "rope_encode", "text_embedding", "time_embedding", "time_projection", "unpatchify"},
    "calls": {"sinusoidal_embedding_1d"},
    "keys": {"block_index", "block_type", "context_latents", "dit", "double_block", "grid_sizes", "img", "patches",
             "patches_replace", "pe", "reference_latent", "total_blocks", "transformer_options", "txt", "vec"},
}
LATENT_PATCHES = "a double_block patch reads each step's latent"


@dataclass(frozen=True)
class HostForward:
    """What one host's WanModel forward does beyond 0.3.75's, read from its source; ``difference``: what the mirror
    does not know of it, in words (the model then runs unpatched), or None."""
    block_info: bool = False           # 0.33: transformer_options total_blocks / block_type / block_index
    grid_sizes: bool = False           # 0.33: transformer_options["grid_sizes"]
    double_block_patch: bool = False   # 0.33: patches["double_block"] after every block
    context_latents: bool = False      # 0.33: in-context reference latents (Bernini)
    difference: str | None = None


def read_forward(forward: str, forward_orig: str) -> HostForward:
    """The ``HostForward`` of a WanModel's ``_forward`` and ``forward_orig`` sources."""
    outline = {kind: set() for kind in KNOWN}
    for source in (forward, forward_orig):
        for kind, names in forward_outline(ast.parse(textwrap.dedent(source))).items():
            outline[kind] |= names
    covered = {"blocks", "head", "unpatchify", "patch_embedding"} <= outline["self"]
    difference = outline_difference(outline, KNOWN, None if covered else "does not run patch_embedding, blocks, head "
                                    "and unpatchify itself", "WanModel", "ComfyUI 0.3.75 and 0.33")
    keys = outline["keys"]
    return HostForward("block_index" in keys, "grid_sizes" in keys, "double_block" in keys, "context_latents" in keys,
                       difference)


@functools.cache
def host_forward(cls) -> HostForward:
    """``read_forward`` of ``cls``'s ``_forward`` and ``forward_orig``."""
    try:
        sources = [inspect.getsource(getattr(cls, name)) for name in ("_forward", "forward_orig")]
    except (OSError, TypeError, AttributeError):
        return HostForward(difference=f"the source of {cls.__name__}'s forward is not shipped, so FasterDiffusion "
                                      f"cannot tell what it does")
    return read_forward(*sources)


def unsupported_reason(unet) -> str | None:
    """Why this adapter cannot serve ``unet``, or None if it can."""
    if type(unet) is not WanModel:
        return f"{type(unet).__name__} is not ComfyUI's WanModel (Wan 2.1, Wan 2.2)"
    return host_forward(type(unet)).difference


@dataclass
class WanCall:
    """The host side of one call: CLIP vision features (I2V), the time-concatenated latent, transformer_options and
    the forward's extra keyword arguments (reference_latent, denoise_mask, context_latents, ...)."""
    clip_fea: torch.Tensor | None
    time_dim_concat: torch.Tensor | None
    to: dict
    kwargs: dict


@dataclass
class WanMeta:
    """Shapes the decoder needs from the key step (the same for every step of a call slot): the latent's unpadded
    (t, h, w), the rotary length in frames, the token grid, the reference tokens in front (``ref_len``), the tokens
    before the in-context latents (``main_len``, 0.33) and the image tokens' offset handed to patches."""
    shape: tuple
    t_len: int
    grid_sizes: tuple
    ref_len: int | None
    main_len: int | None
    img_offset: int


def step_timesteps(call: ModelCall, n: int, timesteps, sigmas):
    """The per-token timesteps of ``n`` stacked steps (Wan 2.2 TI2V under a noise mask: ``WAN22.process_timestep``
    scales each latent frame's timestep by its mean denoise mask, ComfyUI 0.3.75 and 0.33).  The runtime stacks the
    call's own rows first (kept) and each other step's model timestep expanded over the tokens: mapped as the host
    maps it.  Per-row timesteps pass through."""
    if call.timesteps.ndim < 2:
        return timesteps
    mask = call.host.kwargs["denoise_mask"]
    rows = []
    for t, s in zip(timesteps.chunk(n), sigmas.chunk(n)):
        if torch.equal(s, call.sigmas):
            rows.append(call.timesteps)
        else:
            t = t[:, 0]
            rows.append((torch.mean(mask[:, :, :, :, :], dim=(1, 3, 4), keepdim=True)
                         * t.view([t.shape[0]] + [1] * (mask.ndim - 1))).reshape(t.shape[0], -1))
    return torch.cat(rows)


class WanAdapter:
    """The runtime's ``UNetAdapter`` for ComfyUI's WanModel, split after its first ``n`` blocks."""
    unet_class = WanModel
    unsupported_reason = staticmethod(unsupported_reason)

    def __init__(self, unet, n: int):
        self.unet = unet
        self.n = n
        self.host = host_forward(type(unet))
        self.module = sys.modules[type(unet).__module__]

    @staticmethod
    def make_call(unet, a: dict, slot) -> ModelCall:
        """The ModelCall of ``WanModel._forward``'s bound arguments (``adapters.bind``)."""
        to = a["transformer_options"]
        return ModelCall(a["x"], a["timestep"], a["context"], to.get("sigmas"), a["x"].dtype, slot,
                         WanCall(a["clip_fea"], a["time_dim_concat"], to, a["kwargs"]))

    @classmethod
    def for_run(cls, unet, settings):
        return cls(unet, transformer.encoder_blocks(settings.encoder_blocks, len(unet.blocks), MODEL, ENCODER_FRACTION))

    # ---------------------------------------------------------------------------------- per call, as _forward

    def _input(self, call: ModelCall):
        """``_forward``'s latent: padded to the patch size, the time-concatenated latent appended; and the rotary
        length in frames."""
        u, hc = self.unet, call.host
        bs, c, t, h, w = call.x.shape
        x = comfy.ldm.common_dit.pad_to_patch_size(call.x, u.patch_size)
        t_len = t
        if hc.time_dim_concat is not None:
            time_dim_concat = comfy.ldm.common_dit.pad_to_patch_size(hc.time_dim_concat, u.patch_size)
            x = torch.cat([x, time_dim_concat], dim=2)
            t_len = x.shape[2]
        if u.ref_conv is not None and "reference_latent" in hc.kwargs:
            t_len += 1
        return x, t_len

    def _freqs(self, call: ModelCall, t_len, h, w, device, dtype):
        """``_forward``'s rotary freqs (with the call's rope_options) and the kwargs it hands on (0.33: the
        in-context latents padded, one rope block each)."""
        u, kwargs = self.unet, call.host.kwargs
        to = call.host.to
        freqs = u.rope_encode(t_len, h, w, device=device, dtype=dtype, transformer_options=to)
        context_latents = kwargs.get("context_latents", None) if self.host.context_latents else None
        if context_latents is not None:
            context_latents = [comfy.ldm.common_dit.pad_to_patch_size(lat, u.patch_size) for lat in context_latents]
            for i, lat in enumerate(context_latents):
                freqs = torch.cat([freqs, u.rope_encode(lat.shape[-3], lat.shape[-2], lat.shape[-1], device=device,
                                                        dtype=dtype, transformer_options=to, source_id=i + 1)], dim=1)
            kwargs = {**kwargs, "context_latents": context_latents}
        return freqs, kwargs

    def _context(self, call: ModelCall):
        """``forward_orig``'s context: the text embedding, the CLIP image embedding in front of it (I2V)."""
        u, clip_fea = self.unet, call.host.clip_fea
        context = u.text_embedding(call.context)
        context_img_len = None
        if clip_fea is not None:
            if u.img_emb is not None:
                context_clip = u.img_emb(clip_fea)  # bs x 257 x dim
                context = torch.concat([context_clip, context], dim=1)
            context_img_len = clip_fea.shape[-2]
        return context, context_img_len

    def _patches(self, to) -> list:
        return to.get("patches", {}).get("double_block", []) if self.host.double_block_patch else []

    def _blocks(self, x, first, last, emb, freqs, context, context_img_len, to, x_input, img_offset):
        """``forward_orig``'s block loop over ``blocks[first:last]``: dit double_block replace patches, 0.33's
        block info and double_block patches, exactly as the host runs them."""
        u = self.unet
        e, e0 = emb
        patches_replace = to.get("patches_replace", {})
        patches = self._patches(to)
        blocks_replace = patches_replace.get("dit", {})
        if self.host.block_info:
            to["total_blocks"] = len(u.blocks)
            to["block_type"] = "double"
        for i in range(first, last):
            block = u.blocks[i]
            if self.host.block_info:
                to["block_index"] = i
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["img"] = block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                       context_img_len=context_img_len, transformer_options=args["transformer_options"])
                    return out
                out = blocks_replace[("double_block", i)]({"img": x, "txt": context, "vec": e0, "pe": freqs,
                                                           "transformer_options": to}, {"original_block": block_wrap})
                x = out["img"]
            else:
                x = block(x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len,
                          transformer_options=to)
            for p in patches:
                out = p({"img": x, "x": x_input, "vec": e, "block_index": i, "img_offset": img_offset,
                         "transformer_options": to})
                x = out["img"]
        return x

    # ---------------------------------------------------------------------------------- the runtime's protocol

    def embed(self, call: ModelCall):
        """(e, e0): ``forward_orig``'s time embedding of the call's timesteps (per row, or per token) and its
        projection to the blocks' six modulation vectors."""
        u, t = self.unet, call.timesteps
        e = u.time_embedding(self.module.sinusoidal_embedding_1d(u.freq_dim, t.flatten()).to(dtype=call.dtype))
        e = e.reshape(t.shape[0], -1, e.shape[-1])
        e0 = u.time_projection(e).unflatten(2, (6, u.dim))
        return e, e0

    def encode(self, call: ModelCall, emb) -> Features:
        """``_forward`` + ``forward_orig`` up to block ``n``: features = the hidden state after it."""
        u, to = self.unet, call.host.to
        bs, c, t, h, w = call.x.shape
        x, t_len = self._input(call)
        freqs, kwargs = self._freqs(call, t_len, h, w, x.device, x.dtype)
        x_input = x
        x = u.patch_embedding(x.float()).to(x.dtype)
        grid_sizes = x.shape[2:]
        if self.host.grid_sizes:
            to["grid_sizes"] = grid_sizes
        x = x.flatten(2).transpose(1, 2)

        full_ref, img_offset = None, 0
        if u.ref_conv is not None:
            full_ref = kwargs.get("reference_latent", None)
            if full_ref is not None:
                full_ref = u.ref_conv(full_ref).flatten(2).transpose(1, 2)
                x = torch.concat((full_ref, x), dim=1)
                img_offset = full_ref.shape[1]

        context_latents = kwargs.get("context_latents", None) if self.host.context_latents else None
        main_len = x.shape[1]
        if context_latents is not None:
            for lat in context_latents:
                cl = u.patch_embedding(lat.float().to(x.device)).to(x.dtype).flatten(2).transpose(1, 2)
                x = torch.cat([x, cl], dim=1)

        context, context_img_len = self._context(call)
        x = self._blocks(x, 0, self.n, emb, freqs, context, context_img_len, to, x_input, img_offset)
        meta = WanMeta((t, h, w), t_len, grid_sizes, None if full_ref is None else full_ref.shape[1],
                       None if context_latents is None else main_len, img_offset)
        return Features([], x, meta)

    def decode(self, call: ModelCall, features: Features, emb):
        """``forward_orig`` from block ``n`` on ``features`` with the call's own ``e``; ``_forward``'s crop.  Reads
        the latent only for double_block patches (then ``own_step_reason`` kept the call its own)."""
        u, to, m = self.unet, call.host.to, features.meta
        e, e0 = emb
        x = features.mid
        if self.host.grid_sizes:
            to["grid_sizes"] = m.grid_sizes
        freqs, _ = self._freqs(call, m.t_len, m.shape[1], m.shape[2], x.device, call.dtype)
        context, context_img_len = self._context(call)
        x_input = None
        if self._patches(to):
            x_input = self._input(call)[0]
        if ("double_block", self.n) in to.get("patches_replace", {}).get("dit", {}):
            x = x.clone()     # cached: the patch replacing the decoder's first block may add into it in place
        x = self._blocks(x, self.n, len(u.blocks), emb, freqs, context, context_img_len, to, x_input, m.img_offset)

        # head
        x = u.head(x, e)
        if m.main_len is not None:
            x = x[:, :m.main_len]
        if m.ref_len is not None:
            x = x[:, m.ref_len:]
        # unpatchify
        x = u.unpatchify(x, m.grid_sizes)
        t, h, w = m.shape
        return x[:, :, :t, :h, :w]

    def tile(self, call: ModelCall, n, timesteps, sigmas) -> ModelCall:
        """A decoder-only call for ``n`` steps' rows stacked step-major: text and CLIP conditioning, the extra
        arguments' tensors (per row) and transformer_options' per-row lists repeated ``n`` times; lists among the
        extra arguments (0.33's context_latents, read for their shapes only) kept."""
        hc = call.host
        kwargs = tile_kwargs(hc.kwargs, n)
        return replace(call, x=None, timesteps=step_timesteps(call, n, timesteps, sigmas), sigmas=sigmas,
                       context=repeat_rows(call.context, n),
                       host=WanCall(repeat_rows(hc.clip_fea, n), repeat_rows(hc.time_dim_concat, n),
                                    tile_options(hc.to, n, call.rows, sigmas), kwargs))

    def own_step_reason(self, call: ModelCall) -> str | None:
        """Why this call's decoder must run on the step's own call, never in a batch of steps, or None.  I2V's
        concatenated image latent is part of ``x`` (encoder side); only patches that read the latent, and per-token
        timesteps the runtime cannot map to other steps, keep a decoder on its own step."""
        if self._patches(call.host.to):
            return LATENT_PATCHES
        if call.timesteps.ndim > 1 and ("denoise_mask" not in call.host.kwargs or call.sigmas is None):
            return "per-token timesteps without the denoise mask they come from change every step"
        return None
