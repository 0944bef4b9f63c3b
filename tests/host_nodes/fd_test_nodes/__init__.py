"""Test-only ComfyUI nodes for the server test: the trained digits model and its conditioning.

No core node makes conditioning without a CLIP model, and the digits UNet is too small for ComfyUI's
checkpoint detection, so the server test loads them through these two nodes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))   # the repo root, for ``testmodel``
import testmodel as tm  # noqa: E402
import testmodel.fashion as fm  # noqa: E402
import testmodel.wan as tw  # noqa: E402


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
# VAEDecode to these; every other node, FasterDiffusion's included, runs as saved). The file name picks the model:
# a tiny random SDXL for an "xl" file, the Fashion-MNIST model for a "fashion" one, else the digits model.
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
        if "fashion" in ckpt_name.lower():
            model, tokens = fm.load_fashion_model()
            return model, _TextEncoder("fashion", tokens), tm.StandInVAE("fashion")
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
        g = torch.Generator().manual_seed(seed)
        if clip.kind == "sdxl":
            return ([[torch.randn(1, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g),
                      {"pooled_output": torch.randn(1, 1280, generator=g)}]],)
        if clip.kind == "flux":     # T5 tokens and CLIP-L's pooled output, in the stand-in Flux's widths
            context_dim, pooled_dim = flux_text_dims()
            return ([[torch.randn(1, FLUX_TEXT_TOKENS, context_dim, generator=g),
                      {"pooled_output": torch.randn(1, pooled_dim, generator=g)}]],)
        if clip.kind == "wan":      # umT5 tokens only, as the stand-in Wan takes them
            return ([[tw.text(seed), {}]],)
        if clip.kind == "fashion":  # the class the text names ("sneaker"), else as for digits
            return (fm.conditioning(clip.tokens, [fashion_class(text)])[0],)
        return (tm.digit_conditioning(clip.tokens, [text_digit(text)])[0],)


def text_digit(text: str) -> int:
    """The digit a prompt names (its first), else the sum of its bytes mod 10."""
    return next((int(c) for c in text if c.isdigit()), sum(text.encode()) % 10)


def fashion_class(text: str) -> int:
    """The Fashion-MNIST class a prompt names (the first of ``fm.CLASSES`` in it), else ``text_digit``."""
    lower = text.lower()
    named = [i for i, name in enumerate(fm.CLASSES) if name.lower() in lower]
    return named[0] if named else text_digit(text)


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


# Stand-in for UNETLoader ("Load Diffusion Model"), chosen by the file name: a tiny random Flux or Wan 2.1 T2V for a
# Flux or Wan file (their DualCLIPLoader / CLIPLoader and VAELoader stand-ins are at the end), else a committed TiUE
# student (tools/train_tiue.py) for the One-Pass example workflow: the Fashion-MNIST one for a "fashion" file, else the
# digits one (tests/test_browser.py rewrites UNETLoader to this).
class FDTestUNetLoader:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": ("STRING", {"default": "tiue_student_sd15.safetensors"}),
                             "weight_dtype": ("STRING", {"default": "default"})}}

    def load(self, unet_name, weight_dtype):
        name = unet_name.lower()
        if "flux" in name:
            return (flux_model(guidance_embed="schnell" not in name),)
        if "wan" in name:
            return (tw.wan21_t2v(),)
        if "fashion" in name:
            return (fm.load_fashion_model(tm.REPO / "testmodel" / "fashion_tiue_student.safetensors")[0],)
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


# Stand-ins for the separate text encoder and VAE loaders of the DiT example workflows (Flux: DualCLIPLoader, VAELoader
# ae; Wan 2.1: CLIPLoader type "wan", VAELoader wan_2.1_vae), for tests/test_browser.py: FDTestTextEncode gives the
# conditioning the tiny model of FDTestUNetLoader takes (Flux: T5 context [1, T, context_in_dim] + pooled_output
# [1, vec_in_dim]; Wan: umT5 context [1, T, text_dim]), the VAE decodes its 16-channel latents.
FLUX_BLOCKS = dict(depth=2, depth_single_blocks=3)   # double-stream, single-stream blocks of the stand-in Flux
FLUX_TEXT_TOKENS = 4
_FLUX_DIMS = []           # flux_text_dims, once read


def flux_model(guidance_embed: bool = True):
    """The stand-in Flux: Flux.1 dev embeds the FluxGuidance value (``guidance_embed``), schnell does not."""
    return tm.flux_tiny_model(guidance_embed=guidance_embed, **FLUX_BLOCKS)


def flux_text_dims() -> tuple:
    """(context_in_dim, vec_in_dim) of the stand-in Flux: the widths of its text tokens and pooled text, read from
    the model so that the conditioning always fits it."""
    if not _FLUX_DIMS:
        config = flux_model().model.model_config.unet_config
        _FLUX_DIMS.append((config["context_in_dim"], config["vec_in_dim"]))
    return _FLUX_DIMS[0]


class FDTestDualCLIPLoader:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name1": ("STRING", {"default": "t5xxl_fp16.safetensors"}),
                             "clip_name2": ("STRING", {"default": "clip_l.safetensors"}),
                             "type": ("STRING", {"default": "flux"})},
                "optional": {"device": ("STRING", {"default": "default"})}}

    def load(self, clip_name1, clip_name2, type, device="default"):
        return (_TextEncoder(type),)


class FDTestCLIPLoader:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": ("STRING", {"default": "umt5_xxl_fp8_e4m3fn_scaled.safetensors"}),
                             "type": ("STRING", {"default": "wan"})},
                "optional": {"device": ("STRING", {"default": "default"})}}

    def load(self, clip_name, type, device="default"):
        return (_TextEncoder(type),)


class _StandInLatentVAE(_StandInVideoVAE):
    """``decode`` of 16-channel latents: an image batch [B,16,h,w] -> [B,8h,8w,3] as the SVD stand-in; a video
    [B,16,T,h,w] (Wan, ``temporal`` 4) -> its 1 + 4(T-1) frames [B*(1+4(T-1)),8h,8w,3] as many as the Wan 2.1 VAE
    gives, each its own (interpolated in time between latent frames: an animated WEBP merges equal frames)."""

    def __init__(self, temporal: int = 1):
        self.temporal = temporal

    def decode(self, latents):
        import torch.nn.functional as F
        if latents.dim() == 5:
            b, c, t, h, w = latents.shape
            frames = F.interpolate(latents.float(), size=(1 + self.temporal * (t - 1), h, w), mode="trilinear",
                                   align_corners=True)
            latents = frames.movedim(2, 1).reshape(-1, c, h, w)
        return super().decode(latents)


class FDTestVAELoader:
    CATEGORY = "testing/faster_diffusion"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": ("STRING", {"default": "ae.safetensors"})}}

    def load(self, vae_name):
        return (_StandInLatentVAE(temporal=4 if "wan" in vae_name.lower() else 1),)


NODE_CLASS_MAPPINGS.update(FDTestDualCLIPLoader=FDTestDualCLIPLoader, FDTestCLIPLoader=FDTestCLIPLoader,
                           FDTestVAELoader=FDTestVAELoader)
