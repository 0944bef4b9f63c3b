"""FasterDiffusion for diffusers: ``handle = apply(pipe)`` on a Stable Diffusion pipeline.

Imported only on request (``from fasterdiffusion.diffusers import apply``); ``import fasterdiffusion``
never imports diffusers.  The method itself is the engine's ``Run`` (``fasterdiffusion.runtime``); this
module is the diffusers adapter (``DiffusersUNetAdapter``: the UNet split) and thin glue (``apply``).

How it hooks, and why
  * **The UNet forward**: a diffusers ``ModelHook`` named ``faster_diffusion`` in the UNet's
    ``HookRegistry`` (diffusers' public hook system, as its own cache hooks use).  Its ``new_forward``
    hands every call made during a pipeline call to that call's ``Run``; anything else (a direct
    ``unet(...)`` call, an unsupported feature) goes to the original forward unchanged.
  * **Run boundaries = one pipeline call.**  Python looks ``pipe(...)`` up on ``type(pipe)``, so a
    per-instance wrapper of ``__call__`` needs a per-instance subclass: ``apply`` swaps ``pipe.__class__``
    to a subclass with the same name, module and signature whose ``__call__`` opens a call state, runs the
    original ``__call__`` and finishes the run in ``finally`` (one ``handle.reports`` entry per call that
    ran the UNet); ``remove`` swaps the class back.  Nothing is stored on the pipeline instance.
  * **The schedule** is only known once the pipeline has set the scheduler's timesteps (and, for img2img,
    its begin index), so the ``Run`` is made at the first UNet call of a pipeline call: the schedule is the
    slice of ``pipe.scheduler.timesteps`` the loop iterates, ``[begin, begin + pipe.num_timesteps)``, with
    ``begin`` from ``scheduler.begin_index`` where the scheduler has one (set by img2img's ``strength`` and
    SDXL's ``denoising_start``), else ``len(timesteps) - num_timesteps`` (img2img on DDIM/PNDM, which have
    no begin index), else 0 (SDXL ``denoising_end``) -- each candidate only if its timestep is the one the
    first call carries.  Key steps count within each call, from that begin.
  * **Step placement is by position in the loop.**  During a pipeline call the scheduler's ``step`` is
    wrapped (an instance attribute with the original signature, so the pipelines' ``inspect`` checks for
    ``eta``/``generator`` see the same parameters; removed when the call ends, so a scheduler swapped in by
    the user is picked up at the next call).  Each ``scheduler.step`` ends one loop iteration: the position
    advances and the run starts a new sampler evaluation (``Run.begin_evaluation``), so a second UNet call
    in one iteration is a pass of its own.  A UNet call whose timestep is not the one its position expects
    (PLMS repeats a timestep value: the position tells them apart), or that comes after the schedule's end,
    runs the full UNet (counted as off-schedule).
  * **Sigmas**: placement does not use them; the run gets the VE sigma sqrt((1 - a)/a) of each step's
    timestep (``alphas_cumprod`` interpolated at fractional timesteps) plus a final 0, for its records.
  * **A step** is one UNet evaluation of the loop: schedulers of order 2 (Heun, KDPM2) and PNDM (whose
    timesteps have one more entry than ``num_inference_steps``) count each of their evaluations.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass, replace

import torch

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from diffusers.utils import USE_PEFT_BACKEND

from .runtime import Features, ModelCall, Run, RunConfig, format_report, repeat_rows as _rows
from .forecast import DEFAULT_PROPAGATION, forecast_settings
from .samplers import bypass_reason, forecast_off_reason
from .strategy import Strategy, parse_strategy

log = logging.getLogger("FasterDiffusion")

HOOK_NAME = "faster_diffusion"
HANDLE_ATTR = "_faster_diffusion_handle"      # a class attribute of the per-instance subclass only

# Pipelines whose denoising loop is known: one UNet call and one scheduler.step per iteration, the same
# prompt embeddings object every iteration.  Exact classes: a subclass may change the loop.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
                       "StableDiffusionXLImg2ImgPipeline", "StableDiffusionControlNetPipeline",
                       "StableDiffusionControlNetImg2ImgPipeline")

# Attention processors that treat every batch row on its own (a batched decoder call stacks steps on the
# batch dimension).  Others (IP-Adapter, PAG, custom ones that may count steps) make the run compute in full.
ROW_WISE_PROCESSORS = frozenset({"AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor",
                                 "FusedAttnProcessor2_0", "AttnProcessorNPU", "XLAFlashAttnProcessor2_0"})

_FORWARD_SIGNATURE = inspect.signature(UNet2DConditionModel.forward)
MIRRORED_VERSION = "0.42.1"     # the diffusers release whose UNet2DConditionModel.forward the split mirrors


# --------------------------------------------------------------------------------------------------
# What the split mirrors, and what it refuses
# --------------------------------------------------------------------------------------------------

def unsupported_unet_reason(unet) -> str | None:
    """Why the split cannot serve this UNet (its class or configuration), or None if it can."""
    if type(unet) is not UNet2DConditionModel:
        return (f"{type(unet).__name__} is not diffusers' UNet2DConditionModel "
                "(the only UNet class FasterDiffusion's diffusers adapter mirrors: SD1.x, SD2.x, SDXL)")
    c = unet.config
    if c.time_cond_proj_dim is not None:
        return f"time_cond_proj_dim={c.time_cond_proj_dim} (a guidance-embedding / LCM-distilled UNet)"
    if c.addition_embed_type not in (None, "text_time"):
        return f"addition_embed_type={c.addition_embed_type!r} (only None and SDXL's 'text_time' are mirrored)"
    if c.encoder_hid_dim_type not in (None, "text_proj"):
        return (f"encoder_hid_dim_type={c.encoder_hid_dim_type!r} "
                "(IP-Adapter and image projections are not mirrored; unload the IP-Adapter)")
    return None


def unsupported_processor_reason(unet) -> str | None:
    names = sorted({type(p).__name__ for p in unet.attn_processors.values()} - ROW_WISE_PROCESSORS)
    if names:
        return f"attention processors {', '.join(names)} are not known to treat batch rows independently"
    return None


def scheduler_bypass_reason(scheduler) -> str | None:
    """The sampler policy (fasterdiffusion.samplers) for diffusers' schedulers."""
    name = type(scheduler).__name__
    if name == "LCMScheduler":
        return bypass_reason("lcm")
    if name == "TCDScheduler":
        return ("the TCDScheduler re-noises the latent every step, so a decoder run on another latent's "
                "encoder features cannot stand in for a step: every step ran in full")
    algorithm = getattr(scheduler.config, "algorithm_type", "") or ""
    if name == "DPMSolverMultistepScheduler" and algorithm.startswith("sde-"):
        return bypass_reason("dpmpp_3m_sde" if scheduler.config.solver_order == 3 else "dpmpp_2m_sde")
    return None


