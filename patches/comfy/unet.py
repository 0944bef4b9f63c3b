"""ComfyUI glue: hook sampling, place each UNet call on its step, and let the engine's ``Run`` decide.

Hooks (all public, all on a ``clone()``): an OUTER_SAMPLE wrapper that makes a fresh ``Run`` per
sampling run (unless a FasterDiffusion sampler node owns the run), a PREDICT_NOISE wrapper that tells
the run where each sampler evaluation starts, and a DIFFUSION_MODEL wrapper that hands every UNet call
to the run through the ldm adapter (``ldm.py``).  With ``controlnet_reuse``, one run's options also
carry a CALC_COND_BATCH wrapper that defers the ControlNets to the run (``controlnet.py``); a bypassed
run's options carry an APPLY_MODEL wrapper that counts its calls outside the UNet.  Nothing else in ComfyUI
is touched.

Where the settings and the run live, one type per key:
  transformer_options["faster_diffusion"]      FasterDiffusionConfig  (the Apply node's settings)
  transformer_options["faster_diffusion_run"]  Run                    (in one sampling run's options only)
  transformer_options["faster_diffusion_controlnet"]  ControlReuse   (likewise, with controlnet_reuse)
"""
from __future__ import annotations

import logging

import torch

import comfy.model_patcher
import comfy.patcher_extension

from ...fasterdiffusion.runtime import Run, log_line
from ...fasterdiffusion.samplers import bypass_reason, forecast_off_reason
from ...fasterdiffusion.settings import Settings
from ...fasterdiffusion.strategy import make_plan
from .compile import CompiledAdapter, compile_settings, compiled_split, keeps_guards
from .controlnet import CONTROL_KEY, ControlReuse, calc_cond_batch_wrapper, fresh as fresh_control
from .adapters import adapter_class, bind, call_args, unsupported_reason as unet_unsupported_reason
from .ldm import LdmUNetAdapter

KEY = "faster_diffusion"
RUN_KEY = "faster_diffusion_run"
COMPILE_KEY = "faster_diffusion_compile"      # a served run under TorchCompileModel: its compile settings
WRAP = comfy.patcher_extension.WrappersMP
log = logging.getLogger("FasterDiffusion")


class FasterDiffusionConfig:
    """What a FasterDiffusion node put on the model: its ``settings`` (immutable) and its id; ``reports`` collects
    one stats dict per finished run (read by tests and the UI)."""

    def __init__(self, settings: Settings, node_id=None):
        self.settings = settings
        self.node_id = node_id
        self.reports: list[dict] = []

    @property
    def strategy(self):
        return self.settings.strategy

    def say(self, text: str, warn: bool):
        """A run's stats line: logged, and shown on the node."""
        log_line(text, warn)
        show_on_node(self.node_id, text)


class OwnsRun:
    """Base of samplers that make their own FasterDiffusion run: an Apply node's hook then stays out.
    Recognised by the attribute, not the class, so two loaded copies of the pack still agree."""
    owns_faster_diffusion_run = True


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------

def sampler_name(sampler) -> str:
    return getattr(getattr(sampler, "sampler_function", None), "__name__", "")


def sampler_bypass_reason(sampler) -> str | None:
    return bypass_reason(sampler_name(sampler))


def host_feature_reason(model_options) -> str | None:
    """Why a host feature on the model rules encoder propagation out for the run, or None.  EasyCache and
    LazyCache (either order of nodes) skip whole steps by their own measure: stacked on encoder propagation
    each would approximate the other's approximation.  TorchCompileModel compiles the UNet's forward with
    our hook inside it: a run that has nothing to skip leaves it alone (``begin_run``); one that serves compiles
    the split instead (``compile.py``)."""
    holder = model_options.get("transformer_options", {}).get("easycache")
    if holder is not None:
        name = getattr(holder, "name", "EasyCache")
        return f"{name} is also applied to this model: every step ran in full, {name} alone decides what to skip"
    return None


def forecast_host_reason(model_options) -> str | None:
    """Why a host feature on the model makes forecast propagation reuse features, or None.  SelfAttentionGuidance
    records the middle block's self-attention (an attn1 patch there) to blur the latent of its extra pass each
    step; that pass's features jump with the map, and forecasting them measured worse than reusing them
    (tests/test_compat.py: 21.8 vs 25.6 dB on the digits model)."""
    replaced = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    if any(isinstance(where, tuple) and where[:1] == ("middle",) for where in replaced):
        return ("a patch records the middle block's attention (SelfAttentionGuidance) to build the latent of an "
                "extra pass each step, whose features jump with it: features were reused, not forecast")
    return None


