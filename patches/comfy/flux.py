"""ComfyUI's Flux adapter: the transformer split (``fasterdiffusion/transformer.py``) on ``comfy.ldm.flux.model.Flux``
(Flux.1 dev/schnell/Kontext, Flux 2 in ComfyUI 0.33), mirroring ``Flux._forward`` and ``Flux.forward_orig`` of
ComfyUI 0.3.75 and 0.33 line for line.

The blocks are counted over the double-stream blocks, then the single-stream ones.  The encoder (key steps only) is
``_forward``'s patchify and position ids (reference latents included), ``img_in``/``txt_in``, the ``post_input``
patches, the rotary embedding and the first N blocks; its features are the image tokens (``Features.mid``) and the
text tokens (``Features.skips[0]``) after double block N-1, or the joint single-stream tokens (``mid``, no skips)
after a single block.  The decoder (every step, batched over a group) is the remaining blocks, the final layer on the
step's own modulation vector and the unpatchify.  What is per call besides the features: the modulation vectors
(``embed``, from each row's timestep, guidance and pooled text), ControlNet residuals, the attention mask; the
rotary embedding and the token layout are the key step's (they depend on shapes and reference latents only, which
the call slot fixes) and are repeated per step for a batched call.

Which of the hosts' differences a forward has is read from its source (``HostFlux``), never from a version string:

  options_copy          0.33: forward_orig works on a copy of transformer_options (0.3.75 writes block_index,
                        block_type and total_blocks into the caller's)
  post_input_options    0.33: post_input patches also get transformer_options
  ref_options           0.33: reference latents' ids see rope_options; the options carry their token counts
  img_slice             0.33: the single-stream blocks' options say where the image tokens are
  txt_ids_dims          0.33: the text ids' position axes are a parameter (0.3.75: axis 3 of a 4-axis Flux 2)
  timestep_zero         0.33: Flux 2 edit references at timestep 0 (ref_latents_method "index_timestep_zero"):
                        the modulation runs on [t, 0] per row and applies per token range

A forward that uses anything else (``KNOWN``) runs unpatched with one log line.  Deliberate differences from the
host: the decoder works on a copy of the cached features (the blocks add into their inputs in place).  Block
patches (``patches_replace["dit"]``) run where their block runs: encoder blocks at key steps only.
"""
from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from dataclasses import dataclass, replace

import torch
from einops import rearrange

from comfy.ldm.flux.model import Flux

from ...fasterdiffusion import transformer
from ...fasterdiffusion.ldm import forward_outline, outline_difference, tile_kwargs, tile_options
from ...fasterdiffusion.runtime import Features, ModelCall, repeat_rows

# The split's default, measured on the trained Flux-shaped test model (docs/quality/fashion_flux.md): a DiT's blocks
# all change alike from step to step (no calm encoder), so the PSNR to the full run hardly depends on the split while
# the cost falls with every block skipped; 9 of its 10 blocks was best at equal time and at equal FLOPs (the paper's
# DiT-XL/2 fraction, 18/28, measured worse).  Over Flux's double + single blocks: Flux.1's 19 + 38 = 57 -> 51.
DEFAULT_FRACTION = 0.9

# What the mirror knows of Flux's forward: the union of ComfyUI 0.3.75's and 0.33's ``_forward`` and
# ``forward_orig`` by ``forward_outline``, plus the ``self.params`` fields they read and forward_orig's parameters.
KNOWN = {
    "self": {"double_blocks", "double_stream_modulation_img", "double_stream_modulation_txt", "final_layer",
             "forward_orig", "guidance_in", "img_in", "params", "patch_size", "pe_embedder", "process_img",
             "single_blocks", "single_stream_modulation", "time_in", "txt_in", "txt_norm", "vector_in"},
    "calls": {"invert_slices", "rearrange", "timestep_embedding"},
    "keys": {"attention_mask", "attn_mask", "block_index", "block_type", "dit", "img", "img_ids", "img_slice",
             "input", "modulation_dims", "modulation_dims_img", "output", "patches", "patches_replace", "pe",
             "post_input", "ref_latents_method", "reference_image_num_tokens", "total_blocks", "transformer_options",
             "txt", "txt_ids", "vec"},
    "params": {"axes_dim", "default_ref_method", "global_modulation", "guidance_embed", "ref_index_scale",
               "txt_ids_dims", "vec_in_dim"},
    "args": {"img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance", "control", "timestep_zero_index",
             "transformer_options", "attn_mask"},
}
SOURCES = ("_forward", "forward_orig")


