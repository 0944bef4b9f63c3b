"""The diffusers glue: one ``Run`` per pipeline call (see the package docstring), ``apply`` and its handle."""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import logging
import math

import torch

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import USE_PEFT_BACKEND

from ..forecast import DEFAULT_PROPAGATION
from ..distributed import check_group
from ..runtime import Run
from ..settings import Settings
from ..strategy import Strategy
from .controlnet import ControlNetHooks
from .unet import MIRRORED_VERSION, scheduler_bypass_reason, scheduler_forecast_off_reason, unsupported_processor_reason

log = logging.getLogger("FasterDiffusion")


HOOK_NAME = "faster_diffusion"
HANDLE_ATTR = "_faster_diffusion_handle"      # a class attribute of the per-instance subclass only

# Pipelines whose denoising loop is known: one UNet call and one scheduler.step per iteration, the same
# prompt embeddings object every iteration (Text2Video-Zero loops in parts: see the package docstring).  Exact
# classes: a subclass may change the loop.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
                       "StableDiffusionXLImg2ImgPipeline", "StableDiffusionControlNetPipeline",
                       "StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionXLControlNetPipeline",
                       "StableDiffusionXLControlNetImg2ImgPipeline", "AnimateDiffPipeline", "AnimateDiffSDXLPipeline",
                       "IFPipeline", "IFSuperResolutionPipeline", "StableVideoDiffusionPipeline",
                       "TextToVideoSDPipeline", "TextToVideoZeroPipeline", "DiTPipeline")

# The denoiser classes served, UNets and transformers (exact classes of diffusers), each with the adapter that
# mirrors its forward ("module:class" in this package, imported when a pipeline has that model).
ADAPTERS = {"UNet2DConditionModel": ".unet:DiffusersUNetAdapter", "UNetMotionModel": ".motion:MotionUNetAdapter",
            "UNetSpatioTemporalConditionModel": ".video:SpatioTemporalUNetAdapter",
            "UNet3DConditionModel": ".video:UNet3DAdapter", "DiTTransformer2DModel": ".dit:DiTAdapter"}

# Where a pipeline keeps its denoiser: the UNet pipelines' ``unet``, the transformer pipelines' (DiT) ``transformer``.
DENOISER_ATTRS = ("unet", "transformer")


def denoiser_attr(pipe) -> str:
    """The name of ``pipe``'s denoiser attribute: the first of ``DENOISER_ATTRS`` it has (``unet`` if none)."""
    return next((name for name in DENOISER_ATTRS if getattr(pipe, name, None) is not None), DENOISER_ATTRS[0])


def denoiser_of(pipe):
    """``pipe``'s denoiser (its UNet or transformer), or None."""
    return getattr(pipe, denoiser_attr(pipe), None)


def adapter_class(unet):
    """The adapter class for ``unet``'s class (a UNet or a transformer), or None where none mirrors it."""
    entry = ADAPTERS.get(type(unet).__name__)
    if entry is None or type(unet).__module__.split(".")[0] != "diffusers":
        return None
    module, name = entry.split(":")
    return getattr(importlib.import_module(module, __package__), name)


def unsupported_unet_reason(unet) -> str | None:
    """Why no adapter can serve ``unet``, a pipeline's denoiser (its class or configuration), or None."""
    cls = adapter_class(unet)
    if cls is None:
        return (f"{type(unet).__name__} is not one of the UNet classes or transformers FasterDiffusion's diffusers "
                f"adapters mirror ({', '.join(ADAPTERS)})")
    return cls.unsupported_reason(unet)


# --------------------------------------------------------------------------------------------------
# The glue: one Run per pipeline call
# --------------------------------------------------------------------------------------------------

