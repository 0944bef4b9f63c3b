"""Tiny random-weight DeepFloyd-IF pipelines built from diffusers' own classes (no downloads): stage I
(``IFPipeline``, IF-I-XL's layout) and stage II (``IFSuperResolutionPipeline``, IF-II-L's layout), each with IF's
scheduler (DDPM, learned-range variance, dynamic thresholding) and no tokenizer, T5 encoder, safety checker or
watermarker: the calls take ``prompt_embeds`` / ``negative_prompt_embeds`` (T5-shaped random tensors).

Both UNets keep what the split must carry through every decoder step: the text addition embedding
(``addition_embed_type="text"``, attention-pooled prompt added to the time embedding), stage II's noise-level class
embedding (``class_embed_type="timestep"``), the T5 projection (``encoder_hid_dim``) and the learned variance (twice
the image channels out).  Images are 3 x 8 x 8 (stage I) and 3 x 16 x 16 (stage II, from an 8 x 8 image).  Used
by tests/test_diffusers_if.py and tools/diffusers_models_benchmark.py (``bench_cases``).
"""
from __future__ import annotations

import torch

TEXT_DIM = 16          # T5-v1.1-XXL: 4096
TOKENS = 8             # IF pads prompts to 77 tokens
STAGE1 = 8             # IF-I: 64
STAGE2 = 16            # IF-II: 256


def _if_common(text_dim: int, head_dim: int, pool_heads: int, groups: int) -> dict:
    """What IF-I-XL and IF-II-L share: T5 projection, attention-pooled text added to the time embedding,
    AttnAddedKV attention with a group-normed text, GELU, scale-shift resnets, learned variance."""
    return dict(out_channels=6, encoder_hid_dim=text_dim, encoder_hid_dim_type="text_proj", addition_embed_type="text",
                addition_embed_type_num_heads=pool_heads, attention_head_dim=head_dim, cross_attention_norm="group_norm",
                mid_block_type="UNetMidBlock2DSimpleCrossAttn", act_fn="gelu", resnet_time_scale_shift="scale_shift",
                norm_num_groups=groups)


