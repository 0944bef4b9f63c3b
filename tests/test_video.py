"""Video UNets in real ComfyUI: SVD-shaped image-to-video (ComfyUI's ``UNetModel`` with temporal res blocks and temporal
attention, ``SVD_img2vid``; frames folded into the batch, ``num_video_frames`` frames per video), a random-weight
tiny configuration built from ComfyUI's own classes (testmodel.svd_tiny_model)."""
from __future__ import annotations

import pytest
import torch

import testmodel as tm
from conftest import apply

FRAMES = 4
STEPS = 8


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def svd(comfy):
    return tm.svd_tiny_model()


def conditioning(seed=0):
    """SVD_img2vid_Conditioning's output for a stand-in init latent: cross_attn tokens, the init latent concatenated,
    fps / motion bucket / augmentation into the ADM vector."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(1, 4, tm.LATENT_SIZE, tm.LATENT_SIZE, generator=g)
    extra = {"concat_latent_image": init, "fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0}
    pos = [[torch.randn(1, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g), dict(extra)]]
    neg = [[torch.zeros(1, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM), dict(extra, concat_latent_image=torch.zeros_like(init))]]
    return pos, neg


def sample(model, steps=STEPS, sampler="euler"):
    import comfy.sample
    latent = torch.zeros(FRAMES, 4, tm.LATENT_SIZE, tm.LATENT_SIZE)
    pos, neg = conditioning()
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 3), steps, 2.5, sampler, "karras", pos, neg,
                               latent, seed=3, disable_pbar=True)


def test_svd_decoder_on_fresh_features_equals_the_host_forward_and_batches_exactly(pack, svd):
    unet = svd.model.diffusion_model
    adapter = pack.ldm.LdmUNetAdapter(unet)
    g = torch.Generator().manual_seed(2)
    rows = 2 * FRAMES                     # cond and uncond, each one video of FRAMES frames
    x = torch.randn(rows, 8, 8, 8, generator=g)
    ctx = torch.randn(rows, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g)
    y = torch.randn(rows, 768, generator=g)
    kwargs = {"num_video_frames": FRAMES, "time_context": torch.randn(rows, 2, tm.CONTEXT_DIM, generator=g)}
    t, t2 = torch.full((rows,), 600.0), torch.full((rows,), 250.0)
    call = lambda t: pack.ldm.make_call(x, t, ctx, y, None, {"sigmas": t}, dict(kwargs))
    with torch.no_grad():
        ref = unet(x, t, ctx, y, None, {}, **kwargs)
        c = call(t)
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        assert torch.equal(adapter.decode(c, feats, emb), ref)
        other = adapter.decode(call(t2), feats, adapter.embed(call(t2)))
        outs, widths = pack.runtime.decode_steps(adapter, c, feats, [(t, t), (t2, t2)], 0)
        assert widths == [2] and rel(outs[0], ref) < 1e-5 and rel(outs[1], other) < 1e-5, "two steps' videos in a batch"


def test_svd_is_served_all_is_identical_and_parallel_equals_sequential(pack, svd):
    base = sample(svd)
    allk, config = apply(pack, svd, "all")
    assert torch.equal(sample(allk), base)
    par, config = apply(pack, svd, "uniform:2")
    out = sample(par)
    r = config.reports[-1]
    assert (r["encoder_calls"], r["cached_calls"]) == (4, 4) and max(r["decoder_batches"]) == 2, r
    seq, _ = apply(pack, svd, "uniform:2", parallel=False)
    assert rel(sample(seq), out) < 1e-4
    assert torch.isfinite(out).all() and rel(out, base) < 0.5
