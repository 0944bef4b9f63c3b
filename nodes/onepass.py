"""FasterDiffusion One-Pass (TiUE): image generation with no sampling loop (arXiv 2505.21960)."""
from __future__ import annotations

import logging

import comfy.utils

from ..fasterdiffusion.onepass import MAX_K, OnePassError
from ..patches.comfy_onepass import report, sample
from ..patches.comfy_unet import show_on_node

log = logging.getLogger("FasterDiffusion")
MIN_K = 2     # with DDIM's leading spacing K = 1 puts the only step at timestep 1, on pure noise


class FasterDiffusionOnePass:
    DESCRIPTION = (
        "TiUE one-pass sampling: the UNet encoder runs once on the noise, at the first of K DDIM timesteps; the "
        "K decoders run together in one batch, each at its own timestep; closed-form DDIM combines their outputs "
        "into the final latent. No sampling loop and no CFG (guidance is distilled into the student). Made for "
        "TiUE students (distil one from your model with tools/train_tiue.py); any SD1.x/SD2.x/SDXL model runs "
        "(eps or v-prediction), but only distilled students give good images, and the node says which it got.")
    CATEGORY = "sampling/faster_diffusion"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The generated latent (decode it with the model's VAE).",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A TiUE student (best) or any SD1.x/SD2.x/SDXL UNet model (eps or "
                                           "v-prediction); load a student with Load Diffusion Model."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt. There is no negative prompt: one-pass students "
                                                     "have the guidance distilled in."}),
            "latent_image": ("LATENT", {"tooltip": "Size and batch of the images (an Empty Latent Image). Generation "
                                                   "starts from pure noise; a non-empty latent enters with the weight "
                                                   "KSampler gives it at denoise 1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The random seed of the noise (the same noise KSampler makes for this seed)."}),
            "K": ("INT", {"default": 4, "min": MIN_K, "max": MAX_K, "tooltip":
                "DDIM steps whose decoders run in the one batch (timesteps 751, 501, 251, 1 at K = 4). Use the K the "
                "student was distilled for (TiUE: 4)."}),
            "max_decoder_batch": ("INT", {"default": 32, "min": 0, "max": 4096, "tooltip":
                "Memory cap: most rows (images x steps) in one decoder call; more are split into several calls "
                "with identical results. 0 = no cap."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def generate(self, model, positive, latent_image, seed, K=4, max_decoder_batch=32, unique_id=None):
        if not MIN_K <= K <= MAX_K:
            raise OnePassError(f"FasterDiffusion One-Pass: K must be {MIN_K}..{MAX_K}, got {K}")
        out, request, student, seconds = sample(model, positive, latent_image, seed, K, max_decoder_batch,
                                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        text = report(request, student, seconds)
        (log.info if student else log.warning)(text)
        show_on_node(unique_id, text)
        return (out,)
