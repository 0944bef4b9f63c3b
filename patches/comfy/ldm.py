"""ComfyUI's UNet adapter: the shared ldm split (``fasterdiffusion/ldm.py``) on ComfyUI's ``UNetModel`` (SD1.x,
SD2.x, SDXL), plus ControlNet reuse (``controlnet.py``): a key step keeps each ControlNet's own residuals with its
features, and the decoder of every step of the group sums those active at its own step.
"""
from __future__ import annotations

from dataclasses import replace

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ...fasterdiffusion import ldm
from ...fasterdiffusion.ldm import LdmCall, make_call  # noqa: F401  (the glue's names for them)
from ...fasterdiffusion.runtime import Features, ModelCall
from .controlnet import DeferredControl, StepsControl, is_reused, merge_chain, reused_decoder_control


def unsupported_reason(unet) -> str | None:
    """Why this adapter cannot serve ``unet``, or None if it can."""
    if type(unet) is not UNetModel:
        return f"{type(unet).__name__} is not ComfyUI's UNetModel (SD1.x, SD2.x, SDXL)"
    return ldm.unsupported_reason(unet)


class LdmUNetAdapter(ldm.LdmSplit):
    unet_class = UNetModel
    unsupported_reason = staticmethod(unsupported_reason)

    @staticmethod
    def make_call(unet, a: dict, slot) -> ModelCall:
        """The ModelCall of ``UNetModel._forward``'s bound arguments (``adapters.bind``)."""
        return make_call(a["x"], a["timesteps"], a["context"], a["y"], a["control"], a["transformer_options"],
                         a["kwargs"], slot)

    @classmethod
    def for_run(cls, unet, settings):
        return cls(unet)

    def encode(self, call: ModelCall, emb) -> Features:
        h = call.host
        if not isinstance(h.control, DeferredControl):
            return super().encode(call, emb)
        kept = h.control.own_residuals()     # the ControlNets run here, once for the group
        feats = self.run_encoder(call, emb, merge_chain([r for _, r in kept]))
        feats.meta.controls = kept
        return feats

    def decode(self, call: ModelCall, features: Features, emb):
        h = call.host
        if not is_reused(h.control):
            return super().decode(call, features, emb)
        return self.run_decoder(call, features, emb, reused_decoder_control(h.control, features.meta.controls))

    def tile(self, call: ModelCall, n, timesteps, sigmas) -> ModelCall:
        big = super().tile(call, n, timesteps, sigmas)
        control = call.host.control     # fresh residuals are per step (never batched); reused ones summed per step
        if isinstance(control, DeferredControl):
            big = replace(big, host=replace(big.host, control=StepsControl(control, list(sigmas.view(n, -1)[:, :1]),
                                                                            call.rows)))
        return big

    def own_step_reason(self, call: ModelCall) -> str | None:
        """Reused ControlNet residuals batch where the rows' sigmas are known; fresh ones never do."""
        reason = super().own_step_reason(call)
        if reason is None and isinstance(call.host.control, DeferredControl) and call.sigmas is None:
            return "ControlNet residuals change every step"
        return reason
