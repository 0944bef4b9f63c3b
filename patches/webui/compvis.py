"""AUTOMATIC1111: the UNet adapter for the CompVis ldm ``UNetModel`` (SD1.x/SD2.x) and the sgm one (SDXL),
and the hooks that hand each UNet call to the engine's ``Run`` without replacing the UNet's ``forward``.

The split mirrors ``UNetModel.forward`` of both packages line for line (``ldm/modules/diffusionmodules/
openaimodel.py`` of stablediffusion, ``sgm/modules/diffusionmodules/openaimodel.py`` of generative-models):

    emb = time_embed(timestep_embedding(t, model_channels)) [+ label_emb(y)]
    h = x.type(self.dtype)  (ldm only; sgm has the cast commented out)
    for module in input_blocks: h = module(h, emb, context); hs.append(h)
    h = middle_block(h, emb, context)
    for module in output_blocks: h = th.cat([h, hs.pop()], dim=1); h = module(h, emb, context)
    return out(h.type(x.dtype))

``timestep_embedding`` and ``th`` are looked up in the UNet's own module at call time, so A1111's hijacks
of them (the dtype-casting ``timestep_embedding``, ``TorchHijackForUnet.cat`` that resizes odd skips)
apply to the split exactly as to the host's forward.

Hooks (``UNetHook``; hosts.md C4): a forward pre-hook decides each call, a forward hook closes it, and
instance ``forward`` wrappers on the input blocks, the middle block, the output blocks and ``out`` serve
cached work.  Whoever owns the UNet's forward (A1111's own, or the ControlNet extension's replacement)
still drives the loop:
  * nobody else owns it ("own" mode): the pre-hook computes the call's output through the adapter (with
    parallel decoder batches) and the host's loop then only replays cheap stand-ins; ``out`` returns
    the computed output;
  * another extension replaced ``forward`` ("shared" mode): sequential propagation; at a key step the
    host's loop runs and the block wrappers capture the encoder features; at a non-key step the input and
    middle blocks return the cached features and the host's decoder runs, so ControlNet adds this step's
    residuals itself (with ``controlnet_reuse``, ``controls``: the key step's raw ControlNet outputs, weighted
    by the extension as it weights this step; controlnet.py).
Nothing here imports A1111: the UNet class is recognised by its module name.
"""
from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
from dataclasses import dataclass, replace

import torch

from fasterdiffusion.runtime import Features, ModelCall, repeat_rows as _rows

log = logging.getLogger("FasterDiffusion")

FAMILIES = {"ldm.modules.diffusionmodules.openaimodel": "ldm", "sgm.modules.diffusionmodules.openaimodel": "sgm"}
PASS = object()      # Run.forward's "run the host's forward unchanged" (the ``full`` thunk returns this)
DEFER = object()     # shared mode: the host's own loop decodes, on the cached encoder features


def family(unet) -> str | None:
    return FAMILIES.get(type(unet).__module__) if type(unet).__name__ == "UNetModel" else None


def unsupported_reason(unet) -> str | None:
    """Why this adapter cannot serve ``unet``, or None if it can."""
    if family(unet) is None:
        return (f"{type(unet).__module__}.{type(unet).__name__} is not the ldm/sgm UNetModel "
                f"(SD1.x, SD2.x, SDXL)")
    if getattr(unet, "predict_codebook_ids", False):
        return "codebook-predicting UNets are not supported"
    return None


@functools.lru_cache(maxsize=None)
def casts_input(cls) -> bool:
    """Whether ``cls.forward`` starts the encoder with ``h = x.type(self.dtype)`` (the SD2-release ldm does;
    sgm has it commented out).  Read from the class's module source, since A1111 replaces the class
    attribute ``forward`` with its SdUnet dispatcher."""
    try:
        source = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return False
    body = source.split(f"class {cls.__name__}(", 1)[-1].split("\nclass ", 1)[0]
    return re.search(r"^[ \t]+h = x\.type\(self\.dtype\)", body, re.MULTILINE) is not None


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------

@dataclass
class CompVisCall:
    """The A1111 side of one call: SDXL's ``y`` vector and any other keyword the caller passed."""
    y: torch.Tensor | None
    kwargs: dict