def scheduler_forecast_off_reason(scheduler, steps: int) -> str | None:
    """The forecast policy (fasterdiffusion.samplers) for diffusers' schedulers: those that add fresh noise every
    step (ancestral Euler, SDE solvers, DDPM) reuse features."""
    name = type(scheduler).__name__
    kind = ("euler_ancestral" if name in ("EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler") else
            "sde" if name in ("DPMSolverSDEScheduler", "DDPMScheduler") else
            "dpmpp_2m" if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler",
                                   "PNDMScheduler", "DEISMultistepScheduler") else None)
    return kind and forecast_off_reason(kind, steps, shown_as=name)


def unsupported_call_reason(a: dict) -> str | None:
    """Why one UNet call (its bound forward arguments) cannot be split, or None."""
    if a["down_intrablock_additional_residuals"] is not None or (
            a["down_block_additional_residuals"] is not None and a["mid_block_additional_residual"] is None):
        return "T2I-Adapter residuals (down_intrablock_additional_residuals) act inside the encoder"
    if a["timestep_cond"] is not None:
        return "timestep_cond (a guidance embedding) is not mirrored"
    extra = sorted(set(a["cross_attention_kwargs"] or {}) - {"scale"})
    if extra:
        return ("GLIGEN (cross_attention_kwargs['gligen'])" if "gligen" in extra else
                f"cross_attention_kwargs {extra} may depend on the step or the batch layout")
    extra = sorted(set(a["added_cond_kwargs"] or {}) - {"text_embeds", "time_ids"})
    if extra:
        return f"added_cond_kwargs {extra} (e.g. IP-Adapter image_embeds) are not mirrored"
    return None


