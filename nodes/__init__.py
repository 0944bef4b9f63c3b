"""The pack's nodes, registered with ComfyUI's V3 API: ComfyUI calls ``comfy_entrypoint`` (from the pack's
__init__.py) and registers every class in NODES under its schema's node_id.  A new node is one line in NODES."""
from .apply import FasterDiffusionApply
from .calibrate import FasterDiffusionCalibrate
from .comfy_v3 import ComfyExtension, io
from .compare import FasterDiffusionCompare
from .onepass import FasterDiffusionOnePass
from .sampler import FasterDiffusionKSampler, FasterDiffusionSampler

NODES: list[type[io.ComfyNode]] = [
    FasterDiffusionApply,
    FasterDiffusionSampler,
    FasterDiffusionKSampler,
    FasterDiffusionCalibrate,
    FasterDiffusionOnePass,
    FasterDiffusionCompare,
]


class FasterDiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FasterDiffusionExtension:
    return FasterDiffusionExtension()
