"""The project's small trained test model and the helpers that run ComfyUI as a library.

``digits_unet.safetensors`` is a class-conditional UNet built from ComfyUI's own ``UNetModel``
(SD1.5 layout: input blocks, middle block, output blocks, cross-attention on context tokens),
trained by ``python -m testmodel.train`` on scikit-learn's handwritten digits.  A "latent" is a
16x16 digit image folded into 4 channels of 8x8 (space-to-depth), so it samples like an SD latent.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = Path(__file__).resolve().parent / "digits_unet.safetensors"
NULL_CLASS = 10          # the unconditional ("empty prompt") token set, for classifier-free guidance
CONTEXT_TOKENS = 4
CONTEXT_DIM = 64
LATENT_SIZE = 8          # latent 4 x 8 x 8  <->  image 1 x 16 x 16

DIGITS_UNET_CONFIG = dict(
    image_size=LATENT_SIZE, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2], transformer_depth=[1, 1, 1],
    transformer_depth_output=[1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
    context_dim=CONTEXT_DIM, use_linear_in_transformer=True, use_spatial_transformer=True,
    legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
    use_checkpoint=False, num_heads=4, num_head_channels=-1,
)


def comfy_dir() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or REPO / ".testhost" / "ComfyUI")


def boot_comfy(cpu: bool = True) -> Path:
    """Import ComfyUI as a library (CPU unless ``cpu=False``, PyTorch attention).  Safe to call again."""
    d = comfy_dir()
    if not (d / "comfy" / "samplers.py").is_file():
        raise RuntimeError(f"no ComfyUI at {d}: run tools/setup_test_host.sh (or set COMFYUI_PATH)")
    if "comfy.model_management" in sys.modules:
        return d
    sys.path.insert(0, str(d))
    import comfy.options
    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, [sys.argv[0], "--use-pytorch-cross-attention"] + (["--cpu"] if cpu else [])
    try:
        import comfy.cli_args  # noqa: F401  (parses the args above once)
    finally:
        sys.argv = argv
    import comfy.model_management  # noqa: F401
    # Import ComfyUI's own utils package now, as main.py does: nodes.py later puts comfy/ first on sys.path,
    # where comfy/utils.py would shadow it (and server.py, imported by some built-in nodes, needs it).
    import utils.install_util  # noqa: F401
    return d


def fan_in_init_(module, seed: int = 0):
    """ComfyUI's ops leave weights uninitialised: matrices ~ N(0, 1/fan_in), norm weights 1, biases 0."""
    import torch
    with torch.no_grad():
        g = None
        for name, p in module.named_parameters():
            if g is None:
                g = torch.Generator(device=p.device).manual_seed(seed)
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) / (p[0].numel() ** 0.5))
            elif name.endswith("weight"):     # the only 1-D weights in these UNets are norms
                p.fill_(1.0)
            else:
                p.zero_()
    return module


def build_model_patcher(model_config, state_dict=None, model_type=None, seed: int = 0, device=None):
    """A ComfyUI ModelPatcher around ``model_config`` (a comfy.supported_models class instance);
    random fan-in weights unless ``state_dict`` is given.  ``device`` builds the weights there."""
    import comfy.model_management as mm
    import comfy.model_patcher
    bm = (model_config.get_model({}, device=device) if model_type is None
          else _base_model(model_config, model_type))
    if state_dict is None:
        fan_in_init_(bm.diffusion_model, seed)
    else:
        bm.diffusion_model.load_state_dict(state_dict)
    bm.requires_grad_(False)      # inference only (ComfyUI's executor would run under inference_mode)
    return comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _base_model(model_config, model_type):
    import comfy.model_base
    cls = comfy.model_base.SDXL if model_config.unet_config.get("adm_in_channels") else comfy.model_base.BaseModel
    return cls(model_config, model_type=model_type)


def eps_loss(unet, sigmas, tokens, data, labels, batch: int, null_class: int, p_uncond: float):
    """One class-conditional epsilon-prediction loss on the SD noise schedule, exactly as ComfyUI samples it:
    a random batch of ``data`` (model-space latents), labels dropped to ``null_class`` with ``p_uncond`` (CFG)."""
    import torch
    device = data.device
    idx = torch.randint(0, len(data), (batch,), device=device)
    x0, y = data[idx], labels[idx].clone()
    y[torch.rand(batch, device=device) < p_uncond] = null_class
    t = torch.randint(0, 1000, (batch,), device=device)
    s = sigmas[t].view(-1, 1, 1, 1)
    eps = torch.randn_like(x0)
    x_in = (x0 + s * eps) / torch.sqrt(1 + s * s)          # ComfyUI's EPS calculate_input
    return torch.nn.functional.mse_loss(unet(x_in, t.float(), tokens[y]), eps)


