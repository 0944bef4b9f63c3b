"""Test-only ComfyUI nodes for the server test: the trained digits model and its conditioning.

No core node makes conditioning without a CLIP model, and the digits UNet is too small for ComfyUI's
checkpoint detection, so the server test loads them through these two nodes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))   # the repo root, for ``testmodel``
import testmodel as tm  # noqa: E402


class FDTestDigitsModel:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (tm.load_test_model()[0],)


class FDTestDigitsCond:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"digit": ("INT", {"default": 7, "min": 0, "max": 9})}}

    def encode(self, digit):
        _, tokens = tm.load_test_model()
        return tm.digit_conditioning(tokens, [digit])


NODE_CLASS_MAPPINGS = {"FDTestDigitsModel": FDTestDigitsModel, "FDTestDigitsCond": FDTestDigitsCond}
