"""FasterDiffusion Compare: the plain run and the FasterDiffusion run on one seed, timed, side by side."""
from __future__ import annotations

import logging
import time

import torch

import comfy.model_management
import comfy.samplers
import nodes as host_nodes

from ..fasterdiffusion.settings import Settings
from ..fasterdiffusion.compare import Comparison, equal_time_steps, psnr, report
from ..fasterdiffusion.runtime import format_report
from ..patches.comfy.unet import apply_faster_diffusion, show_on_node, without_faster_diffusion
from ..fasterdiffusion.forecast import DEFAULT_PROPAGATION
from .apply import CATEGORY, propagation_input, strategy_inputs, validate_strategy
from .comfy_v3 import Choice, io, node_id

log = logging.getLogger("FasterDiffusion")
DIFF_GAIN = 4.0   # the difference panel shows |full - faster| x 4: small differences stay visible, none are invented


def sync():
    if comfy.model_management.get_torch_device().type == "cuda":
        torch.cuda.synchronize()


def timed_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image):
    """KSampler's own sampling (same noise for the same seed) and its wall time."""
    sync()
    start = time.perf_counter()
    (out,) = host_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                        latent_image)
    sync()
    return out, time.perf_counter() - start


def decode(vae, latent):
    images = vae.decode(latent["samples"])
    return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images   # as VAEDecode: video -> frames


class FasterDiffusionCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FasterDiffusionCompare",
            display_name="FasterDiffusion Compare",
            category=CATEGORY,
            description=(
                "Runs the same seed through the plain sampler (as KSampler) and through FasterDiffusion (as "
                "FasterDiffusion Apply + KSampler), times both, and shows full | FasterDiffusion | difference "
                "side by side with the PSNR. With compare_fewer_steps it also runs the plain sampler with as many "
                "steps as cost the same time, and says honestly which of the two is closer to the full run. "
                "Runs in the order FasterDiffusion, full, fewer steps, so warm-up costs count against "
                "FasterDiffusion."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model. This node adds FasterDiffusion for its own run "
                                                "only; an Apply node's hooks on it are taken off for the plain runs."),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise (as KSampler, denoise 1)."),
                io.Vae.Input("vae", tooltip="Decodes the latents for the side-by-side image and the PSNR."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed of the noise; every run uses the same noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                Choice("sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                               tooltip="The sampler (any: as with the Apply node, off-schedule evaluations run "
                                       "in full)."),
                Choice("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                               tooltip="How the noise levels are spaced."),
                *strategy_inputs(),
                io.Boolean.Input("compare_fewer_steps", default=True, tooltip=(
                    "Also run the plain sampler with round(steps x measured time ratio) steps, which costs about "
                    "what FasterDiffusion cost, and compare its PSNR: the honest baseline. Off: only state that "
                    "step count.")),
                propagation_input(),
            ],
            outputs=[
                io.Image.Output(display_name="comparison", tooltip=(
                    f"Per image: full | FasterDiffusion | difference (|full - faster| x {DIFF_GAIN:g}), side by "
                    f"side.")),
                io.Latent.Output(display_name="full", tooltip="The latent of the plain run."),
                io.Latent.Output(display_name="faster", tooltip="The latent of the FasterDiffusion run."),
                io.String.Output(display_name="report", tooltip="Times, speed ratio, PSNR and the recommendation "
                                                                "(also shown on the node)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, strategy=None):   # only this one: the host checks the rest
        return validate_strategy(strategy)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, vae, seed, steps, cfg, sampler_name, scheduler,
                strategy, parallel, max_decoder_batch, compare_fewer_steps=True, propagation=DEFAULT_PROPAGATION) -> io.NodeOutput:
        plain = without_faster_diffusion(model)
        if plain is not model:
            log.info("FasterDiffusion Compare: the input model has FasterDiffusion applied; the plain runs use it "
                     "without, the FasterDiffusion run with this node's settings")
        patched, config = apply_faster_diffusion(plain, Settings.of(strategy, parallel, max_decoder_batch, propagation),
                                                 node_id(cls))
        comfy.model_management.load_models_gpu([plain])   # loading the weights is not part of either run's time
        run = lambda m, n: timed_ksampler(m, seed, n, cfg, sampler_name, scheduler, positive, negative, latent_image)
        faster, faster_s = run(patched, steps)
        full, full_s = run(plain, steps)
        full_img, faster_img = decode(vae, full), decode(vae, faster)
        stats = config.reports[-1] if config is not None and config.reports else None
        c = Comparison(strategy, steps, full_s, faster_s, psnr(full_img, faster_img),
                       equal_time_steps(steps, full_s, faster_s), stats.get("cached_calls", 0) if stats else 0,
                       propagation=stats.get("propagation", propagation) if stats else propagation)
        if compare_fewer_steps and c.encoder_skips and c.fewer_steps < steps:
            fewer, c.fewer_seconds = run(plain, c.fewer_steps)
            c.fewer_psnr = psnr(full_img, decode(vae, fewer))
        text = report(c)
        if stats:
            text += "\n" + format_report(stats)
        log.info(text)
        show_on_node(node_id(cls), text)
        diff = ((full_img - faster_img).abs() * DIFF_GAIN).clamp(0, 1)
        return io.NodeOutput(torch.cat([full_img, faster_img, diff], dim=2), full, faster, text)