# --------------------------------------------------------------------------------------------------
# The split, line for line with UNet2DConditionModel.forward of diffusers 0.42.1
# (models/unets/unet_2d_condition.py), with the host's own helpers where the forward calls them
# --------------------------------------------------------------------------------------------------

@dataclass
class DiffusersCall:
    """The diffusers side of one call: what the forward takes besides sample/timestep/hidden states."""
    class_labels: torch.Tensor | None = None
    added_cond_kwargs: dict | None = None
    attention_mask: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None
    cross_attention_kwargs: dict | None = None      # without the LoRA "scale" (popped, as the forward's decorator does)
    down_residuals: tuple | None = None             # ControlNet: added to the skips (decoder side)
    mid_residual: torch.Tensor | None = None        # ControlNet: added to the middle block's output


def row_timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
    """The forward's timestep normalisation (``get_time_embed``): a per-row tensor on the sample's device."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        if sample.device.type in ("mps", "npu") and dtype is torch.float64:   # maybe_adjust_dtype_for_device
            dtype = torch.float32
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    return timesteps.expand(sample.shape[0])


def forward_arguments(unet, args=(), kwargs=None) -> dict | None:
    """The forward's arguments by name, defaults filled in (None if they do not bind)."""
    try:
        bound = _FORWARD_SIGNATURE.bind(unet, *args, **(kwargs or {}))
    except TypeError:
        return None
    bound.apply_defaults()
    a = dict(bound.arguments)
    del a["self"]
    return a


def make_call(a: dict, slot=()) -> ModelCall:
    """A ModelCall from the bound forward arguments ``a`` (``cross_attention_kwargs`` as given)."""
    sample = a["sample"]
    cak = a["cross_attention_kwargs"]
    if cak is not None:
        cak = {k: v for k, v in cak.items() if k != "scale"}
    control = a["down_block_additional_residuals"] is not None and a["mid_block_additional_residual"] is not None
    host = DiffusersCall(a["class_labels"], a["added_cond_kwargs"], a["attention_mask"], a["encoder_attention_mask"],
                         cak, tuple(a["down_block_additional_residuals"]) if control else None,
                         a["mid_block_additional_residual"] if control else None)
    return ModelCall(sample, row_timesteps(a["timestep"], sample), a["encoder_hidden_states"], None, sample.dtype,
                     slot, host)


def _mask_biases(call: ModelCall):
    """The forward's attention_mask / encoder_attention_mask -> additive biases with a query dim."""
    h = call.host
    am, eam = h.attention_mask, h.encoder_attention_mask
    if am is not None:
        am = ((1 - am.to(call.dtype)) * -10000.0).unsqueeze(1)
    if eam is not None:
        eam = ((1 - eam.to(call.dtype)) * -10000.0).unsqueeze(1)
    return am, eam


