"""The third trained test model: class-conditional Fashion-MNIST, Flux-shaped (a DiT), 16x16 latent.

``fashion_flux.safetensors`` is ComfyUI's own Flux (``comfy.supported_models.Flux`` -> ``comfy.ldm.flux.model.Flux``,
sampled as ComfyUI samples Flux: a CONST flow model with ``ModelSamplingFlux``, shift 1.15), trained by
``python -m testmodel.train_fashion_flux`` on the same data as the SD1.5-shaped ``fashion_unet`` (``testmodel.fashion``:
a 28x28 image padded to 32x32, folded into a 4x16x16 latent).  Patch 2 -> 64 image tokens; 2 double-stream and 8
single-stream blocks (10 in all, so a split point means something), hidden 128, 4 heads, no guidance embedding.

Class conditioning goes through Flux's own inputs: 4 learned class tokens of ``context_in_dim`` as the text context
(``"cond.class_tokens"`` [11, 4, 128]) and one learned class vector as ``y`` (``"cond.class_vectors"`` [11, 128], as
ComfyUI's ``pooled_output``); index 10 is the null set for classifier-free guidance.

The latent format is Flux's (scale 0.3611, shift 0.1159) with 4 channels instead of 16, so that ComfyUI's
``fix_empty_latent_channels`` (KSampler node) leaves a 4-channel empty latent as it is.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "fashion_flux.safetensors"
NULL_CLASS = 10
CONTEXT_TOKENS = 4
CONTEXT_DIM = 128
VEC_DIM = 128
LATENT_CHANNELS = 4
LATENT_SIZE = 16          # latent 4 x 16 x 16  <->  image 32 x 32 (28 x 28 + a 2-pixel border)

FASHION_FLUX_CONFIG = dict(
    image_model="flux", in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=2,
    vec_in_dim=VEC_DIM, context_in_dim=CONTEXT_DIM, hidden_size=128, mlp_ratio=4.0, num_heads=4,
    depth=2, depth_single_blocks=8, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=False,
)
DEPTH = FASHION_FLUX_CONFIG["depth"] + FASHION_FLUX_CONFIG["depth_single_blocks"]


def latent_format():
    """Flux's latent format (scale and shift) for the 4-channel Fashion latent; no preview factors."""
    import comfy.latent_formats

    class FashionFluxLatent(comfy.latent_formats.Flux):
        latent_channels = LATENT_CHANNELS

        def __init__(self):
            super().__init__()
            self.latent_rgb_factors = None
            self.latent_rgb_factors_bias = None
            self.taesd_decoder_name = None

    return FashionFluxLatent()


def fashion_flux_config():
    """A ``comfy.supported_models.Flux`` for the model (``txt_ids_dims=[]`` on hosts whose FluxParams has it)."""
    import comfy.ldm.flux.model
    import comfy.supported_models
    cfg = dict(FASHION_FLUX_CONFIG)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:   # ComfyUI 0.33
        cfg["txt_ids_dims"] = []
    mc = comfy.supported_models.Flux(cfg)
    mc.latent_format = latent_format()
    return mc


def init_weights_(dm, seed: int):
    """Fan-in weights (testmodel.fan_in_init_), RMSNorm scales 1 and adaLN-Zero: every modulation and the final
    linear start at zero, so each block starts as the identity and the model's output as 0 (as DiT trains)."""
    import torch
    import testmodel as tm
    tm.fan_in_init_(dm, seed)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)
            elif any(k in name for k in ("_mod.lin.", "modulation.lin.", "adaLN_modulation.", "final_layer.linear.")):
                p.zero_()
    return dm


def split_state_dict(sd):
    """(diffusion model weights fp32, class tokens [11,T,D] fp32, class vectors [11,V] fp32) of a saved file."""
    tokens = sd.pop("cond.class_tokens").float()
    vectors = sd.pop("cond.class_vectors").float()
    return {k: v.float() for k, v in sd.items()}, tokens, vectors


def load_fashion_flux(path: Path = WEIGHTS, device=None):
    """(ModelPatcher, class_tokens [11,4,128], class_vectors [11,128]) of the trained model (fp32)."""
    import comfy.utils
    import testmodel as tm
    sd, tokens, vectors = split_state_dict(comfy.utils.load_torch_file(str(path)))
    config = fashion_flux_config()
    sd = config.process_unet_state_dict(sd)     # as ComfyUI loads a Flux checkpoint (0.33: RMSNorm "scale" -> "weight")
    return tm.build_model_patcher(config, sd, device=device), tokens, vectors


def conditioning(tokens, vectors, classes):
    """ComfyUI CONDITIONING for a list of class indices (one per batch row), and its null version:
    class tokens as the text context, the class vector as ``pooled_output`` (Flux's ``y``)."""
    import torch
    idx = torch.as_tensor(list(classes))
    null = torch.full_like(idx, NULL_CLASS)
    return ([[tokens[idx], {"pooled_output": vectors[idx]}]],
            [[tokens[null], {"pooled_output": vectors[null]}]])


def sample(model, tokens, vectors, classes, seed: int = 0, steps: int = 20, cfg: float = 3.0,
           sampler: str = "euler", scheduler: str = "simple", **kw):
    """One image per entry of ``classes`` through ComfyUI's ``comfy.sample.sample``; ComfyUI latents."""
    import torch
    import comfy.sample
    latent = torch.zeros(len(classes), LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conditioning(tokens, vectors, classes)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                               seed=seed, disable_pbar=True, **kw)


def decode(latents):
    """ComfyUI latents (as a KSampler outputs them) -> images [N,28,28] in [0,1]."""
    from testmodel import fashion as fm
    return fm.latents_to_images(latent_format().process_in(latents.float()))
