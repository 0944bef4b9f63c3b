from .apply import FasterDiffusionApply
from .calibrate import FasterDiffusionCalibrate
from .sampler import FasterDiffusionKSampler, FasterDiffusionSampler

NODE_CLASS_MAPPINGS = {
    "FasterDiffusionApply": FasterDiffusionApply,
    "FasterDiffusionSampler": FasterDiffusionSampler,
    "FasterDiffusionKSampler": FasterDiffusionKSampler,
    "FasterDiffusionCalibrate": FasterDiffusionCalibrate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FasterDiffusionApply": "FasterDiffusion Apply",
    "FasterDiffusionSampler": "FasterDiffusion Sampler",
    "FasterDiffusionKSampler": "FasterDiffusion KSampler",
    "FasterDiffusionCalibrate": "FasterDiffusion Calibrate",
}
