"""Tiny random-weight Wan 2.x models built from the host's own classes (``comfy.supported_models``' WAN21_T2V,
WAN21_I2V, WAN22_T2V -> ``model_base.WAN21`` / ``WAN22`` around ``comfy.ldm.wan.model.WanModel``), and conditioning
for them as ComfyUI's Wan nodes make it.  Every shape is the real model's except the widths and the depth.
"""
from __future__ import annotations

from types import SimpleNamespace

from . import build_model_patcher

DEPTH = 6                 # transformer blocks (the real 1.3B has 30, 14B 40, 5B 30)
TEXT_DIM = 32             # umT5 is 4096
TEXT_TOKENS = 6           # umT5 pads to 512
CLIP_TOKENS = 5           # CLIP-H penultimate states: 257 x 1280
CLIP_DIM = 1280           # fixed by WanModel's MLPProj
FRAMES = 3                # latent frames (9 video frames)
SIZE = 8                  # latent height and width

TINY = dict(dim=32, ffn_dim=64, freq_dim=32, text_dim=TEXT_DIM, num_heads=2, num_layers=DEPTH, patch_size=(1, 2, 2),
            window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


def _model(cls_name: str, seed: int, **config):
    import comfy.supported_models
    cls = getattr(comfy.supported_models, cls_name)
    unet_config = dict(cls.unet_config, **TINY)
    unet_config.update(config)
    return build_model_patcher(cls(unet_config), seed=seed)


def wan21_t2v(seed: int = 0, **config):
    """Wan 2.1 text-to-video (and each expert of Wan 2.2 A14B T2V): 16 latent channels in and out."""
    return _model("WAN21_T2V", seed, in_dim=16, out_dim=16, **config)


def wan21_i2v(seed: int = 0):
    """Wan 2.1 image-to-video: the image latent and its mask concatenated (16 + 4 + 16 = 36 channels), CLIP vision
    tokens through img_emb in front of the text."""
    return _model("WAN21_I2V", seed, in_dim=36, out_dim=16)


def wan22_ti2v(seed: int = 0):
    """Wan 2.2 TI2V 5B-style: 48 latent channels in and out, ``model_base.WAN22`` (per-token timesteps under a
    noise mask)."""
    return _model("WAN22_T2V", seed, in_dim=48, out_dim=48)


def text(seed: int, rows: int = 1):
    """Stand-in umT5 tokens [rows, TEXT_TOKENS, TEXT_DIM]."""
    import torch
    return torch.randn(rows, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def t2v_conditioning(seed: int = 0):
    """(positive, negative) CONDITIONING of a text-to-video run."""
    return [[text(seed), {}]], [[text(seed + 100), {}]]


def i2v_conditioning(seed: int = 0):
    """(positive, negative) as WanImageToVideo makes them: the start image's latent (frame 0, the rest 0) and a
    mask that keeps frame 0 (``concat_latent_image`` / ``concat_mask``), CLIP vision output (``clip_vision_output``)
    on both."""
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    image = torch.zeros(1, 16, FRAMES, SIZE, SIZE)
    image[:, :, :1] = torch.randn(1, 16, 1, SIZE, SIZE, generator=g)
    mask = torch.ones(1, 1, FRAMES, SIZE, SIZE)
    mask[:, :, :1] = 0.0
    clip = SimpleNamespace(penultimate_hidden_states=torch.randn(1, CLIP_TOKENS, CLIP_DIM, generator=g))
    extra = {"concat_latent_image": image, "concat_mask": mask, "clip_vision_output": clip}
    return [[text(seed), dict(extra)]], [[text(seed + 100), dict(extra)]]


def empty_latent(channels: int = 16, batch: int = 1, batch_index=None) -> dict:
    """A LATENT as EmptyHunyuanLatentVideo / Wan22ImageToVideoLatent make it (``batch_index``: which rows of a
    larger batch these are, as LatentFromBatch marks them: each row then gets that row's noise)."""
    import torch
    latent = {"samples": torch.zeros(batch, channels, FRAMES, SIZE, SIZE)}
    if batch_index is not None:
        latent["batch_index"] = list(batch_index)
    return latent


def ti2v_latent(seed: int = 0) -> dict:
    """Wan22ImageToVideoLatent's LATENT with a start image: frame 0 holds the image latent, ``noise_mask`` keeps it
    (0 on frame 0, 1 on the rest), so WAN22 gives every frame its own timestep."""
    import torch
    latent = torch.zeros(1, 48, FRAMES, SIZE, SIZE)
    latent[:, :, :1] = torch.randn(1, 48, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 2))
    mask = torch.ones(1, 1, FRAMES, SIZE, SIZE)
    mask[:, :, :1] = 0.0
    return {"samples": latent, "noise_mask": mask}


def wan21_vace(seed: int = 0):
    """Wan 2.1 VACE (``VaceWanModel``, a WanModel subclass with its own control blocks): a model FasterDiffusion
    passes through."""
    return _model("WAN21_Vace", seed, in_dim=16, out_dim=16, vace_layers=2, vace_in_dim=96)