def digits_model_config():
    import comfy.supported_models
    mc = comfy.supported_models.SD15(DIGITS_UNET_CONFIG)
    mc.unet_config.update(num_heads=4, num_head_channels=-1)   # SD15 would force 8 heads
    return mc


def load_test_model(path: Path = WEIGHTS):
    """(ModelPatcher, class_tokens[11, T, D]) of the trained digits model."""
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(path))
    tokens = sd.pop("cond.class_tokens")
    return build_model_patcher(digits_model_config(), sd), tokens


def digit_conditioning(tokens, digits):
    """ComfyUI CONDITIONING for a list of digits (one entry per batch row), and its null version."""
    import torch
    ctx = torch.stack([tokens[d] for d in digits])
    null = tokens[NULL_CLASS].unsqueeze(0).expand(len(digits), -1, -1).clone()
    return [[ctx, {}]], [[null, {}]]


def images_to_latents(images):
    """[N,16,16] in [0,1] -> model-space latents [N,4,8,8] in [-1,1] (space-to-depth)."""
    import torch.nn.functional as F
    return F.pixel_unshuffle(images.unsqueeze(1) * 2 - 1, 2)


def latents_to_images(latents):
    """Inverse of images_to_latents, clamped to [0,1]."""
    import torch.nn.functional as F
    return ((F.pixel_shuffle(latents.float(), 2).squeeze(1) + 1) / 2).clamp(0, 1)


def digits_dataset():
    """(images [N,16,16] in [0,1], labels [N]) from scikit-learn's bundled handwritten digits."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    x = F.interpolate(x.unsqueeze(1), size=16, mode="bilinear", align_corners=False).squeeze(1)
    return x.clamp(0, 1), torch.tensor(d.target)


_CLASSIFIER = None


def digit_classifier():
    """An SVM trained on the digits set (8x8); ~99% on held-out real digits."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC
        d = load_digits()
        _CLASSIFIER = SVC(gamma=0.001, C=10).fit(d.data, d.target)
    return _CLASSIFIER


def classify(images):
    """Predicted digit for each [16,16] image in [0,1]."""
    import torch.nn.functional as F
    small = F.avg_pool2d(images.detach().unsqueeze(1).float(), 2).squeeze(1) * 16.0
    return digit_classifier().predict(small.reshape(len(images), -1).numpy())


def save_grid(images, path, cols: int = 10, scale: int = 4):
    """Save [N,16,16] images in [0,1] as one PNG grid."""
    import numpy as np
    from PIL import Image
    imgs = images.detach().cpu().numpy()
    n, h, w = imgs.shape
    rows = (n + cols - 1) // cols
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), dtype=np.float32)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = im
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    img.save(path)
    return path


LATENT_SCALE = 0.18215   # SD1.5 latent format: ComfyUI multiplies latents by this going into the model


def sample_digits(model, tokens, digits, seed: int = 0, steps: int = 50, cfg: float = 3.0,
                  sampler: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
                  latent=None, noise=None, **kw):
    """Sample one image per entry of ``digits`` through ComfyUI's own ``comfy.sample.sample``.

    Returns ComfyUI latents (as a KSampler outputs them); ``decode`` turns them into images.
    """
    import torch
    import comfy.sample
    n = len(digits)
    if latent is None:
        latent = torch.zeros(n, 4, LATENT_SIZE, LATENT_SIZE)
    if noise is None:
        noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = digit_conditioning(tokens, digits)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                               denoise=denoise, seed=seed, disable_pbar=True, **kw)


def decode(latents):
    """ComfyUI latents of the digits model -> images [N,16,16] in [0,1]."""
    return latents_to_images(latents * LATENT_SCALE)


class StandInVAE:
    """Stands in for ComfyUI's VAE (``decode(latents) -> images [B,H,W,3]``): the digits or the Fashion-MNIST model's
    pixel-shuffle decoder (kind "digits", "fashion"), or a sigmoid of channel 0 for the random-weight models."""

    def __init__(self, kind: str = "digits"):
        self.kind = kind

    def decode(self, latents):
        import torch
        if self.kind == "fashion":
            from . import fashion
            gray = fashion.decode(latents)
        else:
            gray = decode(latents) if self.kind == "digits" else torch.sigmoid(latents[:, 0].float())
        return gray.unsqueeze(-1).repeat(1, 1, 1, 3)