def compiled_run_reason(settings: dict, plan) -> str | None:
    """Why a run on a TorchCompileModel model leaves the compiled UNet alone, or None (it serves, compiling the split
    instead: ``compile.py``)."""
    if all(len(g) == 1 for g in plan.groups):
        return "TorchCompileModel: every step is a key step, so the compiled UNet ran every step in full, untouched"
    if not keeps_guards(settings):
        # ComfyUI 0.33: the compiled UNet keeps no guards on transformer_options, so a graph traced without the
        # run's hook would be replayed for the run's calls; nothing of the run may depend on being traced
        return ("TorchCompileModel compiled the whole UNet without guards on transformer_options, so per-step "
                "encoder skipping cannot run inside it: every step ran in full (compiled)")
    return None


def begin_run(config: FasterDiffusionConfig, sigmas, model_sampling, sampler, model_options,
              multigpu: bool = False, unet=None) -> tuple[Run, dict]:
    """A fresh Run and a clone of ``model_options`` that carries it (and the DIFFUSION_MODEL wrapper,
    for callers that hooked in without the Apply node); ``multigpu``: the model carries MultiGPU clones that
    ``model_options`` does not show yet (the Apply hook runs before ComfyUI prepares them): ComfyUI 0.33's MultiGPU CFG
    split runs one evaluation's cond chunks on several devices at once, in threads, each device on its own run state
    (``Run.for_device``), and a ControlNet is then computed at every step on each device (its key-step residuals live
    on the device that made them, so ``controlnet_reuse`` stays out).  A bypassed run's calls
    are counted by an APPLY_MODEL wrapper, outside the UNet: under TorchCompileModel the UNet (our DIFFUSION_MODEL
    wrapper inside it) is one compiled graph, which on ComfyUI 0.33 keeps no guards on transformer_options."""
    flat = sigmas.flatten()
    bypass = sampler_bypass_reason(sampler) or host_feature_reason(model_options)
    multigpu = multigpu or bool(model_options.get("multigpu_clones"))
    compiled = compile_settings(model_options)
    ldm_family = unet is None or adapter_class(unet) is LdmUNetAdapter    # the split compiles and reuses ControlNets
    if compiled is not None and not bypass:
        bypass = (compiled_run_reason(compiled, make_plan(config.settings.strategy, len(flat) - 1)) if ldm_family else
                  f"TorchCompileModel: FasterDiffusion compiles its split for UNets only, not {type(unet).__name__}: "
                  "every step ran in full (compiled)")
    run = Run(config.settings, flat.tolist(), model_sampling.timestep(flat).float(),   # one host sync per run
              bypass, forecast_off_reason(sampler_name(sampler), len(flat) - 1) or forecast_host_reason(model_options))
    options = comfy.model_patcher.create_model_options_clone(model_options)
    to = options["transformer_options"]
    to[RUN_KEY] = run
    wrappers = to.setdefault("wrappers", {})
    wrappers.setdefault(WRAP.DIFFUSION_MODEL, {}).setdefault(KEY, [diffusion_model_wrapper])
    if compiled is not None and not run.bypass:     # the run outside dynamo's trace; the split compiled instead
        to[COMPILE_KEY] = compiled
        wrappers[WRAP.DIFFUSION_MODEL][KEY] = [untraced_diffusion_model_wrapper]
    if run.bypass:
        wrappers.setdefault(WRAP.APPLY_MODEL, {})[KEY] = [count_bypassed_call]
    elif config.settings.controlnet_reuse and ldm_family and not multigpu:   # transformers: each step's own residuals
        to[CONTROL_KEY] = ControlReuse(run)
        wrappers.setdefault(WRAP.CALC_COND_BATCH, {})[KEY] = [calc_cond_batch_wrapper]
    return run, options


# --------------------------------------------------------------------------------------------------
# The hooks
# --------------------------------------------------------------------------------------------------

