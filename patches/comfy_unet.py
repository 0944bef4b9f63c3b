"""ComfyUI glue: split ComfyUI's ``UNetModel`` into encoder and decoder, and hook sampling.

The split functions mirror ``UNetModel._forward`` (comfy/ldm/modules/diffusionmodules/openaimodel.py)
line for line, so the decoder run on freshly computed features equals the host's forward exactly
(pinned by tests/test_comfy_unet.py).  Differences from the host, all deliberate:
  * ControlNet ``middle``/``output`` residuals are added out of place, so cached features stay clean
    and every decoder call gets *its own* step's residuals;
  * cached tensors handed to ``output_block_patch`` patches are cloned (FreeU edits ``h`` in place).

Hooks (all public, all on a ``clone()``): an OUTER_SAMPLE wrapper that makes a fresh ``RunState`` per
sampling run, and a DIFFUSION_MODEL wrapper that decides per call: full forward, key step, or decoder
only.  Nothing else in ComfyUI is touched.
"""
from __future__ import annotations

import logging
import time

import torch

import comfy.model_patcher
import comfy.patcher_extension
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, forward_timestep_embed, timestep_embedding

from ..fasterdiffusion import Plan, make_plan, match_step
from ..fasterdiffusion.strategy import Strategy

KEY = "faster_diffusion"
WRAP = comfy.patcher_extension.WrappersMP
log = logging.getLogger("FasterDiffusion")


# --------------------------------------------------------------------------------------------------
# The UNet split
# --------------------------------------------------------------------------------------------------

def embed_time(unet, timesteps, y, dtype, to):
    """Timestep embedding (+ emb_patch, + ADM ``y`` for SDXL): what every decoder step needs anew."""
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(dtype))
    for p in to.get("patches", {}).get("emb_patch", []):
        emb = p(emb, unet.model_channels, to)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    return emb


class Features:
    """Encoder output of one key step: the skip tensors and the middle-block output (before control)."""

    def __init__(self, hs, mid, transformer_index, dtype):
        self.hs, self.mid, self.transformer_index, self.dtype = hs, mid, transformer_index, dtype


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
    return Features(hs, h, to["transformer_index"], x.dtype)


def run_decoder(unet, feats: Features, emb, context, control, to, kwargs):
    """Output blocks + ``out`` on cached features; never reads the latent."""
    to["transformer_index"] = feats.transformer_index
    patches = to.get("patches", {})
    out_patches = patches.get("output_block_patch", [])
    vid = _video_kwargs(unet, kwargs)
    h = _control(feats.mid, control, "middle", in_place=False)
    hs = list(feats.hs)
    for i, module in enumerate(unet.output_blocks):
        to["block"] = ("output", i)
        hsp = _control(hs.pop(), control, "output", in_place=False)
        if out_patches:
            h, hsp = (h.clone() if h is feats.mid else h), (hsp.clone() if hsp is feats.hs[len(hs)] else hsp)
            for p in out_patches:
                h, hsp = p(h, hsp, to)
        h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = hs[-1].shape if hs else None
        h = forward_timestep_embed(module, h, emb, context, to, output_shape, **vid)
    h = h.type(feats.dtype)
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


def _rows(t, n):
    """``n`` copies of a per-call tensor stacked on the batch dim, step-major (None stays None)."""
    if t is None or n == 1:
        return t
    return torch.cat([t] * n)