def sdxl_tiny_model(seed: int = 0):
    """A random-weight SDXL-shaped model: ADM ``y`` (2816) through label_emb, linear transformers,
    no attention at the top level, as SDXL.  Conditioning needs ``pooled_output`` [B, 1280]."""
    import comfy.supported_models
    cfg = dict(image_size=LATENT_SIZE, in_channels=4, out_channels=4, model_channels=32,
               num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
               transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1, context_dim=CONTEXT_DIM,
               use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
               adm_in_channels=2816, num_classes="sequential", use_temporal_attention=False,
               use_temporal_resblock=False, use_checkpoint=False)
    mc = comfy.supported_models.SDXL(cfg)
    mc.unet_config.update(num_heads=2, num_head_channels=-1)
    return build_model_patcher(mc, seed=seed)


def svd_tiny_model(seed: int = 0):
    """A random-weight SVD-shaped (image-to-video) model: ComfyUI's ``UNetModel`` with temporal res blocks and
    temporal attention (``SVD_img2vid``), ADM ``y`` (768), the init latent concatenated (8 input channels).  Every
    latent of a batch is one frame of one video (``num_video_frames`` = the batch)."""
    import comfy.supported_models
    cfg = dict(image_size=LATENT_SIZE, in_channels=8, out_channels=4, model_channels=32,
               num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
               transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=CONTEXT_DIM,
               use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
               adm_in_channels=768, num_classes="sequential", use_temporal_attention=True,
               use_temporal_resblock=True, use_checkpoint=False, extra_ff_mix_layer=True, use_spatial_context=True,
               merge_strategy="learned_with_images", video_kernel_size=[3, 1, 1])
    mc = comfy.supported_models.SVD_img2vid(cfg)
    mc.unet_config.update(num_heads=2, num_head_channels=-1)
    return build_model_patcher(mc, seed=seed)


def vpred_tiny_model(seed: int = 0):
    """A random-weight v-prediction model (SD2.x-768 parametrisation) of the digits architecture."""
    import comfy.model_base
    return build_model_patcher(digits_model_config(), model_type=comfy.model_base.ModelType.V_PREDICTION, seed=seed)


PACK_DIR_NAME = "ComfyUI-FasterDiffusion"


_LOADED_PACK = []   # one copy of the pack per process: a second copy would re-register every node class


def load_pack(custom_nodes_dir):
    """Load this checkout into the booted ComfyUI exactly as ComfyUI does (custom_nodes/<pack> symlink,
    nodes.load_custom_node) and return (Apply node class, the pack's patches.comfy.unet module).  Loaded
    once per process: later calls (from another tool or test, with another directory) get the same copy."""
    import asyncio
    import nodes
    if _LOADED_PACK:
        return _LOADED_PACK[0]
    link = Path(custom_nodes_dir) / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    name = str(link).replace(".", "_x_")
    if name not in sys.modules and not asyncio.run(nodes.load_custom_node(str(link))):
        raise RuntimeError("ComfyUI failed to load the pack; see the log above")
    _LOADED_PACK.append((nodes.NODE_CLASS_MAPPINGS["FasterDiffusionApply"], sys.modules[name + ".patches.comfy.unet"]))
    return _LOADED_PACK[0]


def tool_session(cpu: bool = True):
    """What a measuring tool sets up: ComfyUI booted, quiet (logging below warnings, Python warnings and progress
    bars off; one CPU thread on the CPU) and the pack loaded.  Returns ``load_pack``'s (Apply class, patches.comfy.unet)."""
    import logging
    import tempfile
    import warnings
    boot_comfy(cpu=cpu)
    import torch
    import comfy.utils
    if cpu:
        torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    comfy.utils.set_progress_bar_enabled(False)
    return load_pack(tempfile.mkdtemp())