class DiffusersUNetAdapter:
    """The runtime's UNetAdapter for diffusers' ``UNet2DConditionModel``.

    Differences from the host forward, all deliberate: ControlNet residuals are added in the decoder (out
    of place, as the host does), so the cached features are the clean skips and middle output and every
    decoder call gets its own step's residuals; the cached middle output is cloned before the up blocks
    (FreeU scales it in place).
    """

    def __init__(self, unet):
        reason = unsupported_unet_reason(unet)
        if reason:
            raise TypeError(f"FasterDiffusion cannot serve this UNet: {reason}")
        self.unet = unet

    def _shape_of(self, call: ModelCall):
        # get_time_embed / get_class_embed read only the sample's batch size, dtype and device
        return torch.empty((call.rows, 0), dtype=call.dtype, device=call.timesteps.device)

    def embed(self, call: ModelCall) -> torch.Tensor:
        u, h = self.unet, call.host
        stand_in = self._shape_of(call)
        # 1. time
        t_emb = u.get_time_embed(sample=stand_in, timestep=call.timesteps)
        emb = u.time_embedding(t_emb, None)            # timestep_cond is refused (time_cond_proj_dim)
        class_emb = u.get_class_embed(sample=stand_in, class_labels=h.class_labels)
        if class_emb is not None:
            if u.config.class_embeddings_concat:
                emb = torch.cat([emb, class_emb], dim=-1)
            else:
                emb = emb + class_emb
        aug_emb = u.get_aug_embed(emb=emb, encoder_hidden_states=call.context, added_cond_kwargs=h.added_cond_kwargs)
        emb = emb + aug_emb if aug_emb is not None else emb     # ("image_hint" is refused)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        return emb

    def _hidden_states(self, call: ModelCall):
        return self.unet.process_encoder_hidden_states(encoder_hidden_states=call.context,
                                                       added_cond_kwargs=call.host.added_cond_kwargs)

    def encode(self, call: ModelCall, emb: torch.Tensor) -> Features:
        u, h = self.unet, call.host
        sample = call.x
        forward_upsample_size = any(dim % (2 ** u.num_upsamplers) != 0 for dim in sample.shape[-2:])
        attention_mask, encoder_attention_mask = _mask_biases(call)
        # 0. center input if necessary
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        encoder_hidden_states = self._hidden_states(call)
        # 2. pre-process
        sample = u.conv_in(sample)
        # 3. down (T2I-Adapter residuals and GLIGEN are refused)
        down_block_res_samples = (sample,)
        for downsample_block in u.down_blocks:
            if hasattr(downsample_block, "has_cross_attention") and downsample_block.has_cross_attention:
                sample, res_samples = downsample_block(
                    hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                    attention_mask=attention_mask, cross_attention_kwargs=h.cross_attention_kwargs,
                    encoder_attention_mask=encoder_attention_mask)
            else:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb)
            down_block_res_samples += res_samples
        # (ControlNet's down residuals are added to the skips in ``decode``: they only reach the up blocks)
        # 4. mid
        if u.mid_block is not None:
            if hasattr(u.mid_block, "has_cross_attention") and u.mid_block.has_cross_attention:
                sample = u.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states,
                                     attention_mask=attention_mask, cross_attention_kwargs=h.cross_attention_kwargs,
                                     encoder_attention_mask=encoder_attention_mask)
            else:
                sample = u.mid_block(sample, emb)
        return Features(list(down_block_res_samples), sample, forward_upsample_size)

    def decode(self, call: ModelCall, features: Features, emb: torch.Tensor) -> torch.Tensor:
        u, h = self.unet, call.host
        forward_upsample_size = features.meta
        upsample_size = None
        attention_mask, encoder_attention_mask = _mask_biases(call)
        encoder_hidden_states = self._hidden_states(call)
        down_block_res_samples = tuple(features.skips)
        if self.has_decoder_control(call):
            down_block_res_samples = tuple(s + r for s, r in zip(down_block_res_samples, h.down_residuals))
            sample = features.mid + h.mid_residual
        else:
            sample = features.mid.clone()      # never hand a cached tensor to the up blocks (FreeU: in place)
        # 5. up
        for i, upsample_block in enumerate(u.up_blocks):
            is_final_block = i == len(u.up_blocks) - 1
            res_samples = down_block_res_samples[-len(upsample_block.resnets):]
            down_block_res_samples = down_block_res_samples[: -len(upsample_block.resnets)]
            if not is_final_block and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            if hasattr(upsample_block, "has_cross_attention") and upsample_block.has_cross_attention:
                sample = upsample_block(
                    hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                    encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=h.cross_attention_kwargs,
                    upsample_size=upsample_size, attention_mask=attention_mask,
                    encoder_attention_mask=encoder_attention_mask)
            else:
                sample = upsample_block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                                        upsample_size=upsample_size)
        # 6. post-process
        if u.conv_norm_out:
            sample = u.conv_norm_out(sample)
            sample = u.conv_act(sample)
        return u.conv_out(sample)

    def tile(self, call: ModelCall, n: int, timesteps: torch.Tensor, sigmas) -> ModelCall:
        h = call.host
        added = None if h.added_cond_kwargs is None else {k: _rows(v, n) for k, v in h.added_cond_kwargs.items()}
        host = DiffusersCall(_rows(h.class_labels, n), added, _rows(h.attention_mask, n),
                             _rows(h.encoder_attention_mask, n), h.cross_attention_kwargs, None, None)
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=_rows(call.context, n), host=host)

    def has_decoder_control(self, call: ModelCall) -> bool:
        h = call.host
        return h.down_residuals is not None and h.mid_residual is not None