def run_decoder_batch(unet, feats: Features, steps, context, y, to, kwargs, max_rows):
    """Decoder outputs for several steps of one group from one set of features, in as few batched
    calls as ``max_rows`` (0 = no cap) allows; returns (outputs, steps per call).  ``steps`` holds one
    (timesteps, sigmas) pair of per-row tensors per step.  Rows are independent: sub-batching is exact."""
    b = feats.mid.shape[0]
    per_call = len(steps) if max_rows <= 0 else max(1, max_rows // b)
    outs, widths = [], []
    for s in range(0, len(steps), per_call):
        chunk = steps[s:s + per_call]
        n = len(chunk)
        tb = dict(to)   # the batched call sees a consistent, step-major view of the batch
        tb["cond_or_uncond"] = list(to.get("cond_or_uncond", [])) * n
        tb["uuids"] = list(to.get("uuids", [])) * n
        tb["sigmas"] = torch.cat([sig for _, sig in chunk])
        tb["original_shape"] = [b * n] + list(to.get("original_shape", [b]))[1:]
        big = Features([_rows(t, n) for t in feats.hs], _rows(feats.mid, n), feats.transformer_index, feats.dtype)
        emb = embed_time(unet, torch.cat([t for t, _ in chunk]), _rows(y, n), feats.dtype, tb)
        out = run_decoder(unet, big, emb, _rows(context, n), None, tb, kwargs)
        outs.extend(out.chunk(n))
        widths.append(n)
    return outs, widths


# --------------------------------------------------------------------------------------------------
# Per-run state and the hooks
# --------------------------------------------------------------------------------------------------

class FasterDiffusionConfig:
    """What the Apply node sets; stored in transformer_options[KEY] of the patched clone.  Immutable
    during a run; ``reports`` collects one stats dict per finished run (read by tests and the UI)."""

    def __init__(self, strategy: Strategy, parallel: bool = True, max_decoder_batch: int = 32, node_id=None):
        self.strategy, self.parallel, self.max_decoder_batch, self.node_id = strategy, parallel, max_decoder_batch, node_id
        self.reports: list[dict] = []


class RunState:
    """Everything one sampling run caches; made fresh by the OUTER_SAMPLE wrapper, dropped after."""

    def __init__(self, config: FasterDiffusionConfig, sigmas: torch.Tensor, model_sampling):
        self.config = config
        self.schedule = [float(s) for s in sigmas.flatten().tolist()]   # one host sync per run
        self.plan: Plan = make_plan(config.strategy, max(len(self.schedule) - 1, 0))
        self.timesteps = model_sampling.timestep(sigmas.flatten()).float()  # model t of every step
        self.features: dict = {}      # call slot -> (group, Features)
        self.outputs: dict = {}       # (call slot, step) -> decoder output precomputed in a group batch
        self.parallel_off_reason = None
        self.bypass = None            # why this run computes every step in full, if it does
        self.superseded = False       # a sampler node took this (Apply node's) run over
        self.stats = dict(steps=self.plan.num_steps, strategy=self.plan.strategy, keys=list(self.plan.keys),
                          full_calls=0, encoder_calls=0, cached_calls=0, off_schedule_calls=0,
                          fallback_calls=0, decoder_batches=[], parallel=config.parallel)
        self.t0 = time.perf_counter()

    def step_of(self, to) -> int | None:
        sigmas = to.get("sigmas")
        if sigmas is None or self.plan.num_steps == 0:
            return None
        return match_step(self.schedule, float(sigmas.flatten()[0]))

    def report(self) -> dict:
        s = dict(self.stats, seconds=round(time.perf_counter() - self.t0, 3), ignored_steps=list(self.plan.ignored))
        if self.parallel_off_reason:
            s["parallel_off"] = self.parallel_off_reason
        return s


def call_slot(x, to):
    """Cache key of one model call: which cond chunks, in which order, at which shape."""
    return (tuple(to.get("uuids", ())), tuple(to.get("cond_or_uncond", ())), tuple(x.shape))


def diffusion_model_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    to = transformer_options
    run = to.get(KEY)
    unet = executor.class_obj
    if not isinstance(run, RunState) or type(unet) is not UNetModel or "multigpu_thread_device" in to:
        return executor(x, timesteps, context, y, control, to, **kwargs)
    step = run.step_of(to)
    if step is None:                    # off-schedule evaluation (DPM2, DPM++ 2S, SDE midpoints)
        run.stats["off_schedule_calls"] += 1
        run.stats["full_calls"] += 1
        return executor(x, timesteps, context, y, control, to, **kwargs)
    group = run.plan.group_of(step)
    slot = call_slot(x, to)

    if step != group[0]:                # non-key step: decoder only, never reads x
        cached = run.features.get(slot)
        if cached is not None and cached[0] == group:
            run.stats["cached_calls"] += 1
            out = run.outputs.get((slot, step))   # kept: Heun's corrector asks for the same step twice
            if out is not None and not _has_decoder_control(control):
                return out
            if out is not None:       # a ControlNet became active inside a batched group
                _parallel_off(run, "ControlNet residuals change every step: its steps' decoders ran one at a time")
            emb = embed_time(unet, timesteps, y, cached[1].dtype, to)
            return run_decoder(unet, cached[1], emb, context, control, to, kwargs)
        run.stats["fallback_calls"] += 1   # no features for this call slot: compute in full

    if step != group[0] or len(group) == 1:
        run.stats["full_calls"] += 1
        return executor(x, timesteps, context, y, control, to, **kwargs)

    # Key step of a group with non-key steps after it: one encoder pass serves the whole group.
    run.stats["encoder_calls"] += 1
    emb = embed_time(unet, timesteps, y, x.dtype, to)
    feats = run_encoder(unet, x, emb, context, control, to, kwargs)
    run.features[slot] = (group, feats)
    for k in [k for k in run.outputs if k[0] == slot]:
        del run.outputs[k]
    if not run.config.parallel or _has_decoder_control(control):
        if run.config.parallel:
            _parallel_off(run, "ControlNet residuals change every step: decoders ran one step at a time")
        run.stats["decoder_batches"].append(1)
        return run_decoder(unet, feats, emb, context, control, to, kwargs)
    sig = to["sigmas"]
    steps = [(timesteps, sig)] + [(run.timesteps[s].to(timesteps).expand_as(timesteps),
                                   torch.full_like(sig, run.schedule[s])) for s in group[1:]]
    outs, widths = run_decoder_batch(unet, feats, steps, context, y, to, kwargs, run.config.max_decoder_batch)
    run.stats["decoder_batches"].extend(widths)
    for s, out in zip(group[1:], outs[1:]):
        run.outputs[(slot, s)] = out
    return outs[0]


def _parallel_off(run, reason):
    if run.parallel_off_reason is None:
        run.parallel_off_reason = reason


def _has_decoder_control(control):
    return control is not None and any(len(control.get(k) or []) for k in ("middle", "output"))


# Samplers that cached encoder features cannot serve: every step of theirs then runs in full, with a log
# line.  Found by sampling the digits test model with every stock sampler (tools/sampler_survey.py):
# the rest keep their digit accuracy within 10 points under the paper strategy; these fell 20-70 points.
RENOISING = ("{} re-noises the whole latent every step, so a decoder run on another latent's encoder "
             "features cannot stand in for a step")
STOCHASTIC_HIGH_ORDER = ("{} extrapolates from past predictions while adding fresh noise every step; "
                         "propagated steps throw that off (on the test model digits became unrecognisable)")
BYPASSED_SAMPLERS = {
    "sample_lcm": RENOISING.format("lcm"),
    **{f"sample_{name}": STOCHASTIC_HIGH_ORDER.format(name) for name in (
        "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
        "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "sa_solver", "sa_solver_pece")},
}


def sampler_bypass_reason(sampler) -> str | None:
    fn = getattr(getattr(sampler, "sampler_function", None), "__name__", "")
    if fn in BYPASSED_SAMPLERS:
        return f"the {BYPASSED_SAMPLERS[fn]}: every step ran in full"
    return None


def begin_run(config: FasterDiffusionConfig, sigmas, model_sampling, sampler, model_options) -> tuple[RunState, dict]:
    """A fresh RunState and a clone of ``model_options`` that carries it (and the DIFFUSION_MODEL
    wrapper, for callers that hooked in without the Apply node)."""
    run = RunState(config, sigmas, model_sampling)
    run.bypass = sampler_bypass_reason(sampler)
    if run.plan.ignored:
        log.warning("FasterDiffusion: strategy %s lists steps %s but this run has %d steps; they are ignored",
                    run.plan.strategy, list(run.plan.ignored), run.plan.num_steps)
    options = comfy.model_patcher.create_model_options_clone(model_options)
    to = options["transformer_options"]
    earlier = to.get(KEY)
    if isinstance(earlier, RunState):      # an Apply node's run: the closer (sampler) node's settings win
        earlier.superseded = True
    to[KEY] = None if run.bypass else run
    wrappers = to.setdefault("wrappers", {}).setdefault(WRAP.DIFFUSION_MODEL, {})
    wrappers.setdefault(KEY, [diffusion_model_wrapper])
    return run, options


def finish_run(run: RunState):
    """Drop the run's caches; record, log and show its stats (not for a run a sampler node took over)."""
    run.features.clear()
    run.outputs.clear()
    if run.superseded:
        return
    report = run.report()
    if run.bypass:
        report["bypassed"] = run.bypass
    run.config.reports.append(report)
    text = format_report(report)
    (log.warning if run.bypass else log.info)(text)
    show_on_node(run.config.node_id, text)


def outer_sample_wrapper(executor, *args, **kwargs):
    """The Apply node's hook: fresh per-run state in a cloned model_options, stats in ``finally``."""
    guider = executor.class_obj
    orig = guider.model_options
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
    run, guider.model_options = begin_run(orig["transformer_options"][KEY], sigmas,
                                          guider.model_patcher.get_model_object("model_sampling"), sampler, orig)
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = orig
        finish_run(run)


def format_report(r: dict) -> str:
    if r.get("bypassed"):
        return f"FasterDiffusion [{r['strategy']}]: {r['steps']} steps; {r['bypassed']}"
    batches = r["decoder_batches"]
    text = (f"FasterDiffusion [{r['strategy']}]: {r['steps']} steps, encoder ran {r['encoder_calls'] + r['full_calls']}x "
            f"and was skipped {r['cached_calls']}x (model calls); "
            f"decoder batches {batches if len(batches) <= 12 else str(batches[:12])[:-1] + ', ...]'}; {r['seconds']:.2f}s")
    if r["off_schedule_calls"]:
        text += f"; {r['off_schedule_calls']} off-schedule calls ran in full"
    if r["fallback_calls"]:
        text += f"; {r['fallback_calls']} calls without cached features ran in full"
    if r.get("parallel_off"):
        text += f"; {r['parallel_off']}"
    return text


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
    """Why encoder propagation cannot serve this model, or None if it can."""
    unet = model.get_model_object("diffusion_model")
    if type(unet) is not UNetModel:
        return f"{type(unet).__name__} is not ComfyUI's UNetModel (SD1.x, SD2.x, SDXL)"
    if getattr(unet, "use_temporal_resblocks", False):
        return "video UNets (SVD) are not supported yet"
    return None


def apply_faster_diffusion(model, strategy: Strategy, parallel=True, max_decoder_batch=32, node_id=None):
    """A clone of ``model`` with encoder propagation hooked in (or the model itself, with a log line,
    if it cannot be served)."""
    reason = unsupported_reason(model)
    if reason:
        log.warning("FasterDiffusion: passing the model through unchanged: %s", reason)
        return model, None
    m = model.clone()
    if isinstance(m.model_options["transformer_options"].get(KEY), FasterDiffusionConfig):
        log.info("FasterDiffusion: the model was already patched; the settings of the last Apply node win")
        for wrapper_type in (WRAP.OUTER_SAMPLE, WRAP.DIFFUSION_MODEL):
            m.remove_wrappers_with_key(wrapper_type, KEY)
    if m.get_wrappers(WRAP.DIFFUSION_MODEL, "easycache"):
        log.warning("FasterDiffusion: EasyCache/LazyCache is also applied to this model; both skip work "
                    "at the same steps in different ways, and the combination is untested")
    config = FasterDiffusionConfig(strategy, parallel, max_decoder_batch, node_id)
    m.model_options["transformer_options"][KEY] = config
    m.add_wrapper_with_key(WRAP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(WRAP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    return m, config