def digits_controlnet(seed: int = 0):
    """A random-weight SD-style ControlNet (comfy.cldm) for the digits UNet, as ComfyUI's CONTROL_NET.
    Its zero-convolutions are random too, so its residuals are strong: good for testing where they go.
    The hint image is [B, 64, 64, 3] (8x the 8x8 latent)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    cfg = {k: v for k, v in DIGITS_UNET_CONFIG.items() if k not in ("out_channels", "use_temporal_attention", "use_temporal_resblock")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.manual_cast, **cfg)
    fan_in_init_(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device())


def flux_tiny_model(seed: int = 0, depth: int = 1, depth_single_blocks: int = 1, guidance_embed: bool = False,
                    **params):
    """A random-weight tiny Flux (a DiT, not a UNet) from ComfyUI's own classes: ``depth`` double-stream and
    ``depth_single_blocks`` single-stream blocks, 16-channel latents, 64-dim text tokens, 768-dim pooled text;
    ``guidance_embed`` as Flux.1 dev (the FluxGuidance value is embedded); ``params`` override other FluxParams."""
    import dataclasses
    import comfy.ldm.flux.model
    import comfy.supported_models
    cfg = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768, context_in_dim=64,
               hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=depth, depth_single_blocks=depth_single_blocks,
               axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=guidance_embed)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:   # ComfyUI 0.33
        cfg["txt_ids_dims"] = []
    cfg.update(params)
    model = build_model_patcher(comfy.supported_models.Flux(cfg), seed=seed)
    unit_norm_scales_(model.model.diffusion_model)
    return model


def unit_norm_scales_(module):
    """Flux's RMSNorm weights are called ``scale`` on ComfyUI 0.3.75 (``weight`` on 0.33), which ``fan_in_init_``
    zeroes as biases: queries and keys would vanish, making attention uniform and position ids irrelevant."""
    import torch
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".scale") and p.dim() == 1:
                p.fill_(1.0)
    return module


def flux_tiny_controlnet(model, seed: int = 0):
    """A random-weight XLabs-style Flux ControlNet (comfy.ldm.flux.controlnet.ControlNetFlux: an image hint, 8x the
    latent's size, through its hint block) with the layout of ``model`` (a ``flux_tiny_model``), as ComfyUI's
    CONTROL_NET: its residuals go after every double block ("input") and every single block ("output")."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management as mm
    import comfy.ops
    cfg = dict(model.model.model_config.unet_config)
    cfg.pop("image_model", None)
    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.manual_cast, **cfg)
    unit_norm_scales_(fan_in_init_(net, seed))
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), extra_conds=["y", "guidance"])


def sd3_tiny_model(seed: int = 0):
    """A random-weight tiny SD3 (MMDiT): a transformer FasterDiffusion does not serve, which passes through."""
    import comfy.supported_models
    cfg = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, num_patches=64 * 64, pos_embed_max_size=64,
               adm_in_channels=32, pos_embed_scaling_factor=None, qk_norm=None, x_block_self_attn_layers=[],
               context_processor_layers=None,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}})
    return build_model_patcher(comfy.supported_models.SD3(cfg), seed=seed)


def digits_t2i_adapter(seed: int = 0):
    """A random-weight T2I-Adapter (comfy.t2i_adapter ``Adapter``) for the digits UNet, as ComfyUI's
    CONTROL_NET (comfy.controlnet.T2IAdapter).  Its three levels (32@8, 64@4, 64@2 for a 64x64 hint) are
    laid out for the digits UNet's six input blocks, and the last one also goes to the middle block, as
    SDXL adapters do: so it has encoder-side and decoder-side residuals."""
    import comfy.controlnet
    import comfy.model_management as mm
    from comfy.t2i_adapter.adapter import Adapter

    class DigitsAdapter(Adapter):
        def forward(self, x):
            f = super().forward(x)["input"]        # [x2, -, -, x1, -, -, x0, -, -] (SD1.5 layout)
            return {"input": [f[0], None, f[3], None, f[6], None], "middle": [f[0]]}

    net = DigitsAdapter(channels=[32, 64, 64], nums_rb=1, cin=3 * 64, ksize=1, sk=True, use_conv=False, xl=False)
    fan_in_init_(net, seed)
    return comfy.controlnet.T2IAdapter(net, net.input_channels, 8, "nearest-exact", device=mm.get_torch_device())


def digits_control_lora(seed: int = 0):
    """A random Control-LoRA (comfy.controlnet.ControlLora) for the digits UNet: its ControlNet is the UNet's
    own encoder (copied in pre_run) plus random hint block, zero convolutions and one LoRA pair."""
    import torch
    import comfy.controlnet
    sd = digits_controlnet(seed).control_model.state_dict()
    weights = {k: v for k, v in sd.items() if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    g = torch.Generator().manual_seed(seed + 1)
    weights["input_blocks.1.0.in_layers.2.up"] = torch.randn(32, 4, generator=g) / 4
    weights["input_blocks.1.0.in_layers.2.down"] = torch.randn(4, 32 * 9, generator=g) / 17
    return comfy.controlnet.ControlLora(weights)
