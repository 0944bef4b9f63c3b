"""ComfyUI's V3 node API, imported once for every node of the pack.

``comfy_api.v0_0_2`` is the newest *versioned* name that both the test host (0.3.75) and ComfyUI 0.38.x ship
(0.38 adds v0_0_3; ``latest`` moves with every release); it re-exports ``latest``'s ``io`` and
``ComfyExtension``.  Should a future ComfyUI drop it, ``latest`` is the fallback."""
from __future__ import annotations

try:
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:                                   # pragma: no cover - a ComfyUI without v0_0_2
    try:
        from comfy_api.latest import ComfyExtension, io
    except ImportError as e:
        raise ImportError("FasterDiffusion needs ComfyUI's V3 node API (comfy_api, ComfyUI 0.3.64 or newer); "
                          "update ComfyUI") from e

__all__ = ["ComfyExtension", "io", "node_id"]


def node_id(cls) -> str | None:
    """The running node's id (the UNIQUE_ID hidden input), or None when called outside a prompt (tests, tools)."""
    return cls.hidden.unique_id if cls.hidden is not None else None