# --------------------------------------------------------------------------------------------------
# The glue: one Run per pipeline call
# --------------------------------------------------------------------------------------------------

def schedule_sigmas(scheduler, timesteps: list) -> list:
    """sqrt((1 - a)/a) at each step's timestep (``alphas_cumprod`` interpolated), then 0: the run's records."""
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
        self.pos = 0
        self._objects: list = []       # conditioning tensors seen in this call (held: ids stay unique)

    def end_of_iteration(self):
        self.pos += 1
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
        reason = (scheduler_bypass_reason(sched) or unsupported_unet_reason(self.handle.unet)
                  or unsupported_processor_reason(self.handle.unet) or unsupported_call_reason(a))
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
        self.run = Run(self.handle.config, schedule_sigmas(sched, self.schedule), self.schedule, bypass=reason,
                       forecast_off=scheduler_forecast_off_reason(sched, len(self.schedule)))
        if self.run.plan.ignored:
            log.warning("FasterDiffusion: strategy %s lists steps %s but this call has %d steps; they are ignored",
                        self.run.plan.strategy, list(self.run.plan.ignored), self.run.plan.num_steps)

    def step_of(self, t: torch.Tensor) -> int | None:
        """The loop position if the call's timestep is the one the position expects, else None."""
        if self.pos >= len(self.schedule):
            return None
        lo, hi = torch.stack([t.min(), t.max()]).double().tolist()      # one host sync per call
        expected = self.schedule[self.pos]
        return self.pos if _same_t(lo, expected) and _same_t(hi, expected) else None

    def unet_call(self, module, original, args, kwargs):
        a = forward_arguments(module, args, kwargs)
        if a is None:
            return original(*args, **kwargs)          # let the host say what is wrong with the call
        t = row_timesteps(a["timestep"], a["sample"])
        if self.run is None:
            self._start(a, t)
        step = None if unsupported_call_reason(a) else self.step_of(t)
        cak = a["cross_attention_kwargs"]
        lora_scale = cak.get("scale", 1.0) if cak is not None else 1.0
        added = a["added_cond_kwargs"] or {}
        slot = (tuple(a["sample"].shape), str(a["sample"].dtype), self._ident(a["encoder_hidden_states"]),
                self._ident(a["class_labels"]), self._ident(added.get("text_embeds")), self._ident(added.get("time_ids")),
                self._ident(a["attention_mask"]), self._ident(a["encoder_attention_mask"]), lora_scale)
        call = make_call(a, slot)
        adapter = self.handle.adapter
        if USE_PEFT_BACKEND and lora_scale != 1.0:
            # the forward's @apply_lora_scale, around the whole call: the split calls blocks directly
            from diffusers.utils import scale_lora_layers, unscale_lora_layers
            a["cross_attention_kwargs"] = call.host.cross_attention_kwargs
            scale_lora_layers(module, lora_scale)
            try:
                out = self.run.forward(adapter, call, step, lambda: _sample_of(original(**a)))
            finally:
                unscale_lora_layers(module, lora_scale)
        else:
            out = self.run.forward(adapter, call, step, lambda: _sample_of(original(*args, **kwargs)))
        return UNet2DConditionOutput(sample=out) if a["return_dict"] else (out,)


