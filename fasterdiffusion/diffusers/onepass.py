"""TiUE one-pass sampling on a diffusers pipeline."""
from __future__ import annotations

import logging

import torch

from ..runtime import ModelCall
from .unet import DiffusersCall, DiffusersUNetAdapter

log = logging.getLogger("FasterDiffusion")

# --------------------------------------------------------------------------------------------------
# TiUE one-pass sampling (arXiv 2505.21960): the engine's one_pass on a Stable Diffusion pipeline
# --------------------------------------------------------------------------------------------------

def one_pass(pipe, prompt=None, *, k: int = 4, num_images_per_prompt: int = 1, generator=None, latents=None,
             prompt_embeds=None, height: int | None = None, width: int | None = None, max_decoder_batch: int = 32,
             output_type: str = "pil"):
    """Generate with a TiUE one-pass student in a ``StableDiffusionPipeline`` (SD1.x / SD2.x): the encoder once
    on the noise at the first of ``k`` DDIM timesteps (leading spacing with the scheduler's ``steps_offset``),
    the ``k`` decoders in one batch (split under ``max_decoder_batch`` rows), closed-form DDIM (eta 0), then
    the VAE.  No CFG (guidance is distilled into the student); no scheduler loop.  The schedule, the
    parametrisation (epsilon or v_prediction) and where the last update lands (``set_alpha_to_one``) come from
    ``pipe.scheduler.config``.  Returns images as ``output_type`` says ("pil", "np", "pt") or, for "latent",
    the latents.  Not a pipeline call: ``apply()``'s hooks are not involved.
    """
    from ..onepass import OnePassError, ddim_timesteps
    from ..onepass import one_pass as engine_one_pass
    name = type(pipe).__name__
    if name not in ("StableDiffusionPipeline",):
        raise TypeError(f"FasterDiffusion one_pass: {name} is not supported (StableDiffusionPipeline only)")
    unet = pipe.unet
    config = pipe.scheduler.config
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(config.get("prediction_type", "epsilon"))
    if prediction is None:
        raise OnePassError(f"FasterDiffusion one_pass: prediction_type {config.get('prediction_type')!r} has no "
                           "closed-form DDIM here (epsilon and v_prediction do)")
    alphas = getattr(pipe.scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise OnePassError(f"FasterDiffusion one_pass: {type(pipe.scheduler).__name__} has no alphas_cumprod")
    alphas = alphas.double().cpu()
    timesteps = ddim_timesteps(k, int(config.get("num_train_timesteps", len(alphas))), int(config.get("steps_offset", 0)))
    final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas[0])
    device = pipe._execution_device
    with torch.no_grad():
        if prompt_embeds is None:
            prompt_embeds, _ = pipe.encode_prompt(prompt, device, num_images_per_prompt, False)
        batch = prompt_embeds.shape[0]
        height = height or unet.config.sample_size * pipe.vae_scale_factor
        width = width or unet.config.sample_size * pipe.vae_scale_factor
        shape = (batch, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device, prompt_embeds.dtype)
        call = ModelCall(latents, torch.full((batch,), timesteps[0], device=device, dtype=torch.int64), prompt_embeds,
                         None, latents.dtype, (), DiffusersCall())
        res = engine_one_pass(DiffusersUNetAdapter(unet), call, timesteps, alphas, final, max_decoder_batch, prediction)
        z = res.latent.to(prompt_embeds.dtype)
        if output_type == "latent":
            return z
        image = pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

