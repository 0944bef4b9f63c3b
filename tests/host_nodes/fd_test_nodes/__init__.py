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
        return {"required": {}, "optional": {"copy": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
            "Another number loads another copy: ComfyUI's output cache cannot hand back a model used before."})}}

    def load(self, copy=0):
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


# Stand-ins for a checkpoint's model, CLIP and VAE, so the shipped example workflows run on the test host
# with only the checkpoint swapped (tests/test_browser.py rewrites CheckpointLoaderSimple, CLIPTextEncode and
# VAEDecode to these; every other node, FasterDiffusion's included, runs as saved).
class _TextEncoder:
    def __init__(self, kind, tokens=None):
        self.kind, self.tokens = kind, tokens


class FDTestCheckpoint:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "v1-5-pruned-emaonly.safetensors"})}}

    def load(self, ckpt_name):
        if "xl" in ckpt_name.lower():
            return tm.sdxl_tiny_model(), _TextEncoder("sdxl"), tm.StandInVAE("sdxl")
        model, tokens = tm.load_test_model()
        return model, _TextEncoder("digits", tokens), tm.StandInVAE("digits")


class FDTestTextEncode:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}}

    def encode(self, clip, text):
        import torch
        seed = sum(text.encode()) % 10
        if clip.kind == "sdxl":
            g = torch.Generator().manual_seed(seed)
            return ([[torch.randn(1, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g),
                      {"pooled_output": torch.randn(1, 1280, generator=g)}]],)
        digit = next((int(c) for c in text if c.isdigit()), seed)
        return (tm.digit_conditioning(clip.tokens, [digit])[0],)


class FDTestVAEDecode:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    def decode(self, samples, vae):
        return (vae.decode(samples["samples"]),)


NODE_CLASS_MAPPINGS.update(FDTestCheckpoint=FDTestCheckpoint, FDTestTextEncode=FDTestTextEncode,
                           FDTestVAEDecode=FDTestVAEDecode)


# Stand-in for UNETLoader ("Load Diffusion Model"): the digits model's committed TiUE student (tools/train_tiue.py),
# for the One-Pass example workflow (tests/test_browser.py rewrites UNETLoader to this).
class FDTestUNetLoader:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": ("STRING", {"default": "tiue_student_sd15.safetensors"}),
                             "weight_dtype": ("STRING", {"default": "default"})}}

    def load(self, unet_name, weight_dtype):
        return (tm.load_test_model(tm.REPO / "testmodel" / "digits_tiue_student.safetensors")[0],)


NODE_CLASS_MAPPINGS.update(FDTestUNetLoader=FDTestUNetLoader)


# Stand-ins for an SVD checkpoint (ImageOnlyCheckpointLoader: MODEL, CLIP_VISION, VAE), for the image-to-video example
# workflow (tests/test_browser.py rewrites ImageOnlyCheckpointLoader to this): the tiny random-weight SVD model, and a
# CLIP vision model and VAE just good enough for ComfyUI's own SVD_img2vid_Conditioning and VAEDecode stand-in.
class _StandInClipVision:
    """``encode_image(image [B,H,W,3]).image_embeds``: [B, CONTEXT_DIM], a fixed projection of each image's mean colour
    (SVD_img2vid_Conditioning makes it the one cross-attention token)."""

    def encode_image(self, image, crop=True):
        import torch
        from types import SimpleNamespace
        proj = torch.randn(3, tm.CONTEXT_DIM, generator=torch.Generator().manual_seed(0))
        return SimpleNamespace(image_embeds=(image[..., :3].float().mean(dim=(1, 2)) * 2 - 1) @ proj)


class _StandInVideoVAE:
    """``encode(pixels [B,H,W,3])`` -> latents [B,4,H/8,W/8] (8x8 mean colour in [-1,1], and its grey);
    ``decode(latents [F,4,h,w])`` -> frames [F,8h,8w,3] (the sigmoid of the first three channels)."""

    def encode(self, pixels):
        import torch
        import torch.nn.functional as F
        rgb = F.avg_pool2d(pixels[..., :3].float().movedim(-1, 1) * 2 - 1, 8)
        return torch.cat([rgb, rgb.mean(dim=1, keepdim=True)], dim=1)

    def decode(self, latents):
        import torch
        import torch.nn.functional as F
        return F.interpolate(torch.sigmoid(latents[:, :3].float()), scale_factor=8, mode="nearest").movedim(1, -1)


class FDTestImageOnlyCheckpoint:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("MODEL", "CLIP_VISION", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "svd_xt.safetensors"})}}

    def load(self, ckpt_name):
        return tm.svd_tiny_model(), _StandInClipVision(), _StandInVideoVAE()


NODE_CLASS_MAPPINGS.update(FDTestImageOnlyCheckpoint=FDTestImageOnlyCheckpoint)
