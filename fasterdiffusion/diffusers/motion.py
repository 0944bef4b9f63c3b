"""The diffusers split of ``UNetMotionModel`` (AnimateDiff: ``AnimateDiffPipeline``, ``AnimateDiffSDXLPipeline``):
encoder and decoder apart (``MotionUNetAdapter``), line for line with its forward in diffusers 0.42.1
(models/unets/unet_motion_model.py), and what it refuses, with the reason.

The forward folds the frames into the batch: a sample [videos, C, frames, H, W] runs as (videos * frames) rows, video
by video, and every motion module reshapes its rows by ``num_frames`` (the sample's shape[2]).  So the runtime's rows
here are frames (``max_decoder_batch`` counts frames), and a batched decoder call stacks whole calls step-major: each
step's videos keep their frames together, and the motion modules see ``steps * videos`` videos of ``num_frames``.
FreeNoise (``enable_free_noise``) keeps the call pattern, one call per step on all frames: its context windows run
inside the motion modules' transformer blocks, row by row, so it is served like any call.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch

from diffusers.models.unets.unet_motion_model import UNetMotionModel, UNetMotionOutput

from ..runtime import Features, ModelCall, repeat_rows as _rows
from .unet import AdapterBase, bind_arguments, row_timesteps

_FORWARD_SIGNATURE = inspect.signature(UNetMotionModel.forward)


def unsupported_unet_reason(unet) -> str | None:
    """Why the split cannot serve this UNet (its class or configuration), or None if it can."""
    if type(unet) is not UNetMotionModel:
        return f"{type(unet).__name__} is not diffusers' UNetMotionModel (AnimateDiff)"
    c = unet.config
    if c.time_cond_proj_dim is not None:
        return f"time_cond_proj_dim={c.time_cond_proj_dim} (a guidance-embedding / LCM-distilled UNet)"
    if c.encoder_hid_dim_type is not None:
        return (f"encoder_hid_dim_type={c.encoder_hid_dim_type!r} "
                "(IP-Adapter image projections are not mirrored; unload the IP-Adapter)")
    return None


def unsupported_call_reason(unet, a: dict) -> str | None:
    """Why one UNet call (its bound forward arguments) cannot be split, or None."""
    if a["sample"].dim() != 5:
        return f"the sample has shape {tuple(a['sample'].shape)}, not [videos, channels, frames, height, width]"
    if a["down_block_additional_residuals"] is not None or a["mid_block_additional_residual"] is not None:
        return "ControlNet residuals (AnimateDiffControlNetPipeline) are not mirrored for UNetMotionModel"
    if a["timestep_cond"] is not None:
        return "timestep_cond (a guidance embedding) is not mirrored"
    extra = sorted(set(a["cross_attention_kwargs"] or {}) - {"scale"})
    if extra:
        return f"cross_attention_kwargs {extra} may depend on the step or the batch layout"
    added = a["added_cond_kwargs"] or {}
    extra = sorted(set(added) - {"text_embeds", "time_ids"})
    if extra:
        return f"added_cond_kwargs {extra} (e.g. IP-Adapter image_embeds) are not mirrored"
    if unet.config.addition_embed_type == "text_time" and not {"text_embeds", "time_ids"} <= set(added):
        return "added_cond_kwargs lack text_embeds / time_ids ('text_time' needs both)"
    return None


def forward_arguments(unet, args=(), kwargs=None) -> dict | None:
    """``UNetMotionModel.forward``'s arguments by name, defaults filled in (None if they do not bind)."""
    return bind_arguments(_FORWARD_SIGNATURE, unet, args, kwargs)


@dataclass
class MotionCall:
    """The diffusers side of one call: the frames per video and what the forward takes besides sample, timestep and
    hidden states (per-frame rows: the pipelines repeat the prompt embeddings per frame)."""
    num_frames: int
    added_cond_kwargs: dict | None = None
    attention_mask: torch.Tensor | None = None
    cross_attention_kwargs: dict | None = None      # without the LoRA "scale" (the glue applies it)


def make_call(a: dict, slot=()) -> ModelCall:
    """A ModelCall from the bound forward arguments ``a``: one timestep per frame row (a video's frames share it)."""
    sample = a["sample"]
    num_frames = sample.shape[2]
    cak = a["cross_attention_kwargs"]
    if cak is not None:
        cak = {k: v for k, v in cak.items() if k != "scale"}
    host = MotionCall(num_frames, a["added_cond_kwargs"], a["attention_mask"], cak)
    timesteps = row_timesteps(a["timestep"], sample).repeat_interleave(num_frames)
    return ModelCall(sample, timesteps, a["encoder_hidden_states"], None, sample.dtype, slot, host)


def _mask_bias(call: ModelCall):
    """The forward's attention_mask -> an additive bias with a query dim."""
    am = call.host.attention_mask
    return None if am is None else ((1 - am.to(call.dtype)) * -10000.0).unsqueeze(1)