@dataclass(frozen=True)
class HostFlux:
    """What one host's Flux forward does, read from its source (see the module docstring); ``difference``: what the
    mirror does not know of it, in words (the model then runs unpatched), or None."""
    options_copy: bool = False
    post_input_options: bool = False
    ref_options: bool = False
    img_slice: bool = False
    txt_ids_dims: bool = False
    timestep_zero: bool = False
    difference: str | None = None


def flux_outline(trees: list, args: list) -> dict[str, set[str]]:
    """``forward_outline`` of the parsed sources, plus the ``self.params`` fields they read and ``args`` (the names
    of forward_orig's parameters)."""
    out = {kind: set() for kind in KNOWN}
    for tree in trees:
        for kind, names in forward_outline(tree).items():
            out[kind] |= names
        out["params"] |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                          and isinstance(n.value, ast.Attribute) and n.value.attr == "params"
                          and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    out["args"] = set(args)
    return out


def _copies_options(tree) -> bool:
    """``transformer_options = transformer_options.copy()``"""
    return any(isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Attribute)
               and n.value.func.attr == "copy" and isinstance(n.value.func.value, ast.Name)
               and n.value.func.value.id == "transformer_options"
               and any(isinstance(t, ast.Name) and t.id == "transformer_options" for t in n.targets)
               for n in ast.walk(tree))


def _dict_keys(tree, having: str) -> set:
    """The string keys of the dict literals that have the key ``having``."""
    keys = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Dict):
            ks = {k.value for k in n.keys if isinstance(k, ast.Constant)}
            keys |= ks if having in ks else set()
    return keys


def _ref_gets_options(tree) -> bool:
    """``self.process_img(ref, ..., transformer_options=...)``"""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "process_img"
               and n.args and isinstance(n.args[0], ast.Name) and n.args[0].id == "ref"
               and any(k.arg == "transformer_options" for k in n.keywords) for n in ast.walk(tree))


def read_flux_forward(forward_source: str, orig_source: str, orig_args: list) -> HostFlux:
    """The ``HostFlux`` of a host's ``_forward`` and ``forward_orig`` sources (``orig_args``: forward_orig's
    parameter names)."""
    fwd, orig = ast.parse(textwrap.dedent(forward_source)), ast.parse(textwrap.dedent(orig_source))
    outline = flux_outline([fwd, orig], [a for a in orig_args if a != "self"])
    covered = {"double_blocks", "single_blocks", "final_layer", "forward_orig"} <= outline["self"]
    difference = outline_difference(outline, KNOWN, None if covered else "does not run double_blocks, single_blocks "
                                    "and final_layer through forward_orig", "Flux", "ComfyUI 0.3.75 and 0.33")
    return HostFlux(options_copy=_copies_options(orig),
                    post_input_options="transformer_options" in _dict_keys(orig, "txt_ids"),
                    ref_options=_ref_gets_options(fwd) or "reference_image_num_tokens" in outline["keys"],
                    img_slice="img_slice" in outline["keys"], txt_ids_dims="txt_ids_dims" in outline["params"],
                    timestep_zero="timestep_zero_index" in outline["args"], difference=difference)


@functools.cache
def host_flux(cls) -> HostFlux:
    """``read_flux_forward`` of ``cls``'s ``_forward`` and ``forward_orig``."""
    try:
        sources = [inspect.getsource(getattr(cls, name)) for name in SOURCES]
    except (OSError, TypeError):
        return HostFlux(difference=f"the source of {cls.__name__}'s forward is not shipped, so FasterDiffusion "
                                   "cannot tell what it does")
    return read_flux_forward(*sources, list(inspect.signature(cls.forward_orig).parameters))


def unsupported_reason(unet) -> str | None:
    """Why the split cannot serve this Flux (the exact class, checked by the glue), or None.  A forward replaced on
    the instance (an object patch, as caching and identity packs set ``diffusion_model.forward_orig``) is honoured by
    the host and unknown to the mirror."""
    replaced = [name for name in SOURCES + ("process_img",) if name in vars(unet)]
    if replaced:
        return (f"this Flux model's {', '.join(replaced)} is replaced on the model (an object patch from another "
                "node), which FasterDiffusion's split would go around: it runs unpatched")
    return host_flux(type(unet)).difference