def schedule_sigmas(scheduler, timesteps: list, begin: int = 0) -> list:
    """The run's records: the sigma of each step of ``timesteps`` (the scheduler's from ``begin`` on), then the next.
    The scheduler's own ``sigmas`` where they line up with its timesteps (Euler-type schedulers; SVD's EDM timesteps,
    0.25 log sigma, index no ``alphas_cumprod``), else sqrt((1 - a)/a) at each step's timestep (``alphas_cumprod``
    interpolated), then 0."""
    own = getattr(scheduler, "sigmas", None)
    if own is not None and len(own) == len(scheduler.timesteps) + 1:
        own = torch.as_tensor(own).detach().flatten().to("cpu", torch.float64)
        return [float(v) for v in own[begin:begin + len(timesteps) + 1]]
    ac = getattr(scheduler, "alphas_cumprod", None)
    t = torch.tensor(timesteps, dtype=torch.float64)
    if ac is None or len(ac) == 0:
        return [float(v) for v in t / 1000.0] + [0.0]
    ac = torch.as_tensor(ac).detach().to("cpu", torch.float64)
    t = t.clamp(0, len(ac) - 1)
    lo = t.floor().long()
    hi = t.ceil().long()
    a = ac[lo] + (ac[hi] - ac[lo]) * (t - lo)
    return [float(v) for v in ((1 - a) / a).sqrt()] + [0.0]


def loop_begin(scheduler_timesteps: list, first_t: float, begin_index, num_timesteps) -> int | None:
    """Where in the scheduler's timesteps the pipeline's loop starts (see the module docstring)."""
    n = len(scheduler_timesteps)
    candidates = [begin_index, n - num_timesteps if num_timesteps else None, 0]
    candidates += [i for i, t in enumerate(scheduler_timesteps) if _same_t(t, first_t)]
    for c in candidates:
        if c is not None and 0 <= c < n and _same_t(scheduler_timesteps[c], first_t):
            return c
    return None


