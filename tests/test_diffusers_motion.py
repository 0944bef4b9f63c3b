"""AnimateDiff in diffusers: the UNetMotionModel adapter (fasterdiffusion/diffusers/motion.py) and apply(pipe) inside
real diffusers 0.42.1 AnimateDiffPipeline / AnimateDiffSDXLPipeline (tiny random-weight pipelines,
tests/diffusers_tiny_motion.py; latents [videos, 4, frames, 8, 8] compared with output_type="latent")."""
from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import diffusers_tiny as dt  # noqa: E402
import diffusers_tiny_motion as dtm  # noqa: E402
from fasterdiffusion import diffusers as fdd  # noqa: E402
from fasterdiffusion.diffusers import motion  # noqa: E402
from fasterdiffusion.runtime import decode_steps  # noqa: E402
from diffusers_checks import rel, state_of, step_outputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")     # diffusers_checks.one_thread

STEPS = 20
F = dtm.FRAMES
KINDS = {"sd15": dtm.animatediff, "sdxl": dtm.animatediff_sdxl}


@functools.lru_cache(maxsize=None)
def pipeline(kind):
    return KINDS[kind]()


def sample(kind, pipe=None, **kw):
    return dtm.run(pipe or pipeline(kind), **{"steps": STEPS, **kw})


# ------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("kind", list(KINDS))
def test_all_and_remove_are_bit_identical(kind):
    pipe = pipeline(kind)
    base = sample(kind)
    before = state_of(pipe)
    handle = fdd.apply(pipe, "all")
    try:
        assert torch.equal(sample(kind), base)
    finally:
        handle.remove()
    assert state_of(pipe) == before and not hasattr(pipe.unet, "_diffusers_hook")
    assert torch.equal(sample(kind), base), "removal restores the pipeline exactly"
    (r,) = handle.reports
    assert r["full_calls"] == r["steps"] == STEPS and r["encoder_calls"] == r["cached_calls"] == 0


