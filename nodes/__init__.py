from .apply import FasterDiffusionApply

NODE_CLASS_MAPPINGS = {"FasterDiffusionApply": FasterDiffusionApply}
NODE_DISPLAY_NAME_MAPPINGS = {"FasterDiffusionApply": "FasterDiffusion Apply"}
