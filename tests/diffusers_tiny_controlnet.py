"""A small real-shaped SD1.5 + ControlNet pipeline for benchmarks (``bench_cases()``): the UNet and the ControlNet on
SD1.5's layout (2 res blocks per level, cross-attention on the first three levels, 8 heads, 768-wide context) at a
reduced base width, random weights (the ControlNet's zero convolutions randomised, so its residuals matter).  The
tiny VAE downsamples by 2, so the ControlNet's conditioning embedding downsamples once (SD1.5's: 3 times, on 8x
larger images; its cost is negligible either way).  Used by tools/diffusers_models_benchmark.py.
"""
from __future__ import annotations

import diffusers_tiny as dt


def controlnet_model(width: int, seed: int = 0):
    """A ControlNetModel on ``dt.sd15_layout(width)``."""
    from diffusers import ControlNetModel
    dt._seeded(seed)
    c = dict(dt.SD15_UNET, **dt.sd15_layout(width=width))
    net = ControlNetModel(in_channels=4, layers_per_block=c["layers_per_block"], block_out_channels=c["block_out_channels"],
                          down_block_types=c["down_block_types"], norm_num_groups=c["norm_num_groups"],
                          cross_attention_dim=c["cross_attention_dim"], attention_head_dim=c["attention_head_dim"],
                          conditioning_embedding_out_channels=(16, 32)).eval()
    for m in [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]:
        dt.randomize_(m, seed + 7)
    return net


def sd15_controlnet(width: int = 64, latent: int = 32, seed: int = 0, sched: str = "DDIMScheduler"):
    import diffusers
    parts = dt._sd_parts(seed, sched, dt.sd15_layout(width=width, latent=latent), max_length=77)
    parts["controlnet"] = controlnet_model(width, seed)
    pipe = diffusers.StableDiffusionControlNetPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return dt.unclipped(pipe) if sched == "DDIMScheduler" else pipe


def bench_cases():
    """name -> (build, call kwargs): SD1.5 + ControlNet at base width 64 on a 24 x 24 latent, DDIM 20 steps, CFG 7.5."""
    import torch
    size = 24 * dt.VAE_FACTOR
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"controlnet_sd15_w64": (lambda: sd15_controlnet(64, 24),
                                    dict(prompt=dt.PROMPTS[0], image=image, num_inference_steps=20, guidance_scale=7.5,
                                         height=size, width=size, output_type="latent"))}
