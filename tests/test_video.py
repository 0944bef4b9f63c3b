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


def test_svd_video_linear_cfg_guidance_is_served_like_plain_cfg(pack, svd):
    """ComfyUI's VideoLinearCFGGuidance (a per-frame CFG ramp from min_cfg to cfg, a sampler_cfg_function) under or over
    FasterDiffusion Apply (the example workflow has it under): 'all' is the guided run bit for bit, the paper's key
    steps skip the encoder exactly as under plain CFG, and the ramp still shapes the run."""
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance
    guide = lambda model: VideoLinearCFGGuidance().patch(model, 1.0)[0]
    base, guided = sample(svd), sample(guide(svd))
    assert rel(guided, base) > 0.1, "the ramp (1.0 -> 2.5 over the frames) changes the run"
    assert torch.equal(sample(apply(pack, guide(svd), "all")[0]), guided)
    assert torch.equal(sample(guide(apply(pack, svd, "all")[0])), guided)
    plain, plain_config = apply(pack, svd, "paper")
    plain_out = sample(plain)
    stats = lambda config: {k: v for k, v in config.reports[-1].items() if k != "seconds"}
    assert (stats(plain_config)["encoder_calls"], stats(plain_config)["cached_calls"]) == (5, 3), stats(plain_config)
    fd, config = apply(pack, guide(svd), "paper")
    out = sample(fd)
    over = guide(apply(pack, svd, "paper")[0])        # ModelPatcher.clone copies the config: read the clone's
    over_out, over_config = sample(over), over.model_options["transformer_options"][pack.cu.KEY]
    assert stats(config) == stats(plain_config) == stats(over_config)
    assert torch.equal(over_out, out), "the guidance node's place around Apply does not matter"
    assert rel(out, guided) < rel(out, plain_out), "the run follows the guided run, not the plain one"
