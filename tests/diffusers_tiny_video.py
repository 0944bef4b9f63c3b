"""Tiny random-weight diffusers video pipelines built from configs (no downloads): Stable Video Diffusion
(``UNetSpatioTemporalConditionModel``, a CLIP vision encoder, ``AutoencoderKLTemporalDecoder``), ModelScope /
VideoFusion text-to-video (``UNet3DConditionModel``) and Text2Video-Zero (an SD1.5-shaped ``UNet2DConditionModel``
under cross-frame attention).  Latents are 8 x 8 (images 16 x 16), FRAMES frames.  Used by
tests/test_diffusers_video.py; ``bench_cases()`` gives small real-shaped SVD-XT and ModelScope layouts.
"""
from __future__ import annotations

import diffusers_tiny as dt
import torch

FRAMES = 3
# Stable Video Diffusion's scheduler (EDM-style Euler: Karras sigmas, timesteps 0.25 * log(sigma), v-prediction)
SVD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                     steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)


def wake_(module, seed: int):
    """Random weights for the parameters diffusers initialises to zero (the temporal convolutions' last layer):
    there they make the temporal layers an identity, which would hide a wrong frame layout."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module


# ------------------------------------------------------------------------------ Stable Video Diffusion

SVD_UNET = dict(sample_size=dt.LATENT, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
                num_attention_heads=(2, 4), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                num_frames=FRAMES)


def svd_xt_layout(width: int = 64, latent: int = 16, frames: int = 4):
    """UNet overrides for the real SVD-XT layout (4 levels, 2 res blocks each, spatio-temporal cross-attention on
    the first three, head dim 64, 1024-wide image embedding, 256-dim added time ids) at base width ``width``
    (SVD: 320; heads scaled to keep head dim 64)."""
    mult = (1, 2, 4, 4)
    return dict(sample_size=latent, block_out_channels=tuple(width * m for m in mult), layers_per_block=2,
                num_attention_heads=tuple(width * m // 64 for m in mult), cross_attention_dim=1024,
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=768, num_frames=frames,
                down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
                up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3)


def svd_unet(seed: int = 0, **overrides):
    from diffusers import UNetSpatioTemporalConditionModel
    dt._seeded(seed)
    return wake_(UNetSpatioTemporalConditionModel(**{**SVD_UNET, **overrides}), seed).eval()


def svd(seed: int = 0, unet_overrides=None, image: int = dt.IMAGE):
    """An SVD-shaped image-to-video pipeline for ``image`` x ``image`` pixels (the image encoder's projection matches
    the UNet's cross-attention)."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    unet = svd_unet(seed, **(unet_overrides or {}))
    dt._seeded(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=unet.config.cross_attention_dim, num_hidden_layers=2,
        num_attention_heads=4, image_size=image, patch_size=4)).eval()
    vae = diffusers.AutoencoderKLTemporalDecoder(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                                                 down_block_types=("DownEncoderBlock2D",) * 2).eval()
    pipe = diffusers.StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(size=image, crop_size=image))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def svd_image(seed: int = 0, size: int = dt.IMAGE):
    """The conditioning image, a tensor in [0, 1] (tensors skip the pipeline's resize to 224 for CLIP)."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 200))


def run_svd(pipe, steps: int = 8, seed: int = 0, frames: int = FRAMES, size: int = dt.IMAGE, **kw):
    """Latents [1, frames, 4, h, w] of one SVD call (CFG with per-frame guidance 1 -> 3, as the pipeline does)."""
    return pipe(image=svd_image(seed, size), height=size, width=size, num_frames=frames, num_inference_steps=steps,
                output_type="latent", generator=torch.Generator().manual_seed(seed), **kw).frames


# ------------------------------------------------------------------------- ModelScope / VideoFusion

T2V_UNET = dict(sample_size=dt.LATENT, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16),
                layers_per_block=1, norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2,
                down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"))


def modelscope_layout(width: int = 64, latent: int = 16):
    """UNet overrides for the real ModelScope text-to-video-ms-1.7b layout (4 levels, 2 res blocks each, 3D
    cross-attention on the first three, its config's attention_head_dim=64 (read as the head count), 1024-wide
    text context, 32 norm groups) at base width ``width`` (ModelScope: 320)."""
    return dict(sample_size=latent, block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2,
                attention_head_dim=64, cross_attention_dim=1024, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3)


def t2v_unet(seed: int = 0, **overrides):
    from diffusers import UNet3DConditionModel
    dt._seeded(seed)
    return wake_(UNet3DConditionModel(**{**T2V_UNET, **overrides}), seed).eval()


def t2v(seed: int = 0, sched: str = "DDIMScheduler", unet_overrides=None):
    import diffusers
    unet = t2v_unet(seed, **(unet_overrides or {}))
    hidden = unet.config.cross_attention_dim
    pipe = diffusers.TextToVideoSDPipeline(vae=dt.vae(seed), text_encoder=dt.text_encoder(seed, hidden=hidden),
                                           tokenizer=dt.tokenizer(), unet=unet, scheduler=dt.scheduler(sched))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_t2v(pipe, steps: int = 8, seed: int = 0, frames: int = FRAMES, size: int = dt.IMAGE,
            guidance_scale: float = 2.0, **kw):
    """Latents [1, 4, frames, h, w] of one text-to-video call (guidance 2: at 5 the tiny model amplifies float
    noise over the steps more than ten times as much)."""
    return pipe(prompt=dt.PROMPTS[0], num_frames=frames, height=size, width=size, num_inference_steps=steps,
                guidance_scale=guidance_scale, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kw).frames


# ------------------------------------------------------------------------------------- Text2Video-Zero

def t2v_zero(seed: int = 0, sched: str = "DDIMScheduler"):
    import diffusers
    parts = dt._sd_parts(seed, sched)
    del parts["image_encoder"]
    pipe = diffusers.TextToVideoZeroPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_t2v_zero(pipe, steps: int = 8, seed: int = 0, frames: int = FRAMES, t0: int = 3, t1: int = 5, **kw):
    """Latents [frames, 4, 8, 8] of one Text2Video-Zero call: with 8 steps the first frame alone takes steps 0-1
    (loop 1) and 2-3 (loop 2), then every frame steps 2-7 (loop 3, on the scheduler as it was after loop 1)."""
    return pipe(prompt=dt.PROMPTS[0], video_length=frames, height=dt.IMAGE, width=dt.IMAGE, num_inference_steps=steps,
                guidance_scale=5.0, output_type="latent", t0=t0, t1=t1,
                generator=torch.Generator().manual_seed(seed), **kw).images


# ----------------------------------------------------------------------------------------- benchmark

def _svd_xt_small():
    return svd(unet_overrides=svd_xt_layout(), image=32)


def _modelscope_small():
    return dt.unclipped(t2v(unet_overrides=modelscope_layout()))


def _t2v_zero_small():
    import diffusers
    parts = dt._sd_parts(0, "DDIMScheduler", dt.sd15_layout(64, 16))
    del parts["image_encoder"]
    pipe = diffusers.TextToVideoZeroPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return dt.unclipped(pipe)


def bench_cases():
    """name -> (build, call kwargs): small real-shaped layouts (see svd_xt_layout, modelscope_layout) at base width
    64, 4 frames of a 16 x 16 latent, 25 steps (SVD's default: Euler with Karras sigmas; ModelScope: DDIM, its
    scheduler, at half its 50 steps so one unpatched CPU call stays near 25 s), CFG; Text2Video-Zero on an SD1.5-layout
    UNet at width 64 with its defaults t0 44, t1 47 of 50 steps moved to 21, 23 of 25."""
    g = lambda: torch.Generator().manual_seed(0)
    return {
        "svd_xt_small": (_svd_xt_small, dict(image=svd_image(0, 32), height=32, width=32, num_frames=4,
                                             num_inference_steps=25, output_type="latent", generator=g())),
        "modelscope_t2v_small": (_modelscope_small, dict(prompt=dt.PROMPTS[0], num_frames=4, height=32, width=32,
                                                         num_inference_steps=25, guidance_scale=9.0,
                                                         output_type="latent", generator=g())),
        "t2v_zero_small": (_t2v_zero_small, dict(prompt=dt.PROMPTS[0], video_length=4, height=32, width=32,
                                                 num_inference_steps=25, guidance_scale=7.5, t0=21, t1=23,
                                                 output_type="latent", generator=g())),
    }
