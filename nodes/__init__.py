from .apply import FasterDiffusionApply
from .calibrate import FasterDiffusionCalibrate
from .onepass import FasterDiffusionOnePass
from .sampler import FasterDiffusionKSampler, FasterDiffusionSampler

NODE_CLASS_MAPPINGS = {
    "FasterDiffusionApply": FasterDiffusionApply,
    "FasterDiffusionSampler": FasterDiffusionSampler,
    "FasterDiffusionKSampler": FasterDiffusionKSampler,
    "FasterDiffusionCalibrate": FasterDiffusionCalibrate,
    "FasterDiffusionOnePass": FasterDiffusionOnePass,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FasterDiffusionApply": "FasterDiffusion Apply",
    "FasterDiffusionSampler": "FasterDiffusion Sampler",
    "FasterDiffusionKSampler": "FasterDiffusion KSampler",
    "FasterDiffusionCalibrate": "FasterDiffusion Calibrate",
    "FasterDiffusionOnePass": "FasterDiffusion One-Pass (TiUE)",
}
