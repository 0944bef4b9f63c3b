"""Tiny random-weight diffusers pipelines built from configs (no downloads): SD1.5-shaped, SDXL-shaped and
SD + ControlNet, with a CLIP tokenizer on a 55-token character vocabulary, CLIP text encoders and a VAE.

Latents are 4 x 8 x 8 (the VAE downsamples by 2, so images are 16 x 16).  Used by tests/test_diffusers.py
and tools/diffusers_demo.py.
"""
from __future__ import annotations

import string

import torch

LATENT = 8
VAE_FACTOR = 2
IMAGE = LATENT * VAE_FACTOR
SCHEDULER_KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1)
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
              "PNDMScheduler", "LMSDiscreteScheduler")


def _seeded(seed):
    torch.manual_seed(seed)


def tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "!"])}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def text_encoder(seed: int = 0, projection: bool = False, hidden: int = 32, max_length: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=55, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=max_length, projection_dim=32, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    _seeded(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(seed: int = 0):
    from diffusers import AutoencoderKL
    _seeded(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=IMAGE).eval()


SD15_UNET = dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(8, 16, 16, 16), norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))

SDXL_UNET = dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
                 norm_num_groups=4, cross_attention_dim=64, attention_head_dim=(2, 2, 4), use_linear_projection=True,
                 transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def randomize_(module, seed: int, std: float = 1.0):
    """Random weights ~ N(0, std^2 / fan_in) and biases ~ N(0, 0.05^2) for ``module`` (diffusers zero-
    initialises the ControlNet's output convolutions; random ones make its residuals matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = std / p[0].numel() ** 0.5 if p.dim() > 1 else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def unet(kind: str = "sd15", seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel
    _seeded(seed)
    cfg = dict(SD15_UNET if kind == "sd15" else SDXL_UNET, **overrides)
    return UNet2DConditionModel(**cfg).eval()


def unclipped(pipe):
    """``pipe`` with DDIM without ``clip_sample`` (the real SD / ModelScope scheduler configs; StableDiffusionPipeline
    turns it off itself, the ControlNet and text-to-video pipelines do not): clipping every step's x0 to [-1, 1]
    saturates a random-weight model's latents, and a benchmark's PSNR then measures the clipping, not the method."""
    pipe.scheduler = scheduler("DDIMScheduler", clip_sample=False)
    return pipe


def scheduler(name: str = "EulerDiscreteScheduler", **kw):
    import diffusers
    cls = getattr(diffusers, name)
    extra = dict(skip_prk_steps=True, set_alpha_to_one=False) if name == "PNDMScheduler" else {}
    return cls(**SCHEDULER_KW, **extra, **kw)


def _sd_parts(seed, sched, unet_overrides=None, max_length=16):
    hidden = (unet_overrides or {}).get("cross_attention_dim", SD15_UNET["cross_attention_dim"])
    return dict(vae=vae(seed), text_encoder=text_encoder(seed, hidden=hidden, max_length=max_length),
                tokenizer=tokenizer(max_length), unet=unet("sd15", seed, **(unet_overrides or {})),
                scheduler=scheduler(sched), safety_checker=None, feature_extractor=None, image_encoder=None,
                requires_safety_checker=False)


def sd15_layout(width: int = 320, latent: int = 64):
    """UNet overrides for the real SD1.5 layout (2 res blocks per level, cross-attention on the first three
    levels, 8 heads, 768-wide context) at base width ``width`` (SD1.5: 320) and latent size ``latent``."""
    return dict(sample_size=latent, block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2,
                attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)


def sd15(seed: int = 0, sched: str = "EulerDiscreteScheduler", img2img: bool = False, unet_overrides=None,
         max_length: int = 16):
    """An SD1.5-shaped pipeline; ``unet_overrides`` change the UNet config (e.g. ``sd15_layout()``)."""
    import diffusers
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls(**_sd_parts(seed, sched, unet_overrides, max_length))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl(seed: int = 0, sched: str = "EulerDiscreteScheduler", img2img: bool = False):
    import diffusers
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
    parts = dict(vae=vae(seed), text_encoder=text_encoder(seed), text_encoder_2=text_encoder(seed + 1, projection=True),
                 tokenizer=tokenizer(), tokenizer_2=tokenizer(), unet=unet("sdxl", seed), scheduler=scheduler(sched),
                 image_encoder=None, feature_extractor=None)
    if img2img:
        parts["requires_aesthetics_score"] = False
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_model(seed: int = 0):
    from diffusers import ControlNetModel
    _seeded(seed)
    c = SD15_UNET
    net = ControlNetModel(in_channels=4, layers_per_block=c["layers_per_block"], block_out_channels=c["block_out_channels"],
                          down_block_types=c["down_block_types"], norm_num_groups=c["norm_num_groups"],
                          cross_attention_dim=c["cross_attention_dim"], attention_head_dim=c["attention_head_dim"],
                          conditioning_embedding_out_channels=(4, 8)).eval()
    for m in [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]:
        randomize_(m, seed + 7)
    return net


def controlnet(seed: int = 0, sched: str = "EulerDiscreteScheduler", img2img: bool = False):
    import diffusers
    parts = _sd_parts(seed, sched)
    parts["controlnet"] = controlnet_model(seed)
    cls = diffusers.StableDiffusionControlNetImg2ImgPipeline if img2img else diffusers.StableDiffusionControlNetPipeline
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image(seed: int = 0, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, IMAGE, IMAGE, generator=g)


def init_image(seed: int = 0, batch: int = 1):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.rand(batch, 3, IMAGE, IMAGE, generator=g)


PROMPTS = ("a red cat", "a blue dog", "green hills at dawn")


def run(pipe, prompt=PROMPTS[0], steps: int = 10, seed: int = 0, guidance_scale: float = 5.0, **kw):
    """Latents of one pipeline call (output_type="latent"), from a fixed generator."""
    return pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kw).images


def controlnet_xl_model(seed: int = 0):
    """A ControlNet for the SDXL-shaped UNet (its down blocks, text_time addition embedding)."""
    from diffusers import ControlNetModel
    _seeded(seed)
    c = SDXL_UNET
    net = ControlNetModel(in_channels=4, layers_per_block=c["layers_per_block"], block_out_channels=c["block_out_channels"],
                          down_block_types=c["down_block_types"], norm_num_groups=c["norm_num_groups"],
                          cross_attention_dim=c["cross_attention_dim"], attention_head_dim=c["attention_head_dim"],
                          use_linear_projection=True, transformer_layers_per_block=c["transformer_layers_per_block"],
                          addition_embed_type="text_time", addition_time_embed_dim=c["addition_time_embed_dim"],
                          projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"],
                          conditioning_embedding_out_channels=(4, 8)).eval()
    for m in [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]:
        randomize_(m, seed + 7)
    return net


def controlnet_xl(seed: int = 0, sched: str = "EulerDiscreteScheduler", img2img: bool = False):
    """SDXL + ControlNet (text-to-image or img2img)."""
    import diffusers
    cls = diffusers.StableDiffusionXLControlNetImg2ImgPipeline if img2img else diffusers.StableDiffusionXLControlNetPipeline
    parts = dict(vae=vae(seed), text_encoder=text_encoder(seed), text_encoder_2=text_encoder(seed + 1, projection=True),
                 tokenizer=tokenizer(), tokenizer_2=tokenizer(), unet=unet("sdxl", seed), controlnet=controlnet_xl_model(seed),
                 scheduler=scheduler(sched), feature_extractor=None, image_encoder=None)
    if img2img:
        parts["requires_aesthetics_score"] = False
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
