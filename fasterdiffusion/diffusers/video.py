"""The diffusers video UNets split: ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion,
``SpatioTemporalUNetAdapter``) and ``UNet3DConditionModel`` (ModelScope / VideoFusion text-to-video,
``UNet3DAdapter``), encoder and decoder apart, line for line with their forwards in diffusers 0.42.1
(models/unets/unet_spatio_temporal_condition.py, models/unets/unet_3d_condition.py).

Both fold a call's frames into the batch: a video's F frames are F consecutive rows of every block's input,
and the temporal layers regroup the rows by the frame count.  So a ``ModelCall`` here has one row per frame
(its ``timesteps`` are the videos' timesteps repeated per frame): the runtime's decoder cap counts frame rows, and
since it only ever splits a group between steps, a step's frames stay in one decoder call.  A batched decoder
call stacks whole steps step-major (``tile``): each step's videos, each with its frames in order, so the temporal
layers, told the same frame count, see the same videos.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffusers.models.unets.unet_3d_condition import UNet3DConditionModel, UNet3DConditionOutput
from diffusers.models.unets.unet_spatio_temporal_condition import (UNetSpatioTemporalConditionModel,
                                                                   UNetSpatioTemporalConditionOutput)

from ..runtime import Features, ModelCall, repeat_rows
from .unet import AdapterBase, row_timesteps


def _frame_rows(t: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-video rows -> per-frame rows, as the forwards repeat the embedding and the context."""
    return t.repeat_interleave(frames, dim=0, output_size=t.shape[0] * frames)


def _not_exact_class(unet, cls) -> str | None:
    if type(unet) is not cls:
        return f"{type(unet).__name__} is not diffusers' {cls.__name__} (a subclass may change the forward)"
    return None


def _upsample_size_forwarded(unet, sample: torch.Tensor) -> bool:
    """The forwards' ``forward_upsample_size``: a size not a multiple of the overall upsampling factor."""
    return any(s % (2 ** unet.num_upsamplers) != 0 for s in sample.shape[-2:])


# --------------------------------------------------------------------------------------------------
# Stable Video Diffusion: UNetSpatioTemporalConditionModel, sample [batch, frames, channels, height, width]
# --------------------------------------------------------------------------------------------------

@dataclass
class SpatioTemporalCall:
    """The SVD side of one call, per video row: ``added_time_ids`` (fps, motion bucket, noise augmentation) and
    ``image_only_indicator`` (the forward's zeros of [videos, frames]: its last dim is the frame count every
    temporal layer regroups the rows by)."""
    added_time_ids: torch.Tensor
    image_only_indicator: torch.Tensor

    @property
    def frames(self) -> int:
        return self.image_only_indicator.shape[-1]