class CompVisSplit:
    """embed / encode / decode of the ldm or sgm UNetModel.  ``hook`` (optional) is told when the adapter
    itself runs blocks, so the block wrappers pass those calls through."""

    def __init__(self, unet, hook=None):
        self.unet = unet
        self.hook = hook
        self.module = sys.modules[type(unet).__module__]
        self.cast = family(unet) == "ldm" and casts_input(type(unet))

    def _own(self):
        return self.hook.own() if self.hook is not None else _Null()

    def embed(self, call: ModelCall):
        u = self.unet
        t_emb = self.module.timestep_embedding(call.timesteps, u.model_channels, repeat_only=False)
        emb = u.time_embed(t_emb)
        if u.num_classes is not None:
            emb = emb + u.label_emb(call.host.y)
        return emb

    def encode(self, call: ModelCall, emb) -> Features:
        if self.hook is not None and self.hook.shared:
            return self.hook.capture_features(call)   # filled by the block wrappers during the host's loop
        u = self.unet
        with self._own():
            hs = []
            h = call.x.type(u.dtype) if self.cast else call.x
            for module in u.input_blocks:
                h = module(h, emb, call.context)
                hs.append(h)
            h = u.middle_block(h, emb, call.context)
        return Features(hs, h, call.dtype)

    def decode(self, call: ModelCall, features: Features, emb):
        if self.hook is not None and self.hook.shared:
            return self.hook.defer(features)          # the host's loop decodes, with its extensions' residuals
        u = self.unet
        with self._own():
            h = features.mid
            hs = list(features.skips)
            for module in u.output_blocks:
                h = self.module.th.cat([h, hs.pop()], dim=1)
                h = module(h, emb, call.context)
            h = h.type(features.meta)
            return u.out(h)

    def tile(self, call: ModelCall, n, timesteps, sigmas) -> ModelCall:
        h = call.host
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=_rows(call.context, n),
                       host=CompVisCall(_rows(h.y, n), h.kwargs))

    def own_step_reason(self, call: ModelCall) -> str | None:
        # shared mode: another extension's forward adds its residuals in the decoder, so every step
        # decodes on its own (the runtime then runs no batched decoders and says why)
        return "ControlNet residuals change every step" if self.hook is not None and self.hook.shared else None


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_call(unet, args, kwargs, slot_extra=()) -> ModelCall | None:
    """The ModelCall of ``unet(*args, **kwargs)`` as A1111 calls it: SD1/SD2 ``(x, t, context=c)``, SDXL
    ``(x, timesteps=t, context=c, y=v)``; None for a call this adapter does not understand."""
    names = ("x", "timesteps", "context", "y")
    bound = dict(zip(names, args))
    extra = {k: v for k, v in kwargs.items() if k not in names}
    for k in names:
        if k in kwargs:
            bound[k] = kwargs[k]
    x, t, context, y = (bound.get(k) for k in names)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not isinstance(t, torch.Tensor) or extra:
        return None
    if (y is not None) != (unet.num_classes is not None) or (context is not None and not isinstance(context, torch.Tensor)):
        return None
    t = t.flatten()
    if t.numel() == 1 and x.shape[0] > 1:
        t = t.expand(x.shape[0])
    if t.numel() != x.shape[0]:
        return None
    shape = lambda v: None if v is None else tuple(v.shape)
    slot = (tuple(x.shape), shape(context), shape(y)) + tuple(slot_extra)
    return ModelCall(x, t, context, None, x.dtype, slot, CompVisCall(y, {}))


# --------------------------------------------------------------------------------------------------
# The hooks
# --------------------------------------------------------------------------------------------------

class _CallState:
    """What the block wrappers do during one host forward."""

    def __init__(self, mode, features=None, result=None):
        self.mode = mode              # "pass" | "replay" (own: output known) | "encoder" | "capture" (shared)
        self.features = features
        self.result = result
        self.standin = None
        self.entered = 0              # times input block 0 ran in this call