def _same_t(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


class _PipelineCall:
    """One pipeline call: its Run (made at the first UNet call), loop position and conditioning identities."""

    def __init__(self, handle: "FasterDiffusionHandle", pipe):
        self.handle = handle
        self.pipe = pipe
        self.run: Run | None = None
        self.schedule: list = []
        self._pos = 0                  # the loop position last seen (see ``pos``)
        self.steppers: list = []       # every _LoopStep of this call: the scheduler's and its deep copies'
        self._objects: list = []       # conditioning tensors seen in this call (held: ids stay unique)
        self.controls = None           # ControlReuse (controlnet.py) where the pipeline's ControlNets are reused

    @property
    def pos(self) -> int:
        """The loop position: that of the scheduler the pipeline steps now (``_LoopStep``); where that is none of
        this call's, the last one seen (its calls' timesteps then mismatch: they run in full)."""
        stepper = vars(self.pipe.scheduler).get("step")
        if isinstance(stepper, _LoopStep) and stepper.state is self:
            self._pos = stepper.pos
        return self._pos

    def end_of_iteration(self):
        if self.run is not None:
            self.run.begin_evaluation()

    def _ident(self, obj) -> int:
        if obj is None:
            return -1
        for i, o in enumerate(self._objects):
            if o is obj:
                return i
        self._objects.append(obj)
        return len(self._objects) - 1

    def _start(self, a: dict, t: torch.Tensor):
        pipe, sched = self.pipe, self.pipe.scheduler
        first_t = float(t[0])
        timesteps = [float(v) for v in torch.as_tensor(sched.timesteps).detach().flatten().to("cpu", torch.float64)]
        begin = loop_begin(timesteps, first_t, getattr(sched, "begin_index", None), getattr(pipe, "num_timesteps", None))
        reason = (scheduler_bypass_reason(sched) or unsupported_unet_reason(self.handle.denoiser)
                  or unsupported_processor_reason(self.handle.denoiser) or self.handle.adapter.call_reason(a))
        if begin is None:
            reason = reason or (f"the first UNet call's timestep {first_t:g} is not on the scheduler's "
                                "timesteps: every call ran in full")
            self.schedule = [first_t]
        else:
            n = getattr(pipe, "num_timesteps", None)
            end = begin + n if isinstance(n, int) and 0 < n <= len(timesteps) - begin else len(timesteps)
            self.schedule = timesteps[begin:end]
        if reason and not reason.endswith("in full"):
            reason += ": every call ran in full"
        self.run = Run(self.handle.settings, schedule_sigmas(sched, self.schedule, begin or 0), self.schedule, bypass=reason,
                       forecast_off=scheduler_forecast_off_reason(sched, len(self.schedule)),
                       process_group=self.handle.process_group)
        if self.controls is not None:
            self.controls.begin(self.run)

    def step_of(self, t: torch.Tensor) -> int | None:
        """The loop position if the call's timestep is the one the position expects, else None."""
        if self.pos >= len(self.schedule):
            return None
        lo, hi = torch.stack([t.min(), t.max()]).double().tolist()      # one host sync per call
        expected = self.schedule[self.pos]
        return self.pos if _same_t(lo, expected) and _same_t(hi, expected) else None

    def unet_call(self, module, original, args, kwargs):
        adapter = self.handle.adapter if self.controls is None else self.controls.unet_adapter(self.handle.adapter)
        a = adapter.arguments(args, kwargs)
        if a is None:
            return original(*args, **kwargs)          # let the host say what is wrong with the call
        cak = a.get("cross_attention_kwargs")
        lora_scale = cak.get("scale", 1.0) if cak is not None else 1.0
        sample = next(iter(a.values()))               # the forward's first argument
        slot = (tuple(sample.shape), str(sample.dtype), *map(self._ident, adapter.conditioning(a)), lora_scale)
        call = adapter.make_call(a, slot)
        if self.run is None:
            self._start(a, call.timesteps)
        step = None if adapter.call_reason(a) else self.step_of(call.timesteps)
        if USE_PEFT_BACKEND and lora_scale != 1.0 and step is not None:
            # the forward's @apply_lora_scale, around the whole call: the split calls blocks directly (a call the
            # split never serves goes to the forward as it came: a UNet3D forward does not scale LoRA layers)
            from diffusers.utils import scale_lora_layers, unscale_lora_layers
            a["cross_attention_kwargs"] = {k: v for k, v in cak.items() if k != "scale"}
            scale_lora_layers(module, lora_scale)
            try:
                out = self.run.forward(adapter, call, step, self._full(lambda: _sample_of(original(**a))))
            finally:
                unscale_lora_layers(module, lora_scale)
        else:
            out = self.run.forward(adapter, call, step, self._full(lambda: _sample_of(original(*args, **kwargs))))
        return adapter.output(out, a["return_dict"])

    def _full(self, thunk):
        """The host's forward, after checking that no reused ControlNet residuals reach it."""
        if self.controls is None:
            return thunk
        return lambda: (self.controls.check_full(), thunk())[1]


class _LoopStep:
    """``scheduler.step`` during a pipeline call (an instance attribute with the original's signature, which the
    pipelines inspect for ``eta``/``generator``): the original step, then the loop moves on.  The loop position
    lives here, with the scheduler's own state, so a pipeline that deep-copies its scheduler and later loops on the
    copy resumes at the copy's position, stepping the copy (Text2Video-Zero: after its first loop it copies the
    scheduler, runs a second loop on the first frame, then every frame again from the copy's steps).  ``own``:
    the scheduler had a ``step`` of its own, put back on ``remove``."""

    def __init__(self, state: _PipelineCall, scheduler, step, own: bool, pos: int = 0):
        functools.update_wrapper(self, step)
        self.state, self.scheduler, self.step, self.own, self.pos = state, scheduler, step, own, pos
        state.steppers.append(self)

    def __call__(self, *a, **k):
        try:
            return self.step(*a, **k)
        finally:
            self.pos += 1
            self.state.end_of_iteration()

    def __deepcopy__(self, memo):
        # inside the scheduler's deepcopy: memo maps the scheduler to its copy, and the bound step rebinds to it
        return _LoopStep(self.state, memo.get(id(self.scheduler), self.scheduler), copy.deepcopy(self.step, memo),
                         self.own, self.pos)

    def remove(self):
        if vars(self.scheduler).get("step") is self:
            if self.own:
                vars(self.scheduler)["step"] = self.step
            else:
                del vars(self.scheduler)["step"]


def _sample_of(output):
    return output[0] if isinstance(output, tuple) else output.sample


class _UNetHook(ModelHook):
    """The denoiser's forward hook: calls during a pipeline call go to its run, the rest to the original."""

    def __init__(self, handle: "FasterDiffusionHandle"):
        super().__init__()
        self.handle = handle

    def new_forward(self, module, *args, **kwargs):
        active = self.handle._active
        if active is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return active.unet_call(module, self.fn_ref.original_forward, args, kwargs)


class FasterDiffusionHandle:
    """What ``apply`` returns: ``reports`` (one ``Run.finish()`` dict per pipeline call that ran the UNet)
    and ``remove()``, which restores the pipeline exactly.  Also a context manager (removes on exit)."""

    def __init__(self, pipe, settings: Settings, process_group=None):
        self.pipe = pipe
        self.process_group = process_group
        self.denoiser_attr = denoiser_attr(pipe)       # "unet" or "transformer"
        self.denoiser = getattr(pipe, self.denoiser_attr)
        self.settings = settings
        self.adapter = adapter_class(self.denoiser).for_run(self.denoiser, settings)
        self.reports: list[dict] = []
        self._active: _PipelineCall | None = None
        self._removed = False
        # the forward hook (remember what the denoiser had, to leave nothing behind on remove)
        self._had_registry = hasattr(self.denoiser, "_diffusers_hook")
        self._had_forward = "forward" in vars(self.denoiser)
        registry = HookRegistry.check_if_exists_or_initialize(self.denoiser)
        registry.register_hook(_UNetHook(self), HOOK_NAME)
        self._forward = vars(self.denoiser)["forward"]
        self._controlnets = ControlNetHooks.install(self, pipe, HOOK_NAME) if settings.controlnet_reuse else None
        # the per-instance subclass that owns the pipeline call
        self._pipe_class = type(pipe)
        pipe.__class__ = _owning_subclass(self._pipe_class, self)

    @property
    def strategy(self) -> Strategy:
        return self.settings.strategy

    def _pipeline_call(self, call_original, pipe, args, kwargs):
        replaced = getattr(pipe, self.denoiser_attr, None) is not self.denoiser
        if self._active is not None or replaced:
            if replaced:
                log.warning("FasterDiffusion: pipe.%s was replaced after apply(); this call runs unpatched",
                            self.denoiser_attr)
            return call_original(pipe, *args, **kwargs)
        state = _PipelineCall(self, pipe)
        if self._controlnets is not None:
            state.controls = self._controlnets.reuse_for(state, inspect.signature(self._pipe_class.__call__), args,
                                                         kwargs)
        scheduler = pipe.scheduler
        vars(scheduler)["step"] = _LoopStep(state, scheduler, scheduler.step, "step" in vars(scheduler))
        self._active = state
        try:
            return call_original(pipe, *args, **kwargs)
        finally:
            self._active = None
            for stepper in state.steppers:
                stepper.remove()
            if state.run is not None:
                state.run.close(self.reports)

    def remove(self):
        """Restore the pipeline and its denoiser exactly as they were before ``apply``."""
        if self._removed:
            return
        if self._active is not None:
            raise RuntimeError("FasterDiffusion: remove() cannot run inside a pipeline call")
        registry = self.denoiser._diffusers_hook
        if vars(self.denoiser).get("forward") is not self._forward and registry._hook_order[-1:] == [HOOK_NAME]:
            # diffusers' registry would put the original forward back over the later wrapper (e.g. accelerate's
            # CPU offload hook) and silently break it
            raise RuntimeError(f"FasterDiffusion: {self.denoiser_attr}.forward was wrapped after apply() (CPU "
                               "offload?); remove that first (pipe.remove_all_hooks()), then call remove()")
        if self._controlnets is not None:
            self._controlnets.check_removable()
        self._removed = True
        if vars(type(self.pipe)).get(HANDLE_ATTR) is self:
            self.pipe.__class__ = self._pipe_class
        registry.remove_hook(HOOK_NAME, recurse=False)
        if self._controlnets is not None:
            self._controlnets.remove()
        if not registry.hooks:
            if not self._had_forward:
                vars(self.denoiser).pop("forward", None)
            if not self._had_registry:
                del self.denoiser._diffusers_hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _owning_subclass(cls, handle):
    original_call = cls.__call__

    @functools.wraps(original_call)
    def __call__(self, *args, **kwargs):
        return handle._pipeline_call(original_call, self, args, kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                                       HANDLE_ATTR: handle})