def unet_inputs(kind, videos=2, size=dt.LATENT, seed=1):
    """A call as the pipelines make it: [videos, 4, F, h, w], prompt embeddings repeated per frame (and SDXL's added
    conditioning per video)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(videos, 4, F, size, size, generator=g)
    if kind == "sdxl":
        kw = dict(encoder_hidden_states=torch.randn(videos, 16, 64, generator=g).repeat_interleave(F, 0),
                  added_cond_kwargs={"text_embeds": torch.randn(videos, 32, generator=g),
                                     "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * videos)})
    else:
        kw = dict(encoder_hidden_states=torch.randn(videos, 16, 32, generator=g).repeat_interleave(F, 0))
    return x, kw


@pytest.mark.parametrize("case", ["sd15", "sdxl", "odd_size", "freeu"])
def test_decoder_on_fresh_features_equals_the_forward(case):
    """encode + decode == the host forward bit for bit; two steps' calls in one decoder batch (and under a cap that
    puts each step in its own sub-batch, never splitting its frames) equal one call per step."""
    kind = "sdxl" if case == "sdxl" else "sd15"
    unet = pipeline(kind).unet
    if case == "freeu":
        unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)      # scales the middle output in place
    try:
        x, kw = unet_inputs(kind, size=6 if case == "odd_size" else dt.LATENT)
        adapter = motion.MotionUNetAdapter(unet)
        call = lambda t: motion.make_call(motion.forward_arguments(unet, (x, t), kw))
        t, t2 = torch.tensor(700), torch.tensor(300)
        with torch.no_grad():
            ref = unet(x, t, **kw).sample
            c = call(t)
            assert c.rows == 2 * F, "rows are frames"
            emb = adapter.embed(c)
            feats = adapter.encode(c, emb)
            kept = [s.clone() for s in feats.skips] + [feats.mid.clone()]
            assert torch.equal(adapter.decode(c, feats, emb), ref)
            assert torch.equal(adapter.decode(c, feats, emb), ref), "a second decode on the same features"
            assert all(torch.equal(a, b) for a, b in zip(kept, feats.skips + [feats.mid])), "features untouched"
            c2 = call(t2)
            other = adapter.decode(c2, feats, adapter.embed(c2))
            assert rel(other, ref) > 1e-3
            rows = [(c.timesteps, None), (c2.timesteps, None)]
            for cap, widths in ((0, [2]), (2 * F * 2, [2]), (2 * F * 2 - 1, [1, 1]), (1, [1, 1])):
                outs, got = decode_steps(adapter, c, feats, rows, max_decoder_batch=cap)
                assert got == widths and rel(outs[0], ref) < 1e-5 and rel(outs[1], other) < 1e-5, cap
    finally:
        unet.disable_freeu()


def test_the_motion_modules_mix_frames():
    """The stand-in is a real video model: a frame's output depends on the other frames (so a wrong frame layout in
    a batched call would show)."""
    unet = pipeline("sd15").unet
    x, kw = unet_inputs("sd15", videos=1)
    y = x.clone()
    y[:, :, -1] += 1.0
    with torch.no_grad():
        a, b = unet(x, 500, **kw).sample, unet(y, 500, **kw).sample
    assert rel(b[:, :, 0], a[:, :, 0]) > 1e-3


@pytest.mark.parametrize("kind", list(KINDS))
def test_key_steps_are_exact_and_non_key_steps_cached(kind, patch):
    """Sequential: every step up to the first non-key step is bit-identical to the unpatched pipeline (step 10, a key
    step with a group, comes from the split)."""
    pipe = pipeline(kind)
    runs = []
    for strategy in (None, "0,1,2,3,4,5,6,7,8,9,10,12,14,16,18"):
        if strategy:
            h = patch(pipe, strategy, parallel=False)
        outs, done = step_outputs(pipe)
        try:
            sample(kind)
        finally:
            done()
        runs.append(outs)
    base, fd = runs
    assert all(torch.equal(fd[i], base[i]) for i in range(11))
    assert not torch.equal(fd[11], base[11])
    assert (h.reports[-1]["encoder_calls"], h.reports[-1]["cached_calls"]) == (5, 5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_parallel_matches_sequential(kind, patch):
    """Parallel == sequential, uncapped and under max_decoder_batch in frames: CFG makes 2 videos x 4 frames = 8 rows
    a step, so the default 32 allows 4 steps a decoder call, and 16 allows 2."""
    pipe = pipeline(kind)
    seq_h = patch(pipe, "paper", parallel=False)
    seq = sample(kind)
    assert fdd.apply.__defaults__[2] == 32     # the default cap, 32 frames: 4 steps of 8 frames a call
    dflt_h = patch(pipe, "paper", parallel=True)
    dflt = sample(kind)
    par_h = patch(pipe, "paper", parallel=True, max_decoder_batch=0)
    par = sample(kind)
    cap_h = patch(pipe, "paper", parallel=True, max_decoder_batch=2 * 2 * F)
    capped = sample(kind)
    assert rel(par, seq) < 1e-4 and rel(capped, par) < 1e-5 and rel(dflt, par) < 1e-5
    assert dflt_h.reports[-1]["decoder_batches"] == [2, 4, 1, 4, 1, 4, 1]
    assert seq_h.reports[-1]["decoder_batches"] == [1, 1, 1, 1]
    assert par_h.reports[-1]["decoder_batches"] == [2, 5, 5, 5]
    assert cap_h.reports[-1]["decoder_batches"] == [2, 2, 2, 1, 2, 2, 1, 2, 2, 1]
    for h in (seq_h, dflt_h, par_h, cap_h):
        r = h.reports[-1]
        assert (r["full_calls"] + r["encoder_calls"], r["cached_calls"], r["steps"]) == (7, 13, STEPS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_forecast_parallel_equals_sequential(kind, patch):
    pipe = pipeline(kind)
    outs = []
    for parallel, cap in ((False, 32), (True, 0), (True, 2 * 2 * F)):
        h = patch(pipe, "uniform:3", parallel=parallel, max_decoder_batch=cap, propagation="forecast")
        outs.append(sample(kind))
        assert h.reports[-1]["propagation"] == "forecast (order 1)" and h.reports[-1]["cached_calls"] == 13
    assert rel(outs[1], outs[0]) < 1e-4 and rel(outs[2], outs[1]) < 1e-4
    patch(pipe, "uniform:3", propagation="reuse")
    assert rel(sample(kind), outs[1]) > 1e-4, "forecast is not reuse"


def test_each_video_of_a_batch_gets_what_it_gets_alone(patch):
    """Two prompts (with CFG: 4 videos of 4 frames a step, stacked over the group's steps in the decoder batch):
    each video equals its own run."""
    pipe = pipeline("sd15")
    patch(pipe, "paper")
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(2, 4, F, dt.LATENT, dt.LATENT, generator=g)
    both = sample("sd15", prompt=list(dt.PROMPTS[:2]), latents=latents)
    for i in range(2):
        alone = sample("sd15", prompt=dt.PROMPTS[i], latents=latents[i:i + 1])
        assert rel(both[i:i + 1], alone) < 1e-4, i


# --------------------------------------------------------------------------- FreeNoise, FreeInit, refusals

def test_free_noise_context_windows_are_served(patch):
    """FreeNoise's context windows run inside the motion modules' transformer blocks (one UNet call a step on all
    frames, rows independent): all == unpatched, parallel == sequential, non-key steps cached."""
    pipe = dtm.animatediff(seed=2)
    pipe.enable_free_noise(context_length=4, context_stride=2)
    kw = dict(num_frames=8, steps=12)
    base = dtm.run(pipe, **kw)
    patch(pipe, "all")
    assert torch.equal(dtm.run(pipe, **kw), base)
    outs = []
    for parallel in (False, True):
        h = patch(pipe, "uniform:4", parallel=parallel)
        outs.append(dtm.run(pipe, **kw))
        r = h.reports[-1]
        assert (r["encoder_calls"], r["cached_calls"], r.get("bypassed")) == (3, 9, None)
    assert rel(outs[1], outs[0]) < 1e-4 and torch.isfinite(outs[1]).all()
    pipe.disable_free_noise()
    assert rel(dtm.run(pipe, **kw), base) > 1e-3, "FreeNoise changed the result"


def test_free_init_iterations_after_the_first_run_in_full(patch):
    """FreeInit repeats the denoising loop: the first pass is planned and served, the repeats (past the schedule's
    end) run every call in full, counted as off-schedule."""
    pipe = dtm.animatediff(seed=3)
    pipe.enable_free_init(num_iters=2, use_fast_sampling=False)
    base = dtm.run(pipe, steps=10)
    patch(pipe, "all")
    assert torch.equal(dtm.run(pipe, steps=10), base)
    h = patch(pipe, "uniform:3")
    out = dtm.run(pipe, steps=10)
    r = h.reports[-1]
    # keys 0, 3, 6, 9 (9 alone in its group: the host forward); 20 UNet calls in all
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"], r["off_schedule_calls"]) == (3, 6, 11, 10)
    assert torch.isfinite(out).all()


def test_what_the_split_does_not_mirror_is_refused():
    unet = pipeline("sd15").unet
    x, kw = unet_inputs("sd15")
    a = lambda **more: motion.forward_arguments(unet, (x, 500), {**kw, **more})
    assert motion.unsupported_call_reason(unet, a()) is None
    assert motion.unsupported_call_reason(unet, a(cross_attention_kwargs={"scale": 0.5})) is None
    assert "ControlNet" in motion.unsupported_call_reason(unet, a(mid_block_additional_residual=torch.zeros(1)))
    assert "timestep_cond" in motion.unsupported_call_reason(unet, a(timestep_cond=torch.zeros(1)))
    assert "['foo']" in motion.unsupported_call_reason(unet, a(cross_attention_kwargs={"foo": 1}))
    assert "image_embeds" in motion.unsupported_call_reason(unet, a(added_cond_kwargs={"image_embeds": []}))
    assert "not [videos" in motion.unsupported_call_reason(unet, motion.forward_arguments(unet, (x[:, :, 0], 500), kw))
    sdxl = pipeline("sdxl").unet
    assert "text_embeds" in motion.unsupported_call_reason(sdxl, motion.forward_arguments(sdxl, (x, 500), kw))
    with pytest.raises(TypeError, match="UNet2DConditionModel is not diffusers' UNetMotionModel"):
        motion.MotionUNetAdapter(dt.unet())
    lcm = diffusers.UNetMotionModel.from_unet2d(dt.unet(time_cond_proj_dim=8), dtm.motion_adapter((8, 16, 16, 16)))
    assert "time_cond_proj_dim=8" in fdd.unsupported_unet_reason(lcm)
    assert fdd.adapter_class(unet) is motion.MotionUNetAdapter


def test_an_unknown_attention_processor_runs_in_full(patch):
    """An attention processor not known to treat rows independently: the run computes every call in full, with the
    reason, and gives the unpatched result."""
    pipe = dtm.animatediff(seed=4)
    processors = diffusers.models.attention_processor

    class CountingProcessor(processors.AttnProcessor2_0):
        pass
    pipe.unet.set_attn_processor(CountingProcessor())
    base = sample("sd15", pipe=pipe)
    h = patch(pipe, "paper")
    assert torch.equal(sample("sd15", pipe=pipe), base)
    r = h.reports[-1]
    assert "CountingProcessor" in r["bypassed"] and r["full_calls"] == STEPS and r["cached_calls"] == 0
