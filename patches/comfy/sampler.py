"""ComfyUI glue for the FasterDiffusion sampler nodes: a SAMPLER that owns the run.

It wraps one of ComfyUI's own samplers and adds, per run:
  * encoder propagation with parallel decoder groups (the engine's ``Run``, hooked into this run's
    model_options only, so it works on a plain MODEL and takes over from an Apply node);
  * prior noise injection (``fasterdiffusion.injection.Injector``), exact in the sampler's own state.
On a model class the engine cannot serve it is exactly the plain sampler, with one log line.
"""
from __future__ import annotations

import torch

import comfy.samplers

from ...fasterdiffusion.injection import Injector
from ...fasterdiffusion.runtime import Run, RunModel
from ...fasterdiffusion.samplers import COPYING, STATE_PASSING
from .adapters import unsupported_reason
from .unet import FasterDiffusionConfig, OwnsRun, begin_run, end_run

SUPPORTED = list(STATE_PASSING + COPYING)


def check_sampler(sampler_name: str, alpha: float):
    """Raise a clear error for a base sampler this node cannot run exactly."""
    if sampler_name not in SUPPORTED:
        raise ValueError(f"FasterDiffusion sampler: '{sampler_name}' is not supported (it evaluates the model "
                         f"between schedule points). Supported: {', '.join(SUPPORTED)}. Other samplers work with "
                         f"the FasterDiffusion Apply node, which runs such extra evaluations in full.")
    if alpha > 0 and sampler_name in COPYING:
        raise ValueError(f"FasterDiffusion sampler: prior noise injection needs a sampler that hands its own latent "
                         f"to the model; '{sampler_name}' works on a rescaled copy. Set injection_alpha to 0, or use "
                         f"one of: {', '.join(STATE_PASSING)}.")


class KSamplerWithFasterDiffusion(comfy.samplers.KSAMPLER, OwnsRun):
    """A ComfyUI SAMPLER: ``base`` (a KSAMPLER from comfy.samplers.sampler_object) run with FasterDiffusion."""

    def __init__(self, sampler_name: str, config: FasterDiffusionConfig):
        check_sampler(sampler_name, config.settings.injection_alpha)
        base = comfy.samplers.sampler_object(sampler_name)
        super().__init__(base.sampler_function, base.extra_options, base.inpaint_options)
        self.sampler_name, self.config = sampler_name, config

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        plain = comfy.samplers.KSAMPLER(self.sampler_function, self.extra_options, self.inpaint_options)
        model_sampling = model_wrap.inner_model.model_sampling
        unet = model_wrap.inner_model.diffusion_model
        reason = unsupported_reason(unet)
        if reason:   # exactly the plain sampler: no propagation, no injection; one log line (the report)
            run = Run(self.config.settings, sigmas.flatten().tolist(), [],
                      bypass=f"passing the model through unchanged: {reason}")
            try:
                return plain.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                    disable_pbar)
            finally:
                run.close(self.config.reports, self.config.say)
        run, options = begin_run(self.config, sigmas, model_sampling, self, extra_args["model_options"], unet=unet)
        extra_args = dict(extra_args, model_options=options)
        injector = None
        settings = self.config.settings
        if settings.injection_alpha > 0 and not run.bypass:
            timesteps = model_sampling.timestep(torch.tensor(run.sigmas, dtype=torch.float32)).tolist()
            z_T = noise if denoise_mask is None else noise * denoise_mask   # inpainting: only where it samples
            injector = Injector(run.sigmas, timesteps, z_T, settings.injection_alpha, settings.injection_threshold,
                                lambda sigma, dx: model_sampling.calculate_denoised(sigma, torch.zeros_like(dx), dx))
            run.stats.injected_steps = injector.steps
        fn = _with_run_model(self.sampler_function, run, injector)
        try:   # a fresh KSAMPLER per run: nothing of this run is left on the node's sampler object
            return comfy.samplers.KSAMPLER(fn, self.extra_options, self.inpaint_options).sample(
                model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        finally:
            end_run(run, options, self.config)


def _with_run_model(sampler_function, run, injector):
    def sampler_with_faster_diffusion(model, x, sigmas, *args, **kwargs):
        return sampler_function(RunModel(model, run, injector), x, sigmas, *args, **kwargs)
    return sampler_with_faster_diffusion