# --------------------------------------------------------------------------------------------------
# The split, line for line with the host's forward
# --------------------------------------------------------------------------------------------------

@dataclass
class FluxCall:
    """The host side of one call: ``_forward``'s arguments besides x, timestep and context."""
    y: torch.Tensor | None
    guidance: torch.Tensor | None
    ref_latents: list | None
    control: dict | None
    to: dict
    kwargs: dict


@dataclass
class FluxEmb:
    """The step's modulation: ``vec_orig`` (the final layer's), ``double`` (the double blocks': the vector, or
    global modulation's (img, txt) pair) and ``single`` (the single blocks')."""
    vec_orig: torch.Tensor
    double: object
    single: object


@dataclass
class FluxMeta:
    """The key step's token layout, for the decoder: the rotary embedding ``pe`` (rows of the encoder call), the
    text tokens ``txt_len``, the image tokens ``img_tokens`` (before reference tokens) and the latent's patch grid
    and size; ``modulation_dims``: Flux 2's per-token-range modulation (timestep_zero), else None."""
    pe: torch.Tensor | None
    rows: int
    txt_len: int
    img_tokens: int
    grid: tuple
    size: tuple
    ref_num_tokens: list | None
    modulation_dims: list | None


def make_call(unet, a: dict, slot) -> ModelCall:
    """The ModelCall of ``Flux._forward``'s bound arguments (``adapters.bind``)."""
    x, to = a["x"], a["transformer_options"]
    return ModelCall(x, a["timestep"], a["context"], to.get("sigmas"), x.dtype, slot,
                     FluxCall(a["y"], a["guidance"], a["ref_latents"], a["control"], to, a["kwargs"]))


def _replaced_double(patch, block, img, txt, vec, pe, attn_mask, to, extra):
    """A ``("double_block", i)`` patch around ``block``, as forward_orig calls it."""
    def block_wrap(args):
        out = {}
        out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                       attn_mask=args.get("attn_mask"),
                                       transformer_options=args.get("transformer_options"), **extra)
        return out
    out = patch({"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask, "transformer_options": to},
                {"original_block": block_wrap})
    return out["img"], out["txt"]


def _replaced_single(patch, block, img, vec, pe, attn_mask, to, extra):
    """A ``("single_block", i)`` patch around ``block``, as forward_orig calls it."""
    def block_wrap(args):
        out = {}
        out["img"] = block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                           transformer_options=args.get("transformer_options"), **extra)
        return out
    out = patch({"img": img, "vec": vec, "pe": pe, "attn_mask": attn_mask, "transformer_options": to},
                {"original_block": block_wrap})
    return out["img"]


def _residuals(control, key) -> list:
    return (control.get(key) or []) if control is not None else []


