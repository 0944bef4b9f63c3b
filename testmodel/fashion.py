"""The second trained test model: class-conditional Fashion-MNIST, SD1.5-shaped, 16x16 latent.

``fashion_unet.safetensors`` is ComfyUI's own ``UNetModel`` with an SD1.5-like shape (three resolution
levels, two res blocks per encoder level and three per decoder level, cross-attention on the upper two, as SD1.5 on
4 learned context tokens per class + a null set for CFG), trained by ``python -m testmodel.train_fashion``
on Fashion-MNIST (Debian package ``dataset-fashion-mnist``, MIT; ``tools/setup_test_host.sh`` installs it).
A "latent" is a 28x28 image padded to 32x32 and folded into 4 channels of 16x16 (space-to-depth).
Harder than the digits model: fewer steps visibly hurt, so it can tell FasterDiffusion from step reduction.

``fashion_classifier.safetensors`` is a small CNN trained on the real training set (its test accuracy is in
``fashion_train_log.json``); its 128-d penultimate features give the FID analogue (FD-fashion).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "fashion_unet.safetensors"
CLASSIFIER_WEIGHTS = HERE / "fashion_classifier.safetensors"
DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
NULL_CLASS = 10
CONTEXT_TOKENS = 4
CONTEXT_DIM = 128
LATENT_SIZE = 16          # latent 4 x 16 x 16  <->  image 32 x 32 (28 x 28 + a 2-pixel border)

FASHION_UNET_CONFIG = dict(
    image_size=LATENT_SIZE, in_channels=4, out_channels=4, model_channels=64,
    num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 2], transformer_depth=[1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1,   # as SD1.5: no attention at the lowest level (but in the middle block)
    context_dim=CONTEXT_DIM, use_linear_in_transformer=True, use_spatial_transformer=True,
    legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
    use_checkpoint=False, num_heads=4, num_head_channels=-1,
)


def fashion_model_config():
    import comfy.supported_models
    mc = comfy.supported_models.SD15(dict(FASHION_UNET_CONFIG))
    mc.unet_config.update(num_heads=4, num_head_channels=-1)   # SD15 would force 8 heads
    return mc


def load_fashion_model(path: Path = WEIGHTS, device=None, dtype=None):
    """(ModelPatcher, class_tokens[11, T, D]) of the trained Fashion-MNIST model (fp32 unless ``dtype``)."""
    import comfy.utils
    import testmodel as tm
    sd = comfy.utils.load_torch_file(str(path))
    tokens = sd.pop("cond.class_tokens").float()
    config = fashion_model_config()
    if dtype is not None:
        config.set_inference_dtype(dtype, None)
    return tm.build_model_patcher(config, {k: v.float() for k, v in sd.items()}, device=device), tokens


def fashion_dataset(split: str = "train"):
    """(images [N,28,28] float in [0,1], labels [N] int64) from the Debian package's idx files."""
    import numpy as np
    import torch
    prefix = "train" if split == "train" else "t10k"
    img_path, lbl_path = DATA_DIR / f"{prefix}-images-idx3-ubyte.gz", DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.is_file():
        raise FileNotFoundError(f"no Fashion-MNIST at {DATA_DIR}: `apt-get install dataset-fashion-mnist` "
                                "(tools/setup_test_host.sh does), or set FASHION_MNIST_DIR")
    with gzip.open(img_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(lbl_path) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def images_to_latents(images):
    """[N,28,28] in [0,1] -> model-space latents [N,4,16,16] in [-1,1] (pad to 32, space-to-depth)."""
    import torch.nn.functional as F
    return F.pixel_unshuffle(F.pad(images.unsqueeze(1) * 2 - 1, (2, 2, 2, 2), value=-1.0), 2)


def latents_to_images(latents):
    """Inverse of images_to_latents (model space), cropped to 28x28 and clamped to [0,1]."""
    import torch.nn.functional as F
    return ((F.pixel_shuffle(latents.float(), 2).squeeze(1)[:, 2:30, 2:30] + 1) / 2).clamp(0, 1)


def decode(latents):
    """ComfyUI latents (as a KSampler outputs them) -> images [N,28,28] in [0,1]."""
    import testmodel as tm
    return latents_to_images(latents * tm.LATENT_SCALE)


def conditioning(tokens, classes):
    """ComfyUI CONDITIONING for a list of class indices (one per batch row), and its null version."""
    import torch
    ctx = torch.stack([tokens[c] for c in classes])
    null = tokens[NULL_CLASS].unsqueeze(0).expand(len(classes), -1, -1).clone()
    return [[ctx, {}]], [[null, {}]]


def sample(model, tokens, classes, seed: int = 0, steps: int = 50, cfg: float = 3.0, sampler: str = "euler",
           scheduler: str = "normal", device="cpu", **kw):
    """One image per entry of ``classes`` through ComfyUI's ``comfy.sample.sample``; ComfyUI latents."""
    import torch
    import comfy.sample
    latent = torch.zeros(len(classes), 4, LATENT_SIZE, LATENT_SIZE)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = conditioning(tokens, classes)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                               seed=seed, disable_pbar=True, **kw)


def make_classifier():
    """A small CNN for 28x28 images: 2 conv stages, a 128-d feature layer, 10 logits."""
    import torch.nn as nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


_CLASSIFIER = None


def classifier():
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from safetensors.torch import load_file
        net = make_classifier()
        net.load_state_dict(load_file(str(CLASSIFIER_WEIGHTS)))
        _CLASSIFIER = net.eval().requires_grad_(False)
    return _CLASSIFIER


def features_and_logits(images, batch: int = 500):
    """(128-d features [N,128], logits [N,10]) of images [N,28,28] in [0,1], on the CPU."""
    import torch
    net, feats, logits = classifier(), [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            h = net[:-1](images[i:i + batch].detach().float().cpu().unsqueeze(1))
            feats.append(h)
            logits.append(net[-1](h))
    return torch.cat(feats), torch.cat(logits)


def classify(images):
    """Predicted class index for each [28,28] image in [0,1] (numpy)."""
    return features_and_logits(images)[1].argmax(1).numpy()


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (the FID formula)."""
    import numpy as np
    from scipy import linalg
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(ca @ cb, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean.real))


def save_grid(images, path, cols: int = 10, scale: int = 3):
    import testmodel as tm
    return tm.save_grid(images, path, cols=cols, scale=scale)
