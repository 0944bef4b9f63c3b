"""ComfyUI glue for calibration: one full sampling pass that records how the encoder features move.

A DIFFUSION_MODEL wrapper on a clone runs each on-schedule call through the ldm adapter's split (identical
to the host forward, pinned by the parity test) and hands the features to the engine's ``DriftRecorder``;
``fasterdiffusion.calibrate`` then picks the key steps.  With ``stale_outputs`` each step's decoder also runs
on every earlier step's features, and the output differences are weighted by how far a sampler step moves
the latent per unit of output change (``latent_step_weights``).
"""
from __future__ import annotations

import torch

from ...fasterdiffusion import match_step
from ...fasterdiffusion.drift import DriftRecorder
from .ldm import LdmUNetAdapter, make_call, unsupported_reason
from .unet import WRAP


class FeatureRecorder(DriftRecorder):
    def __init__(self, schedule, stale_outputs=False, step_weights=None):
        super().__init__(len(schedule) - 1, stale_outputs, step_weights)
        self.schedule = schedule

    def wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        unet, to = executor.class_obj, transformer_options
        sigmas = to.get("sigmas")
        step = None if sigmas is None or sigmas.numel() == 0 else match_step(self.schedule, float(sigmas.flatten()[0]))
        if unsupported_reason(unet) or step is None:
            return executor(x, timesteps, context, y, control, to, **kwargs)
        chunk = (tuple(map(str, to.get("uuids", ()))), tuple(to.get("cond_or_uncond", ())))
        # the split pops ControlNet residuals off their lists: every extra decoder run gets fresh lists
        kept = None if control is None else {k: list(v) if isinstance(v, list) else v for k, v in control.items()}

        def again():
            fresh = None if kept is None else {k: list(v) if isinstance(v, list) else v for k, v in kept.items()}
            return make_call(x, timesteps, context, y, fresh, to, kwargs)
        return self.forward(LdmUNetAdapter(unet), make_call(x, timesteps, context, y, control, to, kwargs), step,
                            chunk, again)


def latent_step_weights(model_sampling, schedule) -> list[float]:
    """Per step j: (change of the final image per unit change of step j's UNet output)^2, to first order.
    An Euler step moves the latent by (1 - s_{j+1}/s_j) (x - denoised); denoised is linear in the output with
    the model type's factor (eps/flow: -sigma, v: -sigma/sqrt(sigma^2+1)), read from the host's own
    ``calculate_denoised``; and the rest of the run carries a latent change at noise level s to the final
    image damped by sigma_data / sqrt(sigma_data^2 + s^2) (exact for Gaussian data), so an early step's error
    weighs less than its size in the latent."""
    sigma_data = float(getattr(model_sampling, "sigma_data", 1.0))
    weights = []
    for s, s_next in zip(schedule, schedule[1:]):
        sigma, one, zero = torch.tensor([s]), torch.ones(1, 1), torch.zeros(1, 1)
        per_unit = float(model_sampling.calculate_denoised(sigma, one, zero) - model_sampling.calculate_denoised(sigma, zero, zero))
        carried = sigma_data / (sigma_data ** 2 + s_next ** 2) ** 0.5
        weights.append((per_unit * (1 - s_next / s) * carried) ** 2 if s > 0 else 0.0)
    return weights


def recording_model(model, schedule, stale_outputs=False):
    """(a clone of ``model`` that records encoder features per step, the recorder); ValueError saying why for a
    model the split cannot serve (there is nothing to calibrate: Apply passes such a model through)."""
    if reason := unsupported_reason(model.get_model_object("diffusion_model")):
        raise ValueError(f"FasterDiffusion Calibrate cannot calibrate this model: {reason}. FasterDiffusion Apply "
                         f"passes it through unchanged, so there are no key steps to choose")
    schedule = [float(s) for s in schedule]
    weights = latent_step_weights(model.get_model_object("model_sampling"), schedule) if stale_outputs else None
    recorder = FeatureRecorder(schedule, stale_outputs, weights)
    m = model.clone()
    m.add_wrapper_with_key(WRAP.DIFFUSION_MODEL, "faster_diffusion_calibrate", recorder.wrapper)
    return m, recorder
