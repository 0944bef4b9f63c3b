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

__all__ = ["ComfyExtension", "io", "Choice", "node_id"]


def node_id(cls) -> str | None:
    """The running node's id (the UNIQUE_ID hidden input), or None when called outside a prompt (tests, tools)."""
    return cls.hidden.unique_id if cls.hidden is not None else None


class _ChoiceList(list):
    """A combo's choices as its input type, the way V1 nodes declare it.  Hashable: newer ComfyUI looks input
    types up in a dict (the choices never change after the schema is built)."""

    def __hash__(self):
        return hash(tuple(self))


class Choice(io.Combo.Input):
    """A combo (dropdown) whose type is its list of choices, as a V1 combo's is.  ComfyUI 0.3.75 refuses a
    queued value outside the choices only for such list-typed inputs (newer versions check V3 "COMBO"
    inputs too, and every version still takes list-typed ones), so a bad sampler or scheduler name in an
    API prompt is refused at queue time, naming the input, as before the move to V3."""

    def get_io_type(self):
        return _ChoiceList(self.options)