def stage1_unet_config(width: int = 8, size: int = STAGE1, text_dim: int = TEXT_DIM, layers: int = 1,
                       head_dim: int = 4, pool_heads: int = 2, groups: int = 4) -> dict:
    """IF-I-XL's UNet layout (DeepFloyd/IF-I-XL-v1.0 unet/config.json: widths 704 x (1, 2, 3, 4), 3 resnets a level,
    attention on the three lower levels, 64-wide heads, 64 pooling heads, context width = the last level's) at base
    width ``width``."""
    return dict(_if_common(text_dim, head_dim, pool_heads, groups), sample_size=size, in_channels=3,
                layers_per_block=layers, block_out_channels=tuple(width * m for m in (1, 2, 3, 4)),
                cross_attention_dim=4 * width,
                down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",))


def stage2_unet_config(width: int = 4, size: int = STAGE2, text_dim: int = TEXT_DIM, layers=(1, 1, 1, 1, 1),
                       head_dim: int = 4, pool_heads: int = 2, groups: int = 4) -> dict:
    """IF-II-L's UNet layout (DeepFloyd/IF-II-L-v1.0: widths 160 x (1, 2, 4, 6, 8), resnets (2, 2, 3, 5, 5),
    attention on the two lowest levels, the noise level as a timestep class embedding, sqrt(2) output scales,
    no time activation before the resnets' projection) at base width ``width``; 6 channels in (image + upscaled)."""
    return dict(_if_common(text_dim, head_dim, pool_heads, groups), sample_size=size, in_channels=6,
                layers_per_block=tuple(layers), block_out_channels=tuple(width * m for m in (1, 2, 4, 6, 8)),
                cross_attention_dim=8 * width, class_embed_type="timestep", mid_block_scale_factor=1.4142271248762552,
                resnet_out_scale_factor=1.4142271248762552, resnet_skip_time_act=True,
                down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",) * 2,
                up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 3)


def unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def scheduler(stage: int = 1):
    """IF's own: DDPM with the learned-range variance and dynamic thresholding (stage I's 1.5, stage II's 1.0)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(variance_type="learned_range", beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         thresholding=True, dynamic_thresholding_ratio=0.95,
                         sample_max_value=1.5 if stage == 1 else 1.0)


def stage1(seed: int = 0, unet_config: dict | None = None):
    import diffusers
    pipe = diffusers.IFPipeline(tokenizer=None, text_encoder=None, unet=unet(unet_config or stage1_unet_config(), seed),
                                scheduler=scheduler(1), safety_checker=None, feature_extractor=None, watermarker=None,
                                requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stage2(seed: int = 0, unet_config: dict | None = None):
    import diffusers
    from diffusers import DDPMScheduler
    pipe = diffusers.IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=unet(unet_config or stage2_unet_config(), seed), scheduler=scheduler(2),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(seed: int = 0, batch: int = 1, tokens: int = TOKENS, dim: int = TEXT_DIM):
    """(prompt_embeds, negative_prompt_embeds): T5-shaped random hidden states of two different prompts."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, tokens, dim, generator=g)


def low_res_image(seed: int = 0, batch: int = 1, size: int = STAGE1):
    """A stage-I output for stage II: in [-1, 1]."""
    g = torch.Generator().manual_seed(2000 + seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def call_kwargs(stage: int, steps: int, seed: int = 0, guidance_scale: float = 7.0, **kw) -> dict:
    """A pipeline call's arguments, output_type "pt" (the raw denoised pixels: IF's latent)."""
    cond, uncond = prompt_embeds(seed, dim=kw.pop("text_dim", TEXT_DIM), tokens=kw.pop("tokens", TOKENS))
    out = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
               guidance_scale=guidance_scale, output_type="pt")
    if stage == 2:
        out.update(image=low_res_image(seed, size=kw.pop("low_res", STAGE1)), noise_level=250)
    return {**out, **kw}


def run(pipe, stage: int, steps: int, seed: int = 0, **kw):
    """The denoised pixels (output_type "pt") of one pipeline call from a fixed generator."""
    return pipe(**call_kwargs(stage, steps, seed, **kw), generator=torch.Generator().manual_seed(seed)).images


def bench_cases():
    """name -> (build, call kwargs, strategy): IF stage I in IF-I-XL's layout (widths 32 x (1, 2, 3, 4), 3 resnets a
    level, attention at 32/16/8 px with 2/3/4 heads, 32 norm groups, 64 pooling heads) on its real 64 x 64 pixels and
    77 T5 tokens (512 wide instead of 4096), 100 DDPM steps with CFG 7, strategy ``if1`` (its own rule: 40 encoder
    passes).  (Heads 32 wide, not 64: at width 32 a 64-wide head does not divide the 96 channels of level 2.)  Stage II
    in IF-II-L's layout (widths 16 x (1, 2, 4, 6, 8), resnets (2, 2, 3, 5, 5), 16 norm groups) from 16 to 64 pixels
    (IF-II: 64 to 256), 50 DDPM steps, strategy ``if2`` (40 encoder passes)."""
    text_dim, tokens = 512, 77
    config = stage1_unet_config(width=32, size=64, text_dim=text_dim, layers=3, head_dim=32, pool_heads=64, groups=32)
    config2 = stage2_unet_config(width=16, size=64, text_dim=text_dim, layers=(2, 2, 3, 5, 5), head_dim=32,
                                 pool_heads=64, groups=16)
    return {"if1": (lambda: stage1(seed=0, unet_config=config),
                    call_kwargs(1, 100, text_dim=text_dim, tokens=tokens), "if1"),
            "if2": (lambda: stage2(seed=0, unet_config=config2),
                    call_kwargs(2, 50, text_dim=text_dim, tokens=tokens, low_res=16), "if2")}
