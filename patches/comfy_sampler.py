"""ComfyUI glue for the FasterDiffusion sampler nodes: a SAMPLER that owns the run.

It wraps one of ComfyUI's own samplers and adds, per run:
  * encoder propagation with parallel decoder groups (the engine of ``comfy_unet``, hooked into this
    run's model_options only, so it works on a plain MODEL and takes over from an Apply node);
  * prior noise injection, exact in the sampler's own state: after the model call of every step with
    model timestep < threshold, the sampler's latent gets x += alpha * sqrt(1 + sigma^2) * z_T in place,
    and the returned prediction is the one the model output gives for that latent (the paper's parallel
    pipeline: injection before each update; the key step's encoder saw the latent without it).
"""
from __future__ import annotations

import torch

import comfy.samplers

from ..fasterdiffusion import injection_scale, injection_steps, match_step
from .comfy_unet import FasterDiffusionConfig, begin_run, finish_run

# Samplers whose model calls all land on the schedule, once per step, with the sampler's own latent
# tensor (so the in-place injection reaches the sampler's state).
# lcm is listed because users pair it with LCM models, but it runs every step in full (comfy_unet.BYPASSED_SAMPLERS).
STATE_PASSING = ["euler", "euler_ancestral", "ddim", "dpmpp_2m", "lms", "lcm"]
# On the schedule too, but they call the model on a rescaled copy of their latent: no injection.
COPYING = ["uni_pc", "uni_pc_bh2"]
SUPPORTED = STATE_PASSING + COPYING


class InjectionSettings:
    def __init__(self, alpha: float, threshold: float):
        self.alpha, self.threshold = alpha, threshold


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


class KSamplerWithFasterDiffusion(comfy.samplers.KSAMPLER):
    """A ComfyUI SAMPLER: ``base`` (a KSAMPLER from comfy.samplers.sampler_object) run with FasterDiffusion."""

    def __init__(self, sampler_name: str, config: FasterDiffusionConfig, injection: InjectionSettings):
        check_sampler(sampler_name, injection.alpha)
        base = comfy.samplers.sampler_object(sampler_name)
        super().__init__(base.sampler_function, base.extra_options, base.inpaint_options)
        self.sampler_name, self.config, self.injection = sampler_name, config, injection

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_sampling = model_wrap.inner_model.model_sampling
        run, options = begin_run(self.config, sigmas, model_sampling, self, extra_args["model_options"])
        extra_args = dict(extra_args, model_options=options)
        fn = self.sampler_function
        if self.injection.alpha > 0:
            injector = Injector(run.schedule, model_sampling, noise, denoise_mask, self.injection)
            run.stats["injected_steps"] = injector.steps
            fn = injector.wrap(fn)
        try:   # a fresh KSAMPLER per run: nothing of this run is left on the node's sampler object
            return comfy.samplers.KSAMPLER(fn, self.extra_options, self.inpaint_options).sample(
                model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        finally:
            finish_run(run)


class Injector:
    """Per-run prior noise injection around the k-diffusion model function."""

    def __init__(self, schedule, model_sampling, noise, denoise_mask, settings: InjectionSettings):
        timesteps = model_sampling.timestep(torch.tensor(schedule, dtype=torch.float32)).tolist()
        self.schedule, self.model_sampling, self.alpha = schedule, model_sampling, settings.alpha
        self.steps = injection_steps(timesteps, settings.threshold)
        self.z_T = noise if denoise_mask is None else noise * denoise_mask   # inpainting: only where it samples
        self.done: set[int] = set()

    def wrap(self, sampler_function):
        def sampler_with_injection(model, x, sigmas, *args, **kwargs):
            return sampler_function(_InjectingModel(model, self), x, sigmas, *args, **kwargs)
        return sampler_with_injection

    def after_call(self, x, sigma, denoised):
        step = match_step(self.schedule, float(sigma.flatten()[0]))
        if step is None or step in self.done or step not in self.steps:
            return denoised
        self.done.add(step)
        inj = self.z_T.to(x) * injection_scale(self.alpha, self.schedule[step])
        x.add_(inj)                                  # the sampler's own latent: before its update
        # what the same model output predicts for the injected latent (exactly denoised + inj for eps models)
        return denoised + self.model_sampling.calculate_denoised(sigma, torch.zeros_like(inj), inj)


class _InjectingModel:
    """The k-diffusion model function with injection after each on-schedule call; other attributes
    (``inner_model`` and so on, which some samplers read) pass through."""

    def __init__(self, model, injector: Injector):
        self._model, self._injector = model, injector

    def __call__(self, x, sigma, **kwargs):
        return self._injector.after_call(x, sigma, self._model(x, sigma, **kwargs))

    def __getattr__(self, name):
        return getattr(self._model, name)
