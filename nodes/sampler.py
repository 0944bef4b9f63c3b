"""FasterDiffusion Sampler (a SAMPLER for SamplerCustom / SamplerCustomAdvanced) and FasterDiffusion KSampler."""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..fasterdiffusion import DEFAULT_ALPHA, DEFAULT_THRESHOLD
from ..fasterdiffusion.forecast import DEFAULT_PROPAGATION
from ..fasterdiffusion.settings import Settings
from ..patches.comfy.sampler import SUPPORTED, KSamplerWithFasterDiffusion
from ..patches.comfy.unet import FasterDiffusionConfig
from .apply import CATEGORY, controlnet_reuse_input, propagation_input, strategy_inputs, validate_strategy
from .comfy_v3 import Choice, io, node_id

SAMPLER_TOOLTIP = ("The sampler to run with FasterDiffusion. Only samplers that evaluate the model once per step "
                   "on the schedule can batch a group's decoders ahead: " + ", ".join(SUPPORTED) + ". "
                   "(lcm runs every step in full: it re-noises the latent each step.)")


def fd_inputs():
    """The encoder-propagation settings plus the paper's prior noise injection, in the nodes' widget order."""
    return [
        *strategy_inputs(),
        io.Float.Input("injection_alpha", default=DEFAULT_ALPHA, min=0.0, max=0.1, step=0.001, tooltip=
            "Prior noise injection (paper §3.3): late steps get x += alpha * sqrt(1+sigma^2) * z_T, z_T being this "
            "run's starting noise, which restores texture that propagation smooths. 0.003 is the paper's value; "
            "0 turns it off. With denoise < 1, z_T is the noise added to the input latent. Not with uni_pc."),
        io.Float.Input("injection_threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1000.0, step=1.0, tooltip=
            "Inject at the steps whose model timestep (999 = pure noise ... 0) is below this; 500 = the second "
            "half of a full-denoise schedule, as in the paper."),
    ]


def sampler_input():
    return Choice("sampler_name", options=SUPPORTED, default="euler", tooltip=SAMPLER_TOOLTIP)


def make_sampler(sampler_name, strategy, parallel, max_decoder_batch, injection_alpha, injection_threshold, node,
                 controlnet_reuse=True, propagation=DEFAULT_PROPAGATION):
    settings = Settings.of(strategy, parallel, max_decoder_batch, propagation, controlnet_reuse, injection_alpha,
                           injection_threshold)
    return KSamplerWithFasterDiffusion(sampler_name, FasterDiffusionConfig(settings, node))


class FasterDiffusionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FasterDiffusionSampler",
            display_name="FasterDiffusion Sampler",
            category=CATEGORY,
            description=("A SAMPLER for SamplerCustom / SamplerCustomAdvanced that runs the chosen sampler with "
                         "FasterDiffusion: encoder propagation with parallel decoder groups, and the paper's prior "
                         "noise injection in the sampler's own state. Works on a plain model; on a model patched by "
                         "FasterDiffusion Apply, this node's settings win."),
            inputs=[sampler_input(), *fd_inputs(), controlnet_reuse_input(), propagation_input()],
            outputs=[io.Sampler.Output(tooltip="The sampler, for SamplerCustom or SamplerCustomAdvanced.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, strategy=None):   # only this one: the host checks the rest
        return validate_strategy(strategy)

    @classmethod
    def execute(cls, sampler_name, strategy, parallel, max_decoder_batch, injection_alpha,
                injection_threshold, controlnet_reuse=True, propagation=DEFAULT_PROPAGATION) -> io.NodeOutput:
        return io.NodeOutput(make_sampler(sampler_name, strategy, parallel, max_decoder_batch, injection_alpha,
                                          injection_threshold, node_id(cls), controlnet_reuse, propagation))


class FasterDiffusionKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FasterDiffusionKSampler",
            display_name="FasterDiffusion KSampler",
            category=CATEGORY,
            description=("KSampler with FasterDiffusion built in: the same seed, steps, scheduler and denoise "
                         "handling as KSampler, plus encoder propagation, parallel decoder groups and prior noise "
                         "injection. On a model patched by FasterDiffusion Apply, this node's settings win."),
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the input latent."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                sampler_input(),
                Choice("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                               tooltip="How the noise levels are spaced."),
                io.Conditioning.Input("positive", tooltip="What to include in the image."),
                io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the schedule to run; lower keeps more of the input latent."),
                *fd_inputs(),
                controlnet_reuse_input(),
                propagation_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, strategy=None):   # only this one: the host checks the rest
        return validate_strategy(strategy)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                strategy, parallel, max_decoder_batch, injection_alpha, injection_threshold,
                controlnet_reuse=True, propagation=DEFAULT_PROPAGATION) -> io.NodeOutput:
        sampler = make_sampler(sampler_name, strategy, parallel, max_decoder_batch, injection_alpha,
                               injection_threshold, node_id(cls), controlnet_reuse, propagation)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        # exactly KSampler's schedule (incl. its denoise handling and discarded penultimate sigmas)
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                             noise_mask=latent_image.get("noise_mask"),
                                             callback=latent_preview.prepare_callback(model, steps),
                                             disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(out)