def _owning_subclass_of(pipe):
    """The class apply() put on ``pipe``, if any."""
    cls = type(pipe)
    return cls if HANDLE_ATTR in vars(cls) else None


def apply(pipe, strategy: str | Strategy = "paper", parallel: bool = True, max_decoder_batch: int = 32,
          propagation: str = DEFAULT_PROPAGATION, controlnet_reuse: bool = True, encoder_blocks: int = 0,
          process_group=None):
    """Patch ``pipe`` (one of ``SUPPORTED_PIPELINES``: Stable Diffusion / SDXL / ControlNet text-to-image and img2img,
    DeepFloyd-IF stages I and II, Stable Video Diffusion, ModelScope text-to-video, Text2Video-Zero, AnimateDiff, DiT) in
    place with encoder propagation and parallel decoders; returns the handle (``reports``, ``remove()``).
    ``max_decoder_batch``: rows per batched decoder call (a video's frames count one row each).
    ``propagation``: what non-key decoders get, "forecast" (features extrapolated from the last key steps;
    ancestral / SDE schedulers reuse) or "reuse" (the last key step's, the paper's).  ``controlnet_reuse``: a
    ControlNet runs at key steps only; non-key steps reuse its key-step residuals at their own scale (``controlnet.py``).
    ``encoder_blocks``: transformers (DiT) only, how many blocks form the encoder (0 = the model's default, the
    paper's 18 of DiT-XL/2's 28 blocks, the same fraction of other depths).
    ``process_group``: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD`` under torchrun)
    whose ranks all run the same pipeline call (same prompt, seed and settings): each group's decoder steps are split
    between them and their outputs all-gathered, so every rank gets the same latents (``fasterdiffusion.distributed``,
    ``examples/diffusers_torchrun.py``); None (default): one process.

    Applying again replaces the earlier patch (the last settings win).  Raises TypeError for a pipeline or
    denoiser (UNet or transformer) it cannot serve, StrategyError for a bad strategy string (the message shows the
    grammar) and ValueError for another bad setting (an ``encoder_blocks`` that leaves no decoder block).
    """
    settings = Settings.of(strategy, parallel, max_decoder_batch, propagation, controlnet_reuse,
                           encoder_blocks=encoder_blocks)
    check_group(process_group)
    previous = _owning_subclass_of(pipe)
    if previous is not None:
        log.info("FasterDiffusion: the pipeline was already patched; the settings of the last apply() win")
        vars(previous)[HANDLE_ATTR].remove()
    import diffusers
    if diffusers.__version__.split(".")[:2] != MIRRORED_VERSION.split(".")[:2]:
        log.warning("FasterDiffusion: the UNet split mirrors diffusers %s; this is diffusers %s (check that "
                    "strategy='all' gives the unpatched result)", MIRRORED_VERSION, diffusers.__version__)
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES or type(pipe).__module__.split(".")[0] != "diffusers":
        raise TypeError(f"FasterDiffusion: {name} is not a supported pipeline (supported: "
                        f"{', '.join(SUPPORTED_PIPELINES)})")
    attr = denoiser_attr(pipe)
    denoiser = getattr(pipe, attr, None)
    reason = unsupported_unet_reason(denoiser)
    if reason:
        raise TypeError(f"FasterDiffusion cannot serve {name}.{attr}: {reason}")
    if hasattr(denoiser, "_hf_hook"):
        # an accelerate hook (CPU offload) inside ours would be skipped by the split, which calls the blocks
        raise RuntimeError(f"FasterDiffusion: the {attr} has an accelerate hook (CPU offload): call apply() first, "
                           "then enable_model_cpu_offload() (pipe.remove_all_hooks() removes it)")
    return FasterDiffusionHandle(pipe, settings, process_group)

