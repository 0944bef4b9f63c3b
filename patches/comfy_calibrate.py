"""ComfyUI glue for calibration: one full sampling pass that records how the encoder features move.

A DIFFUSION_MODEL wrapper on a clone runs each on-schedule call through the ldm adapter's split (identical
to the host forward, pinned by the parity test) and hands the features to the engine's ``DriftRecorder``;
``fasterdiffusion.calibrate`` then picks the key steps.
"""
from __future__ import annotations

from ..fasterdiffusion import match_step
from ..fasterdiffusion.drift import DriftRecorder
from .comfy_ldm import LdmUNetAdapter, make_call, unsupported_reason
from .comfy_unet import WRAP


class FeatureRecorder(DriftRecorder):
    def __init__(self, schedule):
        super().__init__(len(schedule) - 1)
        self.schedule = schedule

    def wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        unet, to = executor.class_obj, transformer_options
        sigmas = to.get("sigmas")
        step = None if sigmas is None or sigmas.numel() == 0 else match_step(self.schedule, float(sigmas.flatten()[0]))
        if unsupported_reason(unet) or step is None:
            return executor(x, timesteps, context, y, control, to, **kwargs)
        chunk = (tuple(map(str, to.get("uuids", ()))), tuple(to.get("cond_or_uncond", ())))
        return self.forward(LdmUNetAdapter(unet), make_call(x, timesteps, context, y, control, to, kwargs), step, chunk)


def recording_model(model, schedule):
    """(a clone of ``model`` that records encoder features per step, the recorder)."""
    recorder = FeatureRecorder([float(s) for s in schedule])
    m = model.clone()
    m.add_wrapper_with_key(WRAP.DIFFUSION_MODEL, "faster_diffusion_calibrate", recorder.wrapper)
    return m, recorder
