"""FasterDiffusion under ComfyUI's TorchCompileModel: the split's encoder and decoder, each compiled once with the
model's own compile settings, instead of the whole UNet.

TorchCompileModel compiles the UNet's forward with FasterDiffusion's DIFFUSION_MODEL wrapper inside it; placing every
call on its step there would recompile the graph at every step (0.3.75 guards on ``transformer_options``) or bake
the first step's decision into it (0.33 keeps no such guards).  So a run that serves under compile hands each UNet
call to a wrapper dynamo never traces (``torch.compiler.disable``), and the run's encoder and decoder passes go
through two compiled functions per UNet (``CompiledSplit``, kept per UNet and compile settings, never on the UNet):
the encoder's batch is the call's, the decoder's grows with the group, so its rows are padded to the next power of
two (rows are independent; the padding is cut off again) and it compiles once per such bucket, static shapes, never
per step.  Calls with ControlNet
residuals, Forge-style block modifiers or a ``middle_block_after_patch`` and calls the run computes in full run
eagerly (correct, not compiled).  ``graphs`` counts what was compiled, for the stats and the tests.
"""
from __future__ import annotations

import functools
import inspect
import weakref

import torch

from ...fasterdiffusion.ldm import LdmCall, LdmMeta, LdmSplit
from ...fasterdiffusion.runtime import Features, ModelCall
from .ldm import LdmUNetAdapter

COMPILE_KWARGS = "torch_compile_kwargs"        # where TorchCompileModel keeps its settings in model_options
_SPLITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # UNetModel -> {settings: CompiledSplit}


def compile_settings(model_options) -> dict | None:
    """The settings TorchCompileModel compiled this model with, or None."""
    return model_options.get(COMPILE_KWARGS)


def keeps_guards(settings: dict) -> bool:
    """Whether the compiled UNet keeps dynamo's guards on transformer_options (so a run's hook, traced or not, is
    seen).  ComfyUI 0.33's TorchCompileModel drops them with a ``guard_filter_fn`` (torch.compile pops it from the
    stored options, so the node's own source is read too)."""
    if (settings.get("options") or {}).get("guard_filter_fn") is not None:
        return False
    return not _node_filters_guards()


@functools.cache
def _node_filters_guards() -> bool:
    try:
        import comfy_extras.nodes_torch_compile as node
        return "guard_filter_fn" in inspect.getsource(node)
    except (ImportError, OSError, TypeError):
        return False


class CompiledSplit:
    """The split's encoder and decoder passes of one UNet, compiled with ``settings`` (torch.compile's keyword
    arguments as TorchCompileModel stores them); ``graphs``: how many graphs each has compiled."""

    def __init__(self, unet, settings: dict):
        split = LdmSplit(unet)
        self.graphs = {"encoder": 0, "decoder": 0}

        def encoder(x, emb, context, transformer_options, kwargs):
            call = ModelCall(x, emb.new_zeros(x.shape[0]), context, None, x.dtype, (),
                             LdmCall(None, None, transformer_options, kwargs))
            f = split.run_encoder(call, emb, None)
            return f.skips, f.mid, f.meta.transformer_index

        def decoder(skips, mid, emb, context, transformer_options, kwargs, transformer_index, dtype):
            call = ModelCall(None, emb.new_zeros(mid.shape[0]), context, None, dtype, (),
                             LdmCall(None, None, transformer_options, kwargs))
            return split.run_decoder(call, Features(list(skips), mid, LdmMeta(transformer_index, dtype)), emb, None)

        kwargs = {k: v for k, v in settings.items() if k not in ("backend", "dynamic")}
        kwargs["dynamic"] = False         # static shapes: the decoder's batch comes in power-of-two buckets
        self.encoder = torch.compile(encoder, backend=self._counting("encoder", settings.get("backend", "inductor")),
                                     **kwargs)
        self.decoder = torch.compile(decoder, backend=self._counting("decoder", settings.get("backend", "inductor")),
                                     **kwargs)

    def _counting(self, name, backend):
        compile_graph = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

        def counted(gm, example_inputs):
            self.graphs[name] += 1
            return compile_graph(gm, example_inputs)
        return counted


def compiled_split(unet, settings: dict) -> CompiledSplit:
    """The UNet's ``CompiledSplit`` for these settings, made once."""
    per_unet = _SPLITS.setdefault(unet, {})
    key = repr(sorted(settings.items(), key=lambda kv: kv[0]))
    if key not in per_unet:
        per_unet[key] = CompiledSplit(unet, settings)
    return per_unet[key]


class CompiledAdapter(LdmUNetAdapter):
    """ComfyUI's adapter with the encoder and decoder passes compiled where a call allows it."""

    def __init__(self, unet, compiled: CompiledSplit):
        super().__init__(unet)
        self.compiled = compiled

    def run_encoder(self, call: ModelCall, emb, control) -> Features:
        if control is not None or self.host.block_modifiers:
            return super().run_encoder(call, emb, control)
        skips, mid, index = self.compiled.encoder(call.x, emb, call.context, call.host.to, call.host.kwargs)
        return Features(list(skips), mid, LdmMeta(index, call.x.dtype))

    def run_decoder(self, call: ModelCall, feats: Features, emb, control):
        if control is not None or self.host.block_modifiers or self._after_patches(call.host.to):
            return super().run_decoder(call, feats, emb, control)
        if call.x is not None:
            call.host.to["original_shape"] = list(call.x.shape)
        rows = feats.mid.shape[0]
        bucket = 1 << (rows - 1).bit_length()
        pad = (lambda t: t) if bucket == rows else (lambda t: t if t is None else torch.cat(
            [t, t[-1:].expand(bucket - rows, *t.shape[1:])]))
        out = self.compiled.decoder(tuple(pad(s) for s in feats.skips), pad(feats.mid), pad(emb), pad(call.context),
                                    call.host.to, call.host.kwargs, feats.meta.transformer_index, feats.meta.dtype)
        return out[:rows]