class FluxAdapter:
    """The runtime's ``UNetAdapter`` for ComfyUI's ``Flux``, split after ``n`` blocks (double, then single)."""
    unet_class = Flux
    unsupported_reason = staticmethod(unsupported_reason)
    make_call = staticmethod(make_call)

    def __init__(self, unet, n: int):
        self.unet = unet
        self.n = n
        self.host = host_flux(type(unet))
        self.module = sys.modules[type(unet).__module__]

    @staticmethod
    def depth(unet) -> int:
        return len(unet.double_blocks) + len(unet.single_blocks)

    @classmethod
    def for_run(cls, unet, settings):
        return cls(unet, transformer.encoder_blocks(settings.encoder_blocks, cls.depth(unet), "Flux", DEFAULT_FRACTION))

    # ---------------------------------------------------------------------------- per-call conditioning

    def _ref_index(self, call: ModelCall):
        """``_forward``'s reference-latent method and the ``index`` its loop ends on (no latents: None, 0)."""
        hc, p = call.host, self.unet.params
        if hc.ref_latents is None:
            return None, 0
        method = hc.kwargs.get("ref_latents_method", p.default_ref_method)
        index = 0
        for _ in hc.ref_latents:
            if method in ("index", "index_timestep_zero"):
                index += p.ref_index_scale
            elif method == "uxo":
                index = 0
            else:
                index = 1
        return method, index

    def _timestep_zero(self, call: ModelCall) -> bool:
        """0.33: reference tokens modulated at timestep 0 (``timestep_zero_index`` is set)."""
        method, index = self._ref_index(call)
        return self.host.timestep_zero and method == "index_timestep_zero" and index > 0

    def embed(self, call: ModelCall) -> FluxEmb:
        """forward_orig's modulation vector (time + guidance + pooled text; global modulation's pairs)."""
        u, hc, p = self.unet, call.host, self.unet.params
        dtype = call.dtype     # img_in keeps the latent's dtype
        timesteps = call.timesteps
        zero = self._timestep_zero(call)
        if zero:
            timesteps = torch.cat([timesteps, timesteps * 0], dim=0)
        vec = u.time_in(self.module.timestep_embedding(timesteps, 256).to(dtype))
        if p.guidance_embed:
            if hc.guidance is not None:
                vec = vec + u.guidance_in(self.module.timestep_embedding(hc.guidance, 256).to(dtype))
        if u.vector_in is not None:
            y = hc.y
            if y is None:
                y = torch.zeros((call.rows, p.vec_in_dim), device=timesteps.device, dtype=dtype)
            vec = vec + u.vector_in(y[:, :p.vec_in_dim])
        vec_orig = txt_vec = vec
        if zero:
            batch = vec.shape[0] // 2
            vec_orig = vec_orig.reshape(2, batch, vec.shape[1]).movedim(0, 1)
            txt_vec = vec[:batch]
        if not p.global_modulation:
            return FluxEmb(vec_orig, vec, vec)
        double = (u.double_stream_modulation_img(vec_orig), u.double_stream_modulation_txt(txt_vec))
        single, _ = u.single_stream_modulation(vec_orig)
        return FluxEmb(vec_orig, double, single)

    # ---------------------------------------------------------------------------- the encoder

    def _inputs(self, call: ModelCall):
        """``_forward`` up to forward_orig: (img, img_ids, txt_ids, transformer_options, meta without pe)."""
        u, hc, p = self.unet, call.host, self.unet.params
        x, context, to = call.x, call.context, hc.to
        bs, c, h_orig, w_orig = x.shape
        patch_size = u.patch_size
        h_len = ((h_orig + (patch_size // 2)) // patch_size)
        w_len = ((w_orig + (patch_size // 2)) // patch_size)
        img, img_ids = u.process_img(x, transformer_options=to)
        img_tokens = img.shape[1]
        ref_num_tokens = None
        if hc.ref_latents is not None:
            h = 0
            w = 0
            index = 0
            ref_latents_method = hc.kwargs.get("ref_latents_method", p.default_ref_method)
            ref_num_tokens = []
            for ref in hc.ref_latents:
                if ref_latents_method in ("index", "index_timestep_zero"):
                    index += p.ref_index_scale
                    h_offset = 0
                    w_offset = 0
                elif ref_latents_method == "uxo":
                    index = 0
                    h_offset = h_len * patch_size + h
                    w_offset = w_len * patch_size + w
                    h += ref.shape[-2]
                    w += ref.shape[-1]
                else:
                    index = 1
                    h_offset = 0
                    w_offset = 0
                    if ref.shape[-2] + h > ref.shape[-1] + w:
                        w_offset = w
                    else:
                        h_offset = h
                    h = max(h, ref.shape[-2] + h_offset)
                    w = max(w, ref.shape[-1] + w_offset)
                ref_to = {"transformer_options": to} if self.host.ref_options else {}
                kontext, kontext_ids = u.process_img(ref, index=index, h_offset=h_offset, w_offset=w_offset, **ref_to)
                img = torch.cat([img, kontext], dim=1)
                img_ids = torch.cat([img_ids, kontext_ids], dim=1)
                ref_num_tokens.append(kontext.shape[1])
            if not self.host.ref_options:
                ref_num_tokens = None
        modulation_dims = None
        if self._timestep_zero(call):
            timestep_zero_index = [[img_tokens, img_ids.shape[1]]]
            modulation_dims = []
            for s in self.module.invert_slices(timestep_zero_index, img.shape[1]):
                modulation_dims.append((s[0], s[1], 0))
            for s in timestep_zero_index:
                modulation_dims.append((s[0], s[1], 1))
        to = self._options(to, ref_num_tokens)
        txt_ids = torch.zeros((bs, context.shape[1], len(p.axes_dim)), device=x.device, dtype=torch.float32)
        for i in self._txt_id_axes():
            txt_ids[:, :, i] = torch.linspace(0, context.shape[1] - 1, steps=context.shape[1], device=x.device,
                                              dtype=torch.float32)
        meta = FluxMeta(None, bs, 0, img_tokens, (h_len, w_len), (h_orig, w_orig), ref_num_tokens, modulation_dims)
        return img, img_ids, txt_ids, to, meta

    def _txt_id_axes(self) -> list:
        p = self.unet.params
        if self.host.txt_ids_dims:
            return list(p.txt_ids_dims)
        return [3] if len(p.axes_dim) == 4 else []       # 0.3.75: Flux 2

    def _options(self, to: dict, ref_num_tokens) -> dict:
        """The transformer_options forward_orig's blocks see: 0.33 copies them (with the reference token counts)."""
        if ref_num_tokens is not None:
            to = to.copy()
            to["reference_image_num_tokens"] = ref_num_tokens
        return to.copy() if self.host.options_copy else to

    def encode(self, call: ModelCall, emb: FluxEmb) -> Features:
        """``_forward`` and forward_orig up to block ``n``."""
        u = self.unet
        img, img_ids, txt_ids, to, meta = self._inputs(call)
        patches = to.get("patches", {})
        txt = call.context
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        img = u.img_in(img)
        if getattr(u, "txt_norm", None) is not None:
            txt = u.txt_norm(txt)
        txt = u.txt_in(txt)
        if "post_input" in patches:
            for p in patches["post_input"]:
                args = {"img": img, "txt": txt, "img_ids": img_ids, "txt_ids": txt_ids}
                if self.host.post_input_options:
                    args["transformer_options"] = to
                out = p(args)
                img = out["img"]
                txt = out["txt"]
                img_ids = out["img_ids"]
                txt_ids = out["txt_ids"]
        if img_ids is not None:
            ids = torch.cat((txt_ids, img_ids), dim=1)
            pe = u.pe_embedder(ids)
        else:
            pe = None
        meta.pe, meta.txt_len = pe, txt.shape[1]
        control = call.host.control
        attn_mask = call.host.kwargs.get("attention_mask", None)
        depth = len(u.double_blocks)
        img, txt = self._double(range(min(self.n, depth)), img, txt, emb, meta, pe, attn_mask, control, to)
        if self.n <= depth:
            return Features([txt], img, meta)
        img = self._join(img, txt)
        img = self._single(range(self.n - depth), img, emb, meta, pe, attn_mask, control, to)
        return Features([], img, meta)

    # ---------------------------------------------------------------------------- the blocks

    def _double(self, indices, img, txt, emb, meta, pe, attn_mask, control, to):
        """forward_orig's double-stream loop over ``indices``, ControlNet ``input`` residuals after each block."""
        u = self.unet
        blocks_replace = to.get("patches_replace", {}).get("dit", {})
        extra = {} if meta.modulation_dims is None else {"modulation_dims_img": meta.modulation_dims}
        to["total_blocks"] = len(u.double_blocks)
        to["block_type"] = "double"
        for i in indices:
            block = u.double_blocks[i]
            to["block_index"] = i
            if ("double_block", i) in blocks_replace:
                img, txt = _replaced_double(blocks_replace[("double_block", i)], block, img, txt, emb.double, pe,
                                            attn_mask, to, extra)
            else:
                img, txt = block(img=img, txt=txt, vec=emb.double, pe=pe, attn_mask=attn_mask,
                                 transformer_options=to, **extra)
            if control is not None:  # Controlnet
                control_i = control.get("input")
                if i < len(control_i):
                    add = control_i[i]
                    if add is not None:
                        img[:, :add.shape[1]] += add
        return img, txt

    @staticmethod
    def _join(img, txt):
        """Between the streams: forward_orig's fp16 clamp and the text-then-image concatenation."""
        if img.dtype == torch.float16:
            img = torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504)
        return torch.cat((txt, img), 1)

    def _single(self, indices, img, emb, meta, pe, attn_mask, control, to):
        """forward_orig's single-stream loop over ``indices``, ControlNet ``output`` residuals after each block."""
        u = self.unet
        txt_len = meta.txt_len
        blocks_replace = to.get("patches_replace", {}).get("dit", {})
        extra = {}
        if meta.modulation_dims is not None:
            extra["modulation_dims"] = [(0 if d[0] == 0 else d[0] + txt_len, d[1] + txt_len, d[2])
                                        for d in meta.modulation_dims]
        to["total_blocks"] = len(u.single_blocks)
        to["block_type"] = "single"
        if self.host.img_slice:
            to["img_slice"] = [txt_len, img.shape[1]]
        for i in indices:
            block = u.single_blocks[i]
            to["block_index"] = i
            if ("single_block", i) in blocks_replace:
                img = _replaced_single(blocks_replace[("single_block", i)], block, img, emb.single, pe, attn_mask,
                                       to, extra)
            else:
                img = block(img, vec=emb.single, pe=pe, attn_mask=attn_mask, transformer_options=to, **extra)
            if control is not None:  # Controlnet
                control_o = control.get("output")
                if i < len(control_o):
                    add = control_o[i]
                    if add is not None:
                        img[:, txt_len: txt_len + add.shape[1], ...] += add
        return img

    # ---------------------------------------------------------------------------- the decoder

    def decode(self, call: ModelCall, features: Features, emb: FluxEmb):
        """The blocks after ``n``, the final layer and ``_forward``'s unpatchify, on a copy of ``features`` (the
        blocks add into their inputs in place).  Never reads ``call.x``."""
        u, meta, hc = self.unet, features.meta, call.host
        to = self._options(hc.to, meta.ref_num_tokens)
        k = call.rows // meta.rows                  # steps stacked in a batched call
        pe = meta.pe if meta.pe is None or meta.pe.shape[0] == 1 else repeat_rows(meta.pe, k)
        attn_mask = hc.kwargs.get("attention_mask", None)
        depth = len(u.double_blocks)
        img = features.mid.clone()
        if self.n <= depth:
            txt = features.skips[0].clone()
            img, txt = self._double(range(self.n, depth), img, txt, emb, meta, pe, attn_mask, hc.control, to)
            img = self._join(img, txt)
        img = self._single(range(max(self.n - depth, 0), len(u.single_blocks)), img, emb, meta, pe, attn_mask,
                           hc.control, to)
        img = img[:, meta.txt_len:, ...]
        extra = {} if meta.modulation_dims is None else {"modulation_dims": meta.modulation_dims}
        img = u.final_layer(img, emb.vec_orig, **extra)  # (N, T, patch_size ** 2 * out_channels)
        out = img[:, :meta.img_tokens]
        (h_len, w_len), (h_orig, w_orig) = meta.grid, meta.size
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h_len, w=w_len, ph=u.patch_size,
                         pw=u.patch_size)[:, :, :h_orig, :w_orig]

    # ---------------------------------------------------------------------------- batching

    def tile(self, call: ModelCall, n, timesteps, sigmas) -> ModelCall:
        """A decoder-only call for ``n`` steps' rows stacked step-major, with no ControlNet residuals: the
        conditioning (context, pooled text, guidance, reference latents, tensors among the extra arguments, e.g. the
        attention mask) repeated per step, one sigma per row (as ``LdmSplit.tile``)."""
        hc = call.host
        to = tile_options(hc.to, n, call.rows, sigmas)
        kwargs = tile_kwargs(hc.kwargs, n)
        refs = None if hc.ref_latents is None else [repeat_rows(r, n) for r in hc.ref_latents]
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=repeat_rows(call.context, n),
                       host=FluxCall(repeat_rows(hc.y, n), repeat_rows(hc.guidance, n), refs, None, to, kwargs))

    def own_step_reason(self, call: ModelCall) -> str | None:
        """Fresh ControlNet residuals for a decoder block: each step has its own, never batched."""
        control, depth = call.host.control, len(self.unet.double_blocks)
        decoder_side = (_residuals(control, "input")[self.n:depth]
                        + _residuals(control, "output")[max(self.n - depth, 0):len(self.unet.single_blocks)])
        if any(r is not None for r in decoder_side):
            return "ControlNet residuals change every step"
        return None
