"""ComfyUI's Flux adapter (placeholder until the Flux split lands): serves nothing."""
from __future__ import annotations

from comfy.ldm.flux.model import Flux


class FluxAdapter:
    unet_class = Flux

    @staticmethod
    def unsupported_reason(unet) -> str | None:
        return "Flux is not served yet"