def call_slot(x, to) -> tuple:
    """What tells apart calls whose encoder features differ: the cond chunks, their order and the shape,
    the per-call patches (PAG's perturbed pass replaces an attention; IPAdapter-style packs add
    patches) and the frames of a context window.  A second call of one slot within one sampler evaluation gets
    its own occurrence (Run)."""
    replaced = tuple(sorted((str(kind), repr(where), id(fn))
                            for kind, d in to.get("patches_replace", {}).items() for where, fn in d.items()))
    patches = tuple(sorted((str(name), tuple(map(id, fns))) for name, fns in to.get("patches", {}).items()))
    return (tuple(to.get("uuids", ())), tuple(to.get("cond_or_uncond", ())), tuple(x.shape), replaced, patches,
            window_frames(to))


def window_frames(to) -> tuple:
    """The frames a context-window call runs on: AnimateDiff-Evolved's sliding contexts (``ad_params["sub_idxs"]``) and
    ComfyUI's own context windows (``context_window``) call the model once per window, on a subset of the frames,
    with the same shapes and conds; schedules like "uniform" move the windows from step to step, so the window's
    place in the calls of a step does not say which frames it holds.  Keyed by its frames, a window is served only
    from a key step's features of the same frames; a window no key step of the group saw runs in full."""
    ad = to.get("ad_params")
    sub = ad.get("sub_idxs") if isinstance(ad, dict) else None
    native = to.get("context_window")
    return (tuple(sub) if sub is not None else None,
            None if native is None else (getattr(native, "dim", None), tuple(getattr(native, "index_list", ()))))


def run_of(to) -> Run | None:
    """The run state a call with these transformer_options works on: the run's own, or in a MultiGPU CFG split's
    device thread (``multigpu_thread_device``, ComfyUI 0.33) that device's (``Run.for_device``)."""
    run = to.get(RUN_KEY)
    if run is not None and "multigpu_thread_device" in to:
        run = run.for_device(to["multigpu_thread_device"])
    return run


def diffusion_model_wrapper(executor, *args, **kwargs):
    unet = executor.class_obj
    adapter_cls = adapter_class(unet)
    if adapter_cls is None:
        return executor(*args, **kwargs)
    a = bind(unet, args, kwargs)
    to = a["transformer_options"]
    run = run_of(to)

    def full():       # the host's forward; deferred ControlNet residuals (controlnet_reuse) computed now
        control = a.get("control")
        fresh = fresh_control(control)
        if fresh is control:
            return executor(*args, **kwargs)
        fargs, fkwargs = call_args(unet, dict(a, control=fresh))
        return executor(*fargs, **fkwargs)

    if run is None or run.bypass:
        return full()          # a bypassed run's calls are counted outside the UNet (count_bypassed_call)
    reason = adapter_cls.unsupported_reason(unet)
    if reason:                 # found at the call (e.g. an object patch on the model added after Apply)
        run.full_call(f"passing the model through unchanged: {reason}")
        return full()
    inner = inner_wrappers(executor)
    if inner:
        run.full_call(f"a DIFFUSION_MODEL wrapper inside FasterDiffusion's ({inner}) wraps the UNet's forward, which "
                      "the split would go around at every served call: every step ran in full (apply that wrapper's "
                      "node before FasterDiffusion Apply to put it outside)")
        return full()
    sigmas = to.get("sigmas")
    step = None if sigmas is None or sigmas.numel() == 0 else run.step_of(float(sigmas.flatten()[0]))
    call = adapter_cls.make_call(unet, a, call_slot(a["x"], to))
    compiled = to.get(COMPILE_KEY)
    adapter = (adapter_cls.for_run(unet, run.settings) if compiled is None
               else CompiledAdapter(unet, compiled_split(unet, compiled)))
    return run.forward(adapter, call, step, full)


def inner_wrappers(executor) -> str:
    """The DIFFUSION_MODEL wrappers nested inside ours (added to the model after Apply, e.g. AnimateDiff-Evolved's
    GroupNorm hack at sampling time), by name: they wrap the host's forward, which the split's encoder and decoder
    calls go around."""
    inner = executor.wrappers[executor.idx + 1:]
    return ", ".join(f"{getattr(w, '__module__', '?')}.{getattr(w, '__qualname__', type(w).__name__)}" for w in inner)


# TorchCompileModel compiles the UNet's forward with the DIFFUSION_MODEL wrapper in it: a served run's wrapper runs
# outside dynamo's trace (its decisions are per step), and its encoder and decoder passes are compiled on their own.
untraced_diffusion_model_wrapper = torch.compiler.disable(diffusion_model_wrapper)