class UNetHook:
    """Per-generation hooks on one UNet.  ``run_of()`` gives the active Run (or None) and ``step_of()`` the
    step of the current sampler evaluation.  ``install`` / ``remove`` are idempotent."""

    def __init__(self, unet, run_of, step_of):
        self.unet = unet
        self.run_of, self.step_of = run_of, step_of
        self.adapter = CompVisSplit(unet, self)
        self.shared = False           # another extension owns forward: sequential, host-driven decoding
        self.controls = None          # shared mode with controlnet_reuse: the run's controlnet.ControlReuse
        self.state: _CallState | None = None
        self._own_depth = 0
        self._handles = []
        self._wrapped = []            # (module, wrapper, previous instance forward or None)
        self.installed = False

    # --------------------------------------------------------------------------- install / remove
    def install(self):
        if self.installed:
            return self
        u = self.unet
        self._handles = [u.register_forward_pre_hook(self._pre, with_kwargs=True),
                         u.register_forward_hook(self._post, with_kwargs=True)]
        for i, m in enumerate(u.input_blocks):
            self._wrap(m, functools.partial(self._input, i))
        self._wrap(u.middle_block, self._middle)
        for i, m in enumerate(u.output_blocks):
            self._wrap(m, functools.partial(self._output, i))
        self._wrap(u.out, self._out)
        self.installed = True
        return self

    def _wrap(self, module, behaviour):
        previous = module.__dict__.get("forward")
        inner = module.forward

        def forward(*args, **kwargs):
            return behaviour(inner, *args, **kwargs)

        forward._fd_hook = self
        module.forward = forward
        self._wrapped.append((module, forward, previous))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        for module, wrapper, previous in reversed(self._wrapped):
            if module.__dict__.get("forward") is wrapper:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            else:
                log.warning("FasterDiffusion: %s.forward was replaced after FasterDiffusion's hook; leaving it",
                            type(module).__name__)
        self._wrapped = []
        self.state = None
        self.installed = False

    # --------------------------------------------------------------------------- per call
    def own(self):
        hook = self

        class _Own:
            def __enter__(self):
                hook._own_depth += 1

            def __exit__(self, *exc):
                hook._own_depth -= 1
                return False
        return _Own()

    def capture_features(self, call):
        feats = Features([], None, call.dtype)
        self.state = _CallState("capture", feats)
        return feats

    def defer(self, features):
        if self.state is None or self.state.features is not features:   # a key step keeps capturing
            self.state = _CallState("encoder", features)
        return DEFER

    def _pre(self, module, args, kwargs):
        self.state = None
        if self.controls is not None:
            self.controls.current = None
        run = self.run_of()
        if run is None:
            return None
        call = make_call(self.unet, args, kwargs)
        if call is None:
            return None
        step = self.step_of()
        if self.controls is not None:
            self.controls.before(call, step)       # this call's slot; a late key before the run decides
        result = run.forward(self.adapter, call, step, lambda: PASS)
        if result is PASS:
            self.state = None
        elif result is not DEFER:
            # own mode, output computed: the host's loop only replays stand-ins (``x`` concatenates with
            # itself like any skip), and ``out`` returns the output
            self.state = _CallState("replay", None, result)
            self.state.standin = call.x
        return None

    def _post(self, module, args, kwargs, output):
        if self.controls is not None:
            self.controls.after()
        state, self.state = self.state, None
        if state is None:
            return None
        if state.mode == "capture":
            n = len(self.unet.input_blocks)
            if len(state.features.skips) != n or state.features.mid is None:
                self._taint("the UNet's blocks were not all called during a key step")
        if state.mode == "replay":
            return state.result
        return None

    def _taint(self, why):
        run = self.run_of()
        if run is not None and not run.bypass:
            reason = f"{why}: every later step ran in full"
            log.warning("FasterDiffusion: %s", reason)
            run.bypass = reason
            run.stats.bypassed = reason
            run.drop_caches()

    # --------------------------------------------------------------------------- block wrappers
    def _active(self):
        return self.state if self._own_depth == 0 else None

    def _input(self, i, inner, *args, **kwargs):
        st = self._active()
        if st is None:
            return inner(*args, **kwargs)
        if i == 0:
            st.entered += 1
            if st.entered > 1:   # something (reference-only ControlNet) runs a second UNet pass inside this one
                self.state = None
                self._taint("another extension ran a second UNet pass inside one call")
                return inner(*args, **kwargs)
        if st.mode == "capture":
            out = inner(*args, **kwargs)
            st.features.skips.append(out.clone())
            return out
        if st.mode == "replay":
            return st.standin
        if i >= len(st.features.skips):
            return inner(*args, **kwargs)
        return st.features.skips[i].clone()

    def _middle(self, inner, *args, **kwargs):
        st = self._active()
        if st is None:
            return inner(*args, **kwargs)
        if st.mode == "capture":
            out = inner(*args, **kwargs)
            st.features.mid = out.clone()
            return out
        if st.mode == "replay":
            return st.standin
        return st.features.mid.clone()

    def _output(self, i, inner, *args, **kwargs):
        st = self._active()
        if st is None or st.mode != "replay":
            return inner(*args, **kwargs)
        return st.standin

    def _out(self, inner, *args, **kwargs):
        st = self._active()
        if st is None or st.mode != "replay":
            return inner(*args, **kwargs)
        return st.result

