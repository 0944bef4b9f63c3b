"""FasterDiffusion One-Pass (TiUE): image generation with no sampling loop (arXiv 2505.21960)."""
from __future__ import annotations

import logging

import comfy.utils

from ..fasterdiffusion.onepass import MAX_K, OnePassError
from ..patches.comfy.onepass import report, sample
from ..patches.comfy.unet import show_on_node
from .apply import CATEGORY
from .comfy_v3 import io, node_id

log = logging.getLogger("FasterDiffusion")
MIN_K = 2     # with DDIM's leading spacing K = 1 puts the only step at timestep 1, on pure noise


class FasterDiffusionOnePass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FasterDiffusionOnePass",
            display_name="FasterDiffusion One-Pass (TiUE)",
            category=CATEGORY,
            description=(
                "TiUE one-pass sampling: the UNet encoder runs once on the noise, at the first of K DDIM timesteps; "
                "the K decoders run together in one batch, each at its own timestep; closed-form DDIM combines their "
                "outputs into the final latent. No sampling loop and no CFG (guidance is distilled into the student). "
                "Made for TiUE students (distil one from your model with tools/train_tiue.py); any SD1.x/SD2.x/SDXL "
                "model runs (eps or v-prediction), but only distilled students give good images, and the node says "
                "which it got."),
            inputs=[
                io.Model.Input("model", tooltip="A TiUE student (best) or any SD1.x/SD2.x/SDXL UNet model (eps or "
                                                "v-prediction); load a student with Load Diffusion Model."),
                io.Conditioning.Input("positive", tooltip="The prompt. There is no negative prompt: one-pass students "
                                                          "have the guidance distilled in."),
                io.Latent.Input("latent_image", tooltip="Size and batch of the images (an Empty Latent Image). "
                                                        "Generation starts from pure noise; a non-empty latent enters "
                                                        "with the weight KSampler gives it at denoise 1."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True, tooltip=
                             "The random seed of the noise (the same noise KSampler makes for this seed)."),
                io.Int.Input("K", default=4, min=MIN_K, max=MAX_K, tooltip=
                             "DDIM steps whose decoders run in the one batch (timesteps 751, 501, 251, 1 at K = 4). "
                             "Use the K the student was distilled for (TiUE: 4)."),
                io.Int.Input("max_decoder_batch", default=32, min=0, max=4096, tooltip=
                             "Memory cap: most rows (images x steps) in one decoder call; more are split into "
                             "several calls with identical results. 0 = no cap."),
            ],
            outputs=[io.Latent.Output(tooltip="The generated latent (decode it with the model's VAE).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, K=4, max_decoder_batch=32) -> io.NodeOutput:
        if not MIN_K <= K <= MAX_K:
            raise OnePassError(f"FasterDiffusion One-Pass: K must be {MIN_K}..{MAX_K}, got {K}")
        out, request, student, seconds = sample(model, positive, latent_image, seed, K, max_decoder_batch,
                                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        text = report(request, student, seconds)
        (log.info if student else log.warning)(text)
        show_on_node(node_id(cls), text)
        return io.NodeOutput(out)
