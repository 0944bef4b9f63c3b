"""ComfyUI's Wan adapter (placeholder until the Wan split lands): serves nothing."""
from __future__ import annotations

from comfy.ldm.wan.model import WanModel


class WanAdapter:
    unet_class = WanModel

    @staticmethod
    def unsupported_reason(unet) -> str | None:
        return "Wan is not served yet"
