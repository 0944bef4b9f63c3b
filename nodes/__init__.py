from .apply import FasterDiffusionApply
from .calibrate import FasterDiffusionCalibrate
from .compare import FasterDiffusionCompare
from .onepass import FasterDiffusionOnePass
from .sampler import FasterDiffusionKSampler, FasterDiffusionSampler

NODE_CLASS_MAPPINGS = {
    "FasterDiffusionApply": FasterDiffusionApply,
    "FasterDiffusionSampler": FasterDiffusionSampler,
    "FasterDiffusionKSampler": FasterDiffusionKSampler,
    "FasterDiffusionCalibrate": FasterDiffusionCalibrate,
    "FasterDiffusionOnePass": FasterDiffusionOnePass,
    "FasterDiffusionCompare": FasterDiffusionCompare,   # a V3 node: the host takes it from this V1 mapping
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FasterDiffusionApply": "FasterDiffusion Apply",
    "FasterDiffusionSampler": "FasterDiffusion Sampler",
    "FasterDiffusionKSampler": "FasterDiffusion KSampler",
    "FasterDiffusionCalibrate": "FasterDiffusion Calibrate",
    "FasterDiffusionOnePass": "FasterDiffusion One-Pass (TiUE)",
    "FasterDiffusionCompare": "FasterDiffusion Compare",
}