class SpatioTemporalUNetAdapter(AdapterBase):
    """The runtime's UNetAdapter (and the pipeline glue's, see ``unet.DiffusersUNetAdapter``) for
    ``UNetSpatioTemporalConditionModel``: the forward takes only sample, timestep, image embeddings and
    ``added_time_ids``, so every call can be split."""
    unet_class = UNetSpatioTemporalConditionModel

    # ---- the pipeline glue's side

    @staticmethod
    def unsupported_reason(unet) -> str | None:
        return _not_exact_class(unet, UNetSpatioTemporalConditionModel)

    def call_reason(self, a: dict) -> str | None:
        return None

    def conditioning(self, a: dict) -> tuple:
        return a["encoder_hidden_states"], a["added_time_ids"]

    def make_call(self, a: dict, slot=()) -> ModelCall:
        sample = a["sample"]
        batch_size, num_frames = sample.shape[:2]
        indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)
        return ModelCall(sample, _frame_rows(row_timesteps(a["timestep"], sample), num_frames),
                         a["encoder_hidden_states"], None, sample.dtype, slot,
                         SpatioTemporalCall(a["added_time_ids"], indicator))

    def output(self, sample: torch.Tensor, return_dict: bool):
        return UNetSpatioTemporalConditionOutput(sample=sample) if return_dict else (sample,)

    # ---- the runtime's side

    def embed(self, call: ModelCall) -> torch.Tensor:
        u, frames = self.unet, call.host.frames
        timesteps = call.timesteps[::frames]            # one per video, as the forward expands them
        batch_size = timesteps.shape[0]
        # 1. time
        t_emb = u.time_proj(timesteps)
        t_emb = t_emb.to(dtype=call.dtype)
        emb = u.time_embedding(t_emb)
        time_embeds = u.add_time_proj(call.host.added_time_ids.flatten())
        time_embeds = time_embeds.reshape((batch_size, -1))
        time_embeds = time_embeds.to(emb.dtype)
        aug_emb = u.add_embedding(time_embeds)
        emb = emb + aug_emb
        return _frame_rows(emb, frames)

    def _context(self, call: ModelCall) -> torch.Tensor:
        return _frame_rows(call.context, call.host.frames)

    def encode(self, call: ModelCall, emb: torch.Tensor) -> Features:
        u, indicator = self.unet, call.host.image_only_indicator
        sample = call.x
        forward_upsample_size = _upsample_size_forwarded(u, sample)
        sample = sample.flatten(0, 1)
        encoder_hidden_states = self._context(call)
        # 2. pre-process
        sample = u.conv_in(sample)
        down_block_res_samples = (sample,)
        for downsample_block in u.down_blocks:
            if hasattr(downsample_block, "has_cross_attention") and downsample_block.has_cross_attention:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb,
                                                       encoder_hidden_states=encoder_hidden_states,
                                                       image_only_indicator=indicator)
            else:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb, image_only_indicator=indicator)
            down_block_res_samples += res_samples
        # 4. mid
        sample = u.mid_block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                             image_only_indicator=indicator)
        return Features(list(down_block_res_samples), sample, forward_upsample_size)

    def decode(self, call: ModelCall, features: Features, emb: torch.Tensor) -> torch.Tensor:
        u, indicator = self.unet, call.host.image_only_indicator
        forward_upsample_size = features.meta
        upsample_size = None
        encoder_hidden_states = self._context(call)
        down_block_res_samples = tuple(features.skips)
        sample = features.mid
        # 5. up
        for i, upsample_block in enumerate(u.up_blocks):
            is_final_block = i == len(u.up_blocks) - 1
            res_samples = down_block_res_samples[-len(upsample_block.resnets):]
            down_block_res_samples = down_block_res_samples[: -len(upsample_block.resnets)]
            if not is_final_block and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            if hasattr(upsample_block, "has_cross_attention") and upsample_block.has_cross_attention:
                sample = upsample_block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                                        encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size,
                                        image_only_indicator=indicator)
            else:
                sample = upsample_block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                                        upsample_size=upsample_size, image_only_indicator=indicator)
        # 6. post-process
        sample = u.conv_norm_out(sample)
        sample = u.conv_act(sample)
        sample = u.conv_out(sample)
        # 7. Reshape back to original shape
        return sample.reshape(indicator.shape[0], indicator.shape[1], *sample.shape[1:])

    def tile(self, call: ModelCall, n: int, timesteps: torch.Tensor, sigmas) -> ModelCall:
        h = call.host
        host = SpatioTemporalCall(repeat_rows(h.added_time_ids, n), repeat_rows(h.image_only_indicator, n))
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=repeat_rows(call.context, n), host=host)

    def own_step_reason(self, call: ModelCall) -> str | None:
        return None


# --------------------------------------------------------------------------------------------------
# ModelScope / VideoFusion: UNet3DConditionModel, sample [batch, channels, frames, height, width]
# --------------------------------------------------------------------------------------------------