def end_run(run: Run, options: dict, config: FasterDiffusionConfig):
    """Close the run ``begin_run`` made (with its ``options``): its stats kept, logged and shown.  A served run under
    TorchCompileModel that no call reached says so (a compiled graph traced without the hook replayed it)."""
    s = run.stats
    if COMPILE_KEY in options["transformer_options"] and s.full_calls + s.encoder_calls + s.cached_calls == 0:
        s.bypassed = "TorchCompileModel's compiled UNet never called FasterDiffusion: every step ran in full (compiled)"
    run.close(config.reports, config.say)


def count_bypassed_call(executor, *args, **kwargs):
    """APPLY_MODEL, in a bypassed run only: each UNet call, counted where no compiled graph can swallow it."""
    to = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
    run_of(to).count_full_call()
    return executor(*args, **kwargs)


def predict_noise_wrapper(executor, x, timestep, model_options={}, seed=None):
    """A sampler evaluation starts: calls after this are its passes (regular, then guidance extras)."""
    run = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is not None:
        run.begin_evaluation()
    return executor(x, timestep, model_options, seed)


def outer_sample_wrapper(executor, *args, **kwargs):
    """The Apply node's hook: a fresh run in a cloned model_options, stats in ``finally``."""
    guider = executor.class_obj
    sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
    if getattr(sampler, "owns_faster_diffusion_run", False):   # a FasterDiffusion sampler node: its settings win
        return executor(*args, **kwargs)
    orig = guider.model_options
    config = orig["transformer_options"][KEY]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    patcher = guider.model_patcher
    run, guider.model_options = begin_run(config, sigmas, patcher.get_model_object("model_sampling"), sampler, orig,
                                          multigpu=bool(multigpu_clones(patcher)),
                                          unet=patcher.get_model_object("diffusion_model"))
    options = guider.model_options
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = orig
        end_run(run, options, config)


def multigpu_clones(patcher) -> list:
    """The MultiGPU CFG split's device clones on a model (ComfyUI 0.33; none on older hosts)."""
    get = getattr(patcher, "get_additional_models_with_key", None)
    return list(get("multigpu")) if get is not None else []


def show_on_node(node_id, text):
    if node_id is None:
        return
    try:
        from server import PromptServer
        if PromptServer.instance is not None and hasattr(PromptServer.instance, "send_progress_text"):
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception as e:   # the UI text is a courtesy; never fail a finished run over it
        log.debug("could not show stats on node %s: %s", node_id, e)


def unsupported_reason(model) -> str | None:
    """Why encoder propagation cannot serve this model (a ModelPatcher), or None if it can."""
    return unet_unsupported_reason(model.get_model_object("diffusion_model"))


def remove_hooks(m):
    """Take an Apply node's hooks off ``m`` (a clone), in place."""
    for wrapper_type in (WRAP.OUTER_SAMPLE, WRAP.PREDICT_NOISE, WRAP.DIFFUSION_MODEL):
        m.remove_wrappers_with_key(wrapper_type, KEY)
    m.model_options["transformer_options"].pop(KEY, None)


def without_faster_diffusion(model):
    """``model`` without an Apply node's hooks: itself if it has none, else a clone without them."""
    if KEY not in model.model_options["transformer_options"]:
        return model
    m = model.clone()
    remove_hooks(m)
    return m


def apply_faster_diffusion(model, settings: Settings, node_id=None):
    """A clone of ``model`` with encoder propagation hooked in (or the model itself, with a log line,
    if it cannot be served)."""
    reason = unsupported_reason(model)
    if reason:
        log.warning("FasterDiffusion: passing the model through unchanged: %s", reason)
        return model, None
    m = model.clone()
    if isinstance(m.model_options["transformer_options"].get(KEY), FasterDiffusionConfig):
        log.info("FasterDiffusion: the model was already patched; the settings of the last Apply node win")
        remove_hooks(m)
    config = FasterDiffusionConfig(settings, node_id)
    m.model_options["transformer_options"][KEY] = config
    m.add_wrapper_with_key(WRAP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(WRAP.PREDICT_NOISE, KEY, predict_noise_wrapper)
    m.add_wrapper_with_key(WRAP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    return m, config
