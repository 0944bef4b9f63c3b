from .apply import FasterDiffusionApply
from .sampler import FasterDiffusionKSampler, FasterDiffusionSampler

NODE_CLASS_MAPPINGS = {
    "FasterDiffusionApply": FasterDiffusionApply,
    "FasterDiffusionSampler": FasterDiffusionSampler,
    "FasterDiffusionKSampler": FasterDiffusionKSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FasterDiffusionApply": "FasterDiffusion Apply",
    "FasterDiffusionSampler": "FasterDiffusion Sampler",
    "FasterDiffusionKSampler": "FasterDiffusion KSampler",
}