def _sample_of(output):
    return output[0] if isinstance(output, tuple) else output.sample


class _UNetHook(ModelHook):
    """The UNet forward hook: calls during a pipeline call go to its run, the rest to the original."""

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

    def __init__(self, pipe, config: RunConfig):
        self.pipe = pipe
        self.unet = pipe.unet
        self.config = config
        self.adapter = DiffusersUNetAdapter(self.unet)
        self.reports: list[dict] = []
        self._active: _PipelineCall | None = None
        self._removed = False
        # the UNet hook (remember what the UNet had, to leave nothing behind on remove)
        self._had_registry = hasattr(self.unet, "_diffusers_hook")
        self._had_forward = "forward" in vars(self.unet)
        registry = HookRegistry.check_if_exists_or_initialize(self.unet)
        registry.register_hook(_UNetHook(self), HOOK_NAME)
        self._forward = vars(self.unet)["forward"]
        # the per-instance subclass that owns the pipeline call
        self._pipe_class = type(pipe)
        pipe.__class__ = _owning_subclass(self._pipe_class, self)

    @property
    def strategy(self) -> Strategy:
        return self.config.strategy

    def _pipeline_call(self, call_original, pipe, args, kwargs):
        if self._active is not None or pipe.unet is not self.unet:
            if pipe.unet is not self.unet:
                log.warning("FasterDiffusion: pipe.unet was replaced after apply(); this call runs unpatched")
            return call_original(pipe, *args, **kwargs)
        state = _PipelineCall(self, pipe)
        scheduler = pipe.scheduler
        had_step = "step" in vars(scheduler)
        step = scheduler.step

        @functools.wraps(step)
        def scheduler_step(*a, **k):
            try:
                return step(*a, **k)
            finally:
                state.end_of_iteration()

        vars(scheduler)["step"] = scheduler_step
        self._active = state
        try:
            return call_original(pipe, *args, **kwargs)
        finally:
            self._active = None
            if had_step:
                vars(scheduler)["step"] = step
            else:
                vars(scheduler).pop("step", None)
            if state.run is not None:
                report = state.run.finish()
                self.reports.append(report)
                (log.warning if report.get("bypassed") else log.info)(format_report(report))

    def remove(self):
        """Restore the pipeline and its UNet exactly as they were before ``apply``."""
        if self._removed:
            return
        if self._active is not None:
            raise RuntimeError("FasterDiffusion: remove() cannot run inside a pipeline call")
        registry = self.unet._diffusers_hook
        if vars(self.unet).get("forward") is not self._forward and registry._hook_order[-1:] == [HOOK_NAME]:
            # diffusers' registry would put the original forward back over the later wrapper (e.g. accelerate's
            # CPU offload hook) and silently break it
            raise RuntimeError("FasterDiffusion: unet.forward was wrapped after apply() (CPU offload?); remove that "
                               "first (pipe.remove_all_hooks()), then call remove()")
        self._removed = True
        if vars(type(self.pipe)).get(HANDLE_ATTR) is self:
            self.pipe.__class__ = self._pipe_class
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks:
            if not self._had_forward:
                vars(self.unet).pop("forward", None)
            if not self._had_registry:
                del self.unet._diffusers_hook

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
          propagation: str = DEFAULT_PROPAGATION):
    """Patch ``pipe`` (a Stable Diffusion / SDXL / ControlNet pipeline, text-to-image or img2img) in place
    with encoder propagation and parallel decoders; returns the handle (``reports``, ``remove()``).
    ``propagation``: what non-key decoders get, "forecast" (features extrapolated from the last key steps;
    ancestral / SDE schedulers reuse) or "reuse" (the last key step's, the paper's).

    Applying again replaces the earlier patch (the last settings win).  Raises TypeError for a pipeline or
    UNet it cannot serve, and StrategyError for a bad strategy string (the message shows the grammar).
    """
    config = RunConfig(parse_strategy(strategy) if isinstance(strategy, str) else strategy, bool(parallel),
                       int(max_decoder_batch), forecast_settings(propagation))
    if config.max_decoder_batch < 0:
        raise ValueError("FasterDiffusion: max_decoder_batch must be >= 0 (0 = no cap)")
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
    unet = getattr(pipe, "unet", None)
    reason = unsupported_unet_reason(unet)
    if reason:
        raise TypeError(f"FasterDiffusion cannot serve {name}.unet: {reason}")
    if hasattr(unet, "_hf_hook"):
        # an accelerate hook (CPU offload) inside ours would be skipped by the split, which calls the blocks
        raise RuntimeError("FasterDiffusion: the UNet has an accelerate hook (CPU offload): call apply() first, "
                           "then enable_model_cpu_offload() (pipe.remove_all_hooks() removes it)")
    return FasterDiffusionHandle(pipe, config)


