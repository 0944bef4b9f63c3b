"""Tiny random-weight AnimateDiff pipelines built from configs (no downloads): ``AnimateDiffPipeline`` (an SD1.5-shaped
``UNet2DConditionModel`` + a ``MotionAdapter`` -> ``UNetMotionModel``, motion modules in the mid block too, as
AnimateDiff v2/v3) and ``AnimateDiffSDXLPipeline`` (SDXL-shaped, no mid-block motion module, as the SDXL beta adapter).

The motion adapters get random weights of a useful size (``diffusers_tiny.randomize_``), so the temporal attention
mixes frames visibly.  Latents are [videos, 4, FRAMES, 8, 8].  ``bench_cases()``: a small real-shaped SD1.5 AnimateDiff
configuration for the benchmark.  Used by tests/test_diffusers_motion.py.
"""
from __future__ import annotations

import torch

import diffusers_tiny as dt

FRAMES = 4


def motion_adapter(block_out_channels, seed: int = 0, mid: bool = True, heads: int = 2, groups: int = 4,
                   max_seq_length: int = 32):
    from diffusers import MotionAdapter
    dt._seeded(seed)
    adapter = MotionAdapter(block_out_channels=tuple(block_out_channels), motion_layers_per_block=2,
                            motion_num_attention_heads=heads, motion_norm_num_groups=groups,
                            motion_max_seq_length=max_seq_length, use_motion_mid_block=mid)
    return dt.randomize_(adapter, seed + 11).eval()


def scheduler(name: str):
    """The scheduler as AnimateDiff's model cards set it: DDIM without clip_sample (the SD pipelines turn it off
    themselves; the AnimateDiff pipelines keep what they get, and clipping x0 to [-1, 1] saturates a random model)."""
    return dt.scheduler(name, **({"clip_sample": False} if name == "DDIMScheduler" else {}))


def animatediff(seed: int = 0, sched: str = "DDIMScheduler", unet_overrides=None, max_length: int = 16,
                heads: int = 2):
    """An AnimateDiffPipeline on the SD1.5-shaped tiny UNet (``unet_overrides`` as in ``diffusers_tiny.sd15``)."""
    import diffusers
    parts = dt._sd_parts(seed, sched, unet_overrides, max_length)
    unet = parts["unet"]
    adapter = motion_adapter(unet.config.block_out_channels, seed, heads=heads, groups=unet.config.norm_num_groups)
    pipe = diffusers.AnimateDiffPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                         tokenizer=parts["tokenizer"], unet=unet, motion_adapter=adapter,
                                         scheduler=scheduler(sched), feature_extractor=None, image_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def animatediff_sdxl(seed: int = 0, sched: str = "DDIMScheduler"):
    """An AnimateDiffSDXLPipeline on the SDXL-shaped tiny UNet; the motion adapter has no mid block."""
    import diffusers
    unet = dt.unet("sdxl", seed)
    adapter = motion_adapter(unet.config.block_out_channels, seed, mid=False, groups=unet.config.norm_num_groups)
    pipe = diffusers.AnimateDiffSDXLPipeline(
        vae=dt.vae(seed), text_encoder=dt.text_encoder(seed), text_encoder_2=dt.text_encoder(seed + 1, projection=True),
        tokenizer=dt.tokenizer(), tokenizer_2=dt.tokenizer(), unet=unet, motion_adapter=adapter,
        scheduler=scheduler(sched), image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt=dt.PROMPTS[0], steps: int = 10, seed: int = 0, guidance_scale: float = 5.0,
        num_frames: int = FRAMES, **kw):
    """Latents of one pipeline call (output_type="latent"), from a fixed generator: [videos, 4, frames, h, w]."""
    size = kw.pop("size", dt.IMAGE)
    return pipe(prompt=prompt, num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance_scale,
                height=size, width=size, output_type="latent", generator=torch.Generator().manual_seed(seed),
                **kw).frames


def bench_cases():
    """name -> (build, call kwargs): AnimateDiff v2/v3 on SD1.5's real layout (2 res blocks per level, cross-attention
    on the first three levels, 8 heads, 768-wide context; motion modules with 8 heads in every down/up block and the
    mid block) at base width 32, 16 frames of a 16 x 16 latent, DDIM 20 steps with CFG."""
    def build():
        return animatediff(seed=0, sched="DDIMScheduler", unet_overrides=dt.sd15_layout(width=32, latent=16),
                           max_length=77, heads=8)
    return {"animatediff_sd15_w32_16f": (build, dict(prompt=dt.PROMPTS[0], num_frames=16, num_inference_steps=20,
                                                     guidance_scale=7.5, height=16 * dt.VAE_FACTOR,
                                                     width=16 * dt.VAE_FACTOR, output_type="latent"))}
