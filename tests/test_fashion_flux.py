"""The committed Flux-shaped Fashion-MNIST test model (testmodel/fashion_flux.py): it is ComfyUI's own Flux, it was
trained with the flow convention ComfyUI samples it with, and ComfyUI's sampler draws recognisable classes from it."""
from __future__ import annotations

import pytest

from testmodel import fashion as fm
from testmodel import fashion_flux as ff

MIN_ACCURACY = 0.6      # 20 samples; the committed model scores far above (fashion_flux_train_log.json), chance 0.1


@pytest.fixture(scope="module")
def flux(comfy):
    if not fm.CLASSIFIER_WEIGHTS.is_file() or not ff.WEIGHTS.is_file():
        pytest.fail("testmodel/fashion_flux.safetensors or fashion_classifier.safetensors is missing")
    return ff.load_fashion_flux()


def test_is_comfyui_flux(flux):
    """ComfyUI's Flux class with 2 double + 8 single blocks, a 4-channel Flux latent, Flux's model sampling; < 10 MB."""
    import comfy.ldm.flux.model
    import comfy.model_sampling
    model, tokens, vectors = flux
    dm = model.model.diffusion_model
    assert type(dm) is comfy.ldm.flux.model.Flux
    assert (len(dm.double_blocks), len(dm.single_blocks)) == (2, 8) and not dm.params.guidance_embed
    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.ModelSamplingFlux)
    assert model.get_model_object("latent_format").latent_channels == ff.LATENT_CHANNELS
    assert tokens.shape == (11, ff.CONTEXT_TOKENS, ff.CONTEXT_DIM) and vectors.shape == (11, ff.VEC_DIM)
    assert ff.WEIGHTS.stat().st_size < 10e6


def test_training_convention_is_comfyuis(flux):
    """flow_loss trains the output that ComfyUI's CONST sampling denoises to the clean latent: a stand-in model that
    returns the one output with ``calculate_denoised(sigma, out, x_t) == x0`` (x0 known: a one-image data set) gets
    zero loss; the timestep it is given is ``ModelSamplingFlux.timestep(sigma)``."""
    import torch
    from testmodel.train_fashion_flux import flow_loss
    model, tokens, vectors = flux
    ms = model.get_model_object("model_sampling")
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []

    def ideal(x_t, timestep, context, y):
        sigma = timestep.view(-1, 1, 1, 1)
        out = (x_t - x0) / sigma
        seen.append((timestep, ms.calculate_denoised(timestep, out, x_t)))
        return out

    torch.manual_seed(0)
    loss = flow_loss(ideal, ms.sigmas.float(), tokens, vectors, x0, torch.tensor([3]), batch=16)
    timestep, denoised = seen[0]
    assert float(loss) < 1e-6
    torch.testing.assert_close(ms.timestep(timestep), timestep)
    torch.testing.assert_close(denoised, x0.expand(16, -1, -1, -1), atol=1e-3, rtol=0)
    assert float(timestep.min()) >= float(ms.sigma_min) and float(timestep.max()) <= float(ms.sigma_max)


def test_samples_are_recognisable(flux):
    """20 images (2 per class), ComfyUI's euler, 20 steps, CFG 3: the committed classifier names the class, and the
    decoded images have the real images' mean brightness."""
    import torch
    model, tokens, vectors = flux
    classes = [c for c in range(10) for _ in range(2)]
    with torch.no_grad():
        images = ff.decode(ff.sample(model, tokens, vectors, classes, seed=5, steps=20, cfg=3.0))
    assert images.shape == (20, 28, 28)
    real, _ = fm.fashion_dataset("test")
    assert abs(float(images.mean()) - float(real[:1000].mean())) < 0.05, "decoded images are not in the data's range"
    accuracy = float((fm.classify(images) == torch.tensor(classes).numpy()).mean())
    assert accuracy >= MIN_ACCURACY, f"class accuracy {accuracy:.0%} of the committed Flux model's samples"