class UNet3DAdapter(AdapterBase):
    """The runtime's UNetAdapter (and the pipeline glue's) for ``UNet3DConditionModel``.  ``call.host`` is the
    frame count.  What the text-to-video pipelines never pass is refused per call (``call_reason``): ControlNet
    residuals, ``timestep_cond``, ``attention_mask`` (per video while the attention's rows are per frame) and
    ``cross_attention_kwargs``."""
    unet_class = UNet3DConditionModel

    # ---- the pipeline glue's side

    @staticmethod
    def unsupported_reason(unet) -> str | None:
        return _not_exact_class(unet, UNet3DConditionModel)

    def call_reason(self, a: dict) -> str | None:
        if a["down_block_additional_residuals"] is not None or a["mid_block_additional_residual"] is not None:
            return "ControlNet residuals (down/mid_block_additional_residual(s)) are not mirrored for UNet3DConditionModel"
        if a["timestep_cond"] is not None:
            return "timestep_cond (a guidance embedding) is not mirrored"
        if a["attention_mask"] is not None:
            return "attention_mask is not mirrored for UNet3DConditionModel"
        if a["cross_attention_kwargs"]:
            return f"cross_attention_kwargs {sorted(a['cross_attention_kwargs'])} may depend on the step or the batch layout"
        return None

    def conditioning(self, a: dict) -> tuple:
        return (a["encoder_hidden_states"],)

    def make_call(self, a: dict, slot=()) -> ModelCall:
        sample = a["sample"]
        num_frames = sample.shape[2]
        return ModelCall(sample, _frame_rows(row_timesteps(a["timestep"], sample), num_frames),
                         a["encoder_hidden_states"], None, sample.dtype, slot, num_frames)

    def output(self, sample: torch.Tensor, return_dict: bool):
        return UNet3DConditionOutput(sample=sample) if return_dict else (sample,)

    # ---- the runtime's side

    def embed(self, call: ModelCall) -> torch.Tensor:
        u, num_frames = self.unet, call.host
        # 1. time (one timestep per video, as the forward expands them)
        t_emb = u.time_proj(call.timesteps[::num_frames])
        t_emb = t_emb.to(dtype=u.dtype)
        emb = u.time_embedding(t_emb, None)
        return _frame_rows(emb, num_frames)

    def encode(self, call: ModelCall, emb: torch.Tensor) -> Features:
        u, num_frames = self.unet, call.host
        sample = call.x
        forward_upsample_size = _upsample_size_forwarded(u, sample)
        encoder_hidden_states = _frame_rows(call.context, num_frames)
        # 2. pre-process
        sample = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * num_frames, -1) + sample.shape[3:])
        sample = u.conv_in(sample)
        sample = u.transformer_in(sample, num_frames=num_frames, cross_attention_kwargs=None, return_dict=False)[0]
        # 3. down
        down_block_res_samples = (sample,)
        for downsample_block in u.down_blocks:
            if hasattr(downsample_block, "has_cross_attention") and downsample_block.has_cross_attention:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb,
                                                       encoder_hidden_states=encoder_hidden_states, attention_mask=None,
                                                       num_frames=num_frames, cross_attention_kwargs=None)
            else:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb, num_frames=num_frames)
            down_block_res_samples += res_samples
        # 4. mid
        if u.mid_block is not None:
            sample = u.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states, attention_mask=None,
                                 num_frames=num_frames, cross_attention_kwargs=None)
        return Features(list(down_block_res_samples), sample, forward_upsample_size)

    def decode(self, call: ModelCall, features: Features, emb: torch.Tensor) -> torch.Tensor:
        u, num_frames = self.unet, call.host
        forward_upsample_size = features.meta
        upsample_size = None
        encoder_hidden_states = _frame_rows(call.context, num_frames)
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
                sample = upsample_block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                                        encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size,
                                        attention_mask=None, num_frames=num_frames, cross_attention_kwargs=None)
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
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=repeat_rows(call.context, n))

    def own_step_reason(self, call: ModelCall) -> str | None:
        return None