# --------------------------------------------------------------------------------------------------
# TiUE one-pass sampling (arXiv 2505.21960): the engine's one_pass on a Stable Diffusion pipeline
# --------------------------------------------------------------------------------------------------

def one_pass(pipe, prompt=None, *, k: int = 4, num_images_per_prompt: int = 1, generator=None, latents=None,
             prompt_embeds=None, height: int | None = None, width: int | None = None, max_decoder_batch: int = 32,
             output_type: str = "pil"):
    """Generate with a TiUE one-pass student in a ``StableDiffusionPipeline`` (SD1.x / SD2.x): the encoder once
    on the noise at the first of ``k`` DDIM timesteps (leading spacing with the scheduler's ``steps_offset``),
    the ``k`` decoders in one batch (split under ``max_decoder_batch`` rows), closed-form DDIM (eta 0), then
    the VAE.  No CFG (guidance is distilled into the student); no scheduler loop.  The schedule, the
    parametrisation (epsilon or v_prediction) and where the last update lands (``set_alpha_to_one``) come from
    ``pipe.scheduler.config``.  Returns images as ``output_type`` says ("pil", "np", "pt") or, for "latent",
    the latents.  Not a pipeline call: ``apply()``'s hooks are not involved.
    """
    from .onepass import OnePassError, ddim_timesteps
    from .onepass import one_pass as engine_one_pass
    name = type(pipe).__name__
    if name not in ("StableDiffusionPipeline",):
        raise TypeError(f"FasterDiffusion one_pass: {name} is not supported (StableDiffusionPipeline only)")
    unet = pipe.unet
    config = pipe.scheduler.config
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(config.get("prediction_type", "epsilon"))
    if prediction is None:
        raise OnePassError(f"FasterDiffusion one_pass: prediction_type {config.get('prediction_type')!r} has no "
                           "closed-form DDIM here (epsilon and v_prediction do)")
    alphas = getattr(pipe.scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise OnePassError(f"FasterDiffusion one_pass: {type(pipe.scheduler).__name__} has no alphas_cumprod")
    alphas = alphas.double().cpu()
    timesteps = ddim_timesteps(k, int(config.get("num_train_timesteps", len(alphas))), int(config.get("steps_offset", 0)))
    final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas[0])
    device = pipe._execution_device
    with torch.no_grad():
        if prompt_embeds is None:
            prompt_embeds, _ = pipe.encode_prompt(prompt, device, num_images_per_prompt, False)
        batch = prompt_embeds.shape[0]
        height = height or unet.config.sample_size * pipe.vae_scale_factor
        width = width or unet.config.sample_size * pipe.vae_scale_factor
        shape = (batch, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device, prompt_embeds.dtype)
        call = ModelCall(latents, torch.full((batch,), timesteps[0], device=device, dtype=torch.int64), prompt_embeds,
                         None, latents.dtype, (), DiffusersCall())
        res = engine_one_pass(DiffusersUNetAdapter(unet), call, timesteps, alphas, final, max_decoder_batch, prediction)
        z = res.latent.to(prompt_embeds.dtype)
        if output_type == "latent":
            return z
        image = pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)