class MotionUNetAdapter(AdapterBase):
    """The runtime's UNetAdapter (and the pipeline glue's, as ``DiffusersUNetAdapter``) for ``UNetMotionModel``.

    Differences from the host forward, all deliberate: the timestep embedding is computed per video from the call's
    per-frame timesteps (one per video, as the forward's); the cached middle output is cloned before the up blocks
    (FreeU scales it in place)."""
    unet_class = UNetMotionModel

    # ---- the pipeline glue's side

    @staticmethod
    def unsupported_reason(unet) -> str | None:
        return unsupported_unet_reason(unet)

    def call_reason(self, a: dict) -> str | None:
        return unsupported_call_reason(self.unet, a)

    def conditioning(self, a: dict) -> tuple:
        added = a["added_cond_kwargs"] or {}
        return a["encoder_hidden_states"], added.get("text_embeds"), added.get("time_ids"), a["attention_mask"]

    def make_call(self, a: dict, slot=()) -> ModelCall:
        return make_call(a, slot)

    def output(self, sample: torch.Tensor, return_dict: bool):
        return UNetMotionOutput(sample=sample) if return_dict else (sample,)

    # ---- the runtime's side

    def embed(self, call: ModelCall) -> torch.Tensor:
        """The forward's "1. time", per video, then repeated per frame."""
        u, h = self.unet, call.host
        num_frames = h.num_frames
        timesteps = call.timesteps[::num_frames]
        t_emb = u.time_proj(timesteps)
        t_emb = t_emb.to(dtype=u.dtype)
        emb = u.time_embedding(t_emb, None)        # timestep_cond is refused
        aug_emb = None
        if u.config.addition_embed_type == "text_time":
            text_embeds = h.added_cond_kwargs.get("text_embeds")
            time_ids = h.added_cond_kwargs.get("time_ids")
            time_embeds = u.add_time_proj(time_ids.flatten())
            time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
            add_embeds = torch.concat([text_embeds, time_embeds], dim=-1)
            add_embeds = add_embeds.to(emb.dtype)
            aug_emb = u.add_embedding(add_embeds)
        emb = emb if aug_emb is None else emb + aug_emb
        return emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)

    def encode(self, call: ModelCall, emb: torch.Tensor) -> Features:
        u, h = self.unet, call.host
        sample, num_frames = call.x, h.num_frames
        forward_upsample_size = any(s % 2 ** u.num_upsamplers != 0 for s in sample.shape[-2:])
        attention_mask = _mask_bias(call)
        # 2. pre-process
        sample = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * num_frames, -1) + sample.shape[3:])
        sample = u.conv_in(sample)
        # 3. down
        down_block_res_samples = (sample,)
        for downsample_block in u.down_blocks:
            if hasattr(downsample_block, "has_cross_attention") and downsample_block.has_cross_attention:
                sample, res_samples = downsample_block(
                    hidden_states=sample, temb=emb, encoder_hidden_states=call.context, attention_mask=attention_mask,
                    num_frames=num_frames, cross_attention_kwargs=h.cross_attention_kwargs)
            else:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb, num_frames=num_frames)
            down_block_res_samples += res_samples
        # (ControlNet residuals are refused)
        # 4. mid
        if u.mid_block is not None:
            if hasattr(u.mid_block, "motion_modules"):
                sample = u.mid_block(sample, emb, encoder_hidden_states=call.context, attention_mask=attention_mask,
                                     num_frames=num_frames, cross_attention_kwargs=h.cross_attention_kwargs)
            else:
                sample = u.mid_block(sample, emb, encoder_hidden_states=call.context, attention_mask=attention_mask,
                                     cross_attention_kwargs=h.cross_attention_kwargs)
        return Features(list(down_block_res_samples), sample, forward_upsample_size)

    def decode(self, call: ModelCall, features: Features, emb: torch.Tensor) -> torch.Tensor:
        u, h = self.unet, call.host
        num_frames, forward_upsample_size = h.num_frames, features.meta
        upsample_size = None
        attention_mask = _mask_bias(call)
        down_block_res_samples = tuple(features.skips)
        sample = features.mid.clone()          # never hand a cached tensor to the up blocks (FreeU: in place)
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
                    encoder_hidden_states=call.context, upsample_size=upsample_size, attention_mask=attention_mask,
                    num_frames=num_frames, cross_attention_kwargs=h.cross_attention_kwargs)
            else:
                sample = upsample_block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                                        upsample_size=upsample_size, num_frames=num_frames)
        # 6. post-process
        if u.conv_norm_out:
            sample = u.conv_norm_out(sample)
            sample = u.conv_act(sample)
        sample = u.conv_out(sample)
        # reshape to (batch, channel, framerate, width, height)
        return sample[None, :].reshape((-1, num_frames) + sample.shape[1:]).permute(0, 2, 1, 3, 4)

    def tile(self, call: ModelCall, n: int, timesteps: torch.Tensor, sigmas) -> ModelCall:
        """``n`` steps' calls stacked step-major: per-video (text_embeds, time_ids) and per-frame (context, mask)
        tensors alike repeated whole, so every step's videos keep their frames together."""
        h = call.host
        added = None if h.added_cond_kwargs is None else {k: _rows(v, n) for k, v in h.added_cond_kwargs.items()}
        host = replace(h, added_cond_kwargs=added, attention_mask=_rows(h.attention_mask, n))
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=_rows(call.context, n), host=host)

    def own_step_reason(self, call: ModelCall) -> str | None:
        return None           # nothing of a step's own reaches the decoder (ControlNet residuals are refused)
