"""The diffusers UNet split: ``UNet2DConditionModel`` encoder and decoder apart (``DiffusersUNetAdapter``), and
what it refuses (models, attention processors, schedulers, call arguments), with the reason."""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, replace

import torch

from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput

from ..runtime import Features, ModelCall, repeat_rows as _rows
from ..samplers import bypass_reason, forecast_off_reason

log = logging.getLogger("FasterDiffusion")


# Attention processors that treat every batch row on its own (a batched decoder call stacks steps on the
# batch dimension).  Others (IP-Adapter, PAG, custom ones that may count steps) make the run compute in full.
# (AttnAddedKV: DeepFloyd-IF's self+text attention; its group norms are per row.)
ROW_WISE_PROCESSORS = frozenset({"AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor",
                                 "FusedAttnProcessor2_0", "AttnProcessorNPU", "XLAFlashAttnProcessor2_0",
                                 "AttnAddedKVProcessor", "AttnAddedKVProcessor2_0"})
# Text2Video-Zero's cross-frame attention: a call's rows are ``batch_size`` videos of consecutive frames, each frame
# attending to its video's first.  A batched decoder call stacks whole steps step-major, so each step's videos stay
# consecutive and whole: the grouping is the same with ``batch_size`` times the steps (``frame_groups``).
FRAME_GROUPED_PROCESSORS = frozenset({"CrossFrameAttnProcessor", "CrossFrameAttnProcessor2_0"})

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
    if c.addition_embed_type not in (None, "text", "text_time"):
        return (f"addition_embed_type={c.addition_embed_type!r} "
                "(only None, DeepFloyd-IF's 'text' and SDXL's 'text_time' are mirrored)")
    if c.encoder_hid_dim_type not in (None, "text_proj"):
        return (f"encoder_hid_dim_type={c.encoder_hid_dim_type!r} "
                "(IP-Adapter and image projections are not mirrored; unload the IP-Adapter)")
    return None


def attention_processors(model) -> list:
    """``model``'s attention processors: those diffusers' ``attn_processors`` lists (every submodule's
    ``get_processor()``), also of a model without that property (DiT's transformer)."""
    return [m.get_processor() for m in model.modules() if hasattr(m, "get_processor")]


def unsupported_processor_reason(unet) -> str | None:
    names = sorted({type(p).__name__ for p in attention_processors(unet)} - ROW_WISE_PROCESSORS
                   - FRAME_GROUPED_PROCESSORS)
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
    steps: int = 1                                  # steps stacked step-major in this call (``tile``)


@contextlib.contextmanager
def frame_groups(unet, steps: int):
    """Cross-frame attention processors (``FRAME_GROUPED_PROCESSORS``) told that a call stacks ``steps`` steps: their
    ``batch_size`` times ``steps`` while it runs (each processor splits the rows into ``batch_size`` groups)."""
    processors = unet.attn_processors.values() if steps > 1 else ()
    scaled = {id(p): (p, p.batch_size) for p in processors if type(p).__name__ in FRAME_GROUPED_PROCESSORS}
    for p, size in scaled.values():
        p.batch_size = size * steps
    try:
        yield
    finally:
        for p, size in scaled.values():
            p.batch_size = size


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


def bind_arguments(signature: inspect.Signature, unet, args=(), kwargs=None) -> dict | None:
    """A forward's arguments by name (``signature``: the forward's), defaults filled in (None if they do not bind)."""
    try:
        bound = signature.bind(unet, *args, **(kwargs or {}))
    except TypeError:
        return None
    bound.apply_defaults()
    a = dict(bound.arguments)
    del a["self"]
    return a


def forward_arguments(unet, args=(), kwargs=None) -> dict | None:
    """``UNet2DConditionModel.forward``'s arguments by name, defaults filled in (None if they do not bind)."""
    return bind_arguments(_FORWARD_SIGNATURE, unet, args, kwargs)


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


class AdapterBase:
    """What every diffusers adapter shares: it refuses a UNet its ``unsupported_reason`` names, and binds the
    arguments of its ``unet_class``'s forward (the signature read once per adapter class)."""
    unet_class: type

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._signature = inspect.signature(cls.unet_class.forward)

    def __init__(self, unet):
        reason = self.unsupported_reason(unet)
        if reason:
            raise TypeError(f"FasterDiffusion cannot serve this UNet: {reason}")
        self.unet = unet

    @classmethod
    def for_run(cls, unet, settings) -> "AdapterBase":
        """The adapter ``apply`` uses for ``settings`` (a transformer's reads ``settings.encoder_blocks``)."""
        return cls(unet)

    def arguments(self, args, kwargs) -> dict | None:
        return bind_arguments(self._signature, self.unet, args, kwargs)


class DiffusersUNetAdapter(AdapterBase):
    """The runtime's UNetAdapter for diffusers' ``UNet2DConditionModel``.

    Differences from the host forward, all deliberate: ControlNet residuals are added in the decoder (out
    of place, as the host does), so the cached features are the clean skips and middle output and every
    decoder call gets its own step's residuals; the cached middle output is cloned before the up blocks
    (FreeU scales it in place).

    Besides the runtime's protocol, every diffusers adapter gives the pipeline glue (``pipeline.py``) what it
    needs of one UNet class: ``unsupported_reason(unet)``, ``arguments`` (the forward's, by name),
    ``call_reason`` (why a call cannot be split), ``conditioning`` (the objects that tell call slots apart),
    ``make_call`` and ``output`` (the forward's return value).
    """
    unet_class = UNet2DConditionModel

    # ---- the pipeline glue's side

    @staticmethod
    def unsupported_reason(unet) -> str | None:
        return unsupported_unet_reason(unet)

    def call_reason(self, a: dict) -> str | None:
        return unsupported_call_reason(a)

    def conditioning(self, a: dict) -> tuple:
        added = a["added_cond_kwargs"] or {}
        return (a["encoder_hidden_states"], a["class_labels"], added.get("text_embeds"), added.get("time_ids"),
                a["attention_mask"], a["encoder_attention_mask"])

    def make_call(self, a: dict, slot=()) -> ModelCall:
        return make_call(a, slot)

    def output(self, sample: torch.Tensor, return_dict: bool):
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

    # ---- the runtime's side

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
        with frame_groups(self.unet, call.host.steps):
            return self._decode(call, features, emb)

    def _decode(self, call: ModelCall, features: Features, emb: torch.Tensor) -> torch.Tensor:
        u, h = self.unet, call.host
        forward_upsample_size = features.meta
        upsample_size = None
        attention_mask, encoder_attention_mask = _mask_biases(call)
        encoder_hidden_states = self._hidden_states(call)
        down_block_res_samples = tuple(features.skips)
        if self.own_step_reason(call):
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
                             _rows(h.encoder_attention_mask, n), h.cross_attention_kwargs, None, None, steps=n)
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=_rows(call.context, n), host=host)

    def own_step_reason(self, call: ModelCall) -> str | None:
        h = call.host
        return "ControlNet residuals change every step" if h.down_residuals is not None and h.mid_residual is not None else None


