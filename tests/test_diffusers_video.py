"""Video pipelines in diffusers 0.42.1: Stable Video Diffusion (``UNetSpatioTemporalConditionModel``), ModelScope /
VideoFusion text-to-video (``UNet3DConditionModel``) and Text2Video-Zero (``UNet2DConditionModel`` under cross-frame
attention, its loop run in three parts on two schedulers).  Tiny random-weight pipelines (tests/diffusers_tiny_video.py),
8 steps, 3 frames, CFG; latents compared with output_type="latent".
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402
from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (  # noqa: E402
    CrossFrameAttnProcessor, CrossFrameAttnProcessor2_0)

import diffusers_tiny as dt  # noqa: E402
import diffusers_tiny_video as dv  # noqa: E402
from diffusers_checks import rel  # noqa: E402
from fasterdiffusion import diffusers as fdd  # noqa: E402
from fasterdiffusion.runtime import decode_steps, format_report  # noqa: E402

STEPS = 8
F = dv.FRAMES
ROWS = 2 * F                    # frame rows of one step's call with CFG (Text2Video-Zero's first frame alone: 2)
# Text2Video-Zero at 8 steps with t0=3, t1=5: the first frame alone at steps 0-1, then 2-3; every frame at 2-7
ZERO_CALLS = 2 + 2 + 6


@pytest.fixture(scope="module", autouse=True)
def quiet_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the deprecated text-to-video pipelines say so at every call
        yield
    torch.set_num_threads(n)


KINDS = {
    "svd": (dv.svd, dv.run_svd),
    "t2v": (dv.t2v, dv.run_t2v),
    "t2v_zero": (dv.t2v_zero, dv.run_t2v_zero),
    "t2v_zero_dpm": (functools.partial(dv.t2v_zero, sched="DPMSolverMultistepScheduler"), dv.run_t2v_zero),
}


@functools.lru_cache(maxsize=None)
def pipeline(kind):
    return KINDS[kind][0]()


def sample(kind, **kw):
    return KINDS[kind][1](pipeline(kind), **{"steps": STEPS, **kw})


def state_of(pipe):
    """What apply() may touch and remove() must restore (Text2Video-Zero replaces its scheduler with a copy at every
    call, patched or not: its class and instance attributes are compared, not its identity)."""
    components = {k: (type(v), id(v) if k != "scheduler" else None) for k, v in pipe.components.items()}
    return (type(pipe), type(pipe).__call__, components, sorted(vars(pipe.unet)), sorted(vars(pipe.scheduler)),
            pipe.unet.forward.__func__, {type(p) for p in pipe.unet.attn_processors.values()})


def calls(kind):
    return ZERO_CALLS if kind.startswith("t2v_zero") else STEPS


# ------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("kind", list(KINDS))
def test_all_and_remove_are_bit_identical(kind):
    """t2v_zero_dpm: a multistep scheduler, whose state the Text2Video-Zero loop's scheduler copy carries."""
    pipe = pipeline(kind)
    base = sample(kind)
    before = state_of(pipe)
    handle = fdd.apply(pipe, "all")
    try:
        assert torch.equal(sample(kind), base)
        assert "step" not in vars(pipe.scheduler), "nothing of the call left on the scheduler it ends with"
    finally:
        handle.remove()
    assert state_of(pipe) == before and not hasattr(pipe.unet, "_diffusers_hook")
    assert torch.equal(sample(kind), base), "removal restores the pipeline exactly"
    (r,) = handle.reports
    assert (r["steps"], r["full_calls"], r["encoder_calls"], r["cached_calls"]) == (STEPS, calls(kind), 0, 0)
    assert r["off_schedule_calls"] == 0 and "bypassed" not in r


def svd_inputs(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, F, 8, size, size, generator=g)
    return x, dict(encoder_hidden_states=torch.randn(2, 1, 32, generator=g),
                   added_time_ids=torch.tensor([[6.0, 127.0, 0.02], [6.0, 127.0, 0.02]]))


def t2v_inputs(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, F, size, size, generator=g), dict(encoder_hidden_states=torch.randn(2, 16, 32, generator=g))


DECODER_CASES = {
    "svd": (dv.svd_unet, fdd.SpatioTemporalUNetAdapter, svd_inputs, dt.LATENT, 1.5, 0.4),
    "svd_odd_size": (dv.svd_unet, fdd.SpatioTemporalUNetAdapter, svd_inputs, 5, 1.5, 0.4),    # upsample sizes forwarded
    "t2v": (dv.t2v_unet, fdd.UNet3DAdapter, t2v_inputs, dt.LATENT, 700, 300),
    "t2v_odd_size": (dv.t2v_unet, fdd.UNet3DAdapter, t2v_inputs, 6, 700, 300),
}


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_on_fresh_features_equals_the_forward(case):
    """The split's encoder + decoder is the forward bit for bit; the decoder at another timestep differs; several
    steps' decoders batched (split under a cap that is no multiple of a step's frame rows) equal one call per
    step, and no sub-batch holds part of a step."""
    build, adapter_class, inputs, size, t1, t2 = DECODER_CASES[case]
    unet = build(seed=3)
    adapter = adapter_class(unet)
    x, kw = inputs(size)
    call = lambda t: adapter.make_call(adapter.arguments((x, torch.tensor(t)), kw))
    with torch.no_grad():
        ref = unet(x, torch.tensor(t1), **kw).sample
        c = call(t1)
        assert c.rows == 2 * F, "one row per frame"
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        kept = [s.clone() for s in feats.skips] + [feats.mid.clone()]
        assert torch.equal(adapter.decode(c, feats, emb), ref)
        assert torch.equal(adapter.decode(c, feats, emb), ref), "a second decode on the same features"
        assert all(torch.equal(a, b) for a, b in zip(kept, feats.skips + [feats.mid])), "features untouched"
        c2 = call(t2)
        other = adapter.decode(c2, feats, adapter.embed(c2))
        assert rel(other, ref) > 1e-3
        rows = [(c.timesteps, None), (c2.timesteps, None), (c.timesteps, None)]
        for cap, widths in ((0, [3]), (2 * ROWS + ROWS - 1, [2, 1]), (ROWS - 1, [1, 1, 1])):
            outs, got = decode_steps(adapter, c, feats, rows, max_decoder_batch=cap)
            assert got == widths and [o.shape for o in outs] == [ref.shape] * 3
            assert rel(outs[0], ref) < 1e-5 and rel(outs[1], other) < 1e-5 and rel(outs[2], ref) < 1e-5, cap


def test_cross_frame_attention_batched_equals_sequential():
    """Text2Video-Zero's processors split a call's rows into ``batch_size`` videos of consecutive frames.  Steps
    stacked step-major keep each step's videos whole, so a batched decoder call, run with ``batch_size`` times the
    steps, equals one call per step; with the processors' own ``batch_size`` it would not (a video would span
    steps).  The processors are allowed by name, and left as they were."""
    unet = dt.unet("sd15", seed=3)
    adapter = fdd.DiffusersUNetAdapter(unet)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2 * F, 4, dt.LATENT, dt.LATENT, generator=g)                  # [uncond frames | cond frames]
    ctx = torch.randn(2, 16, 32, generator=g).repeat_interleave(F, dim=0)
    timesteps = (torch.tensor(800), torch.tensor(500), torch.tensor(200))
    for processor in (CrossFrameAttnProcessor(batch_size=2), CrossFrameAttnProcessor2_0(batch_size=2)):
        unet.set_attn_processor(processor)
        assert fdd.unsupported_processor_reason(unet) is None
        with torch.no_grad():
            calls = [fdd.make_call(fdd.forward_arguments(unet, (x, t, ctx))) for t in timesteps]
            feats = adapter.encode(calls[0], adapter.embed(calls[0]))
            own = [adapter.decode(c, feats, adapter.embed(c)) for c in calls]
            assert torch.equal(own[0], unet(x, timesteps[0], ctx).sample)
            outs, widths = decode_steps(adapter, calls[0], feats, [(c.timesteps, None) for c in calls], 0)
            assert widths == [3] and all(rel(o, r) < 1e-5 for o, r in zip(outs, own))
            big = adapter.tile(calls[0], 3, torch.cat([c.timesteps for c in calls]), None)
            unscaled = adapter._decode(big, feats.tile(3), adapter.embed(big)).chunk(3)
            assert rel(unscaled[1], own[1]) > 1e-3, "the processors' own batch_size groups frames across steps"
        assert processor.batch_size == 2
    unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())


@pytest.mark.parametrize("kind", ["svd", "t2v", "t2v_zero"])
def test_key_steps_are_exact_and_non_key_steps_cached(kind, patch):
    """Sequential: every step up to the first non-key step is bit-identical to the unpatched pipeline (key step 4,
    whose group holds step 5, included); step 5 is served from step 4's features.  Text2Video-Zero's steps are
    seen through its callback (latents after each step of each part)."""
    pipe = pipeline(kind)
    runs = []
    for strategy in (None, "0,1,2,3,4,6"):
        if strategy:
            h = patch(pipe, strategy, parallel=False)
        outs = []
        if kind == "t2v_zero":
            sample(kind, callback=lambda i, t, latents: outs.append(latents.clone()))
        else:
            original = pipe.scheduler.step
            vars(pipe.scheduler)["step"] = functools.wraps(original)(
                lambda out, *a, **k: (outs.append(out.clone()), original(out, *a, **k))[1])
            try:
                sample(kind)
            finally:
                vars(pipe.scheduler).pop("step")
        runs.append(outs)
    base, fd = runs
    first_served = 2 + 2 + 3 if kind == "t2v_zero" else 5      # Text2Video-Zero: the first frame's 2 + 2 steps first
    assert len(fd) == len(base) == calls(kind)
    assert all(torch.equal(fd[i], base[i]) for i in range(first_served))
    assert not torch.equal(fd[first_served], base[first_served])
    r = h.reports[-1]
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (2, 2, calls(kind) - 4)
    assert r["off_schedule_calls"] == r["fallback_calls"] == 0


# ---------------------------------------------------------------------------- parallel, counts, forecast

# paper keys at 8 steps: 0, 1, 2, 3, 5 -> groups [3, 4] and [5, 6, 7] batch their decoders; uncapped, under a cap
# of 3 steps' frame rows less one, under one step's frame rows
BATCHES = {"svd": ([2, 3], [2, 2, 1], [1] * 5), "t2v": ([2, 3], [2, 2, 1], [1] * 5),
           # first the first frame's group [3, 4] in its second part (2 rows a step: two steps fit every cap here)
           "t2v_zero": ([2, 2, 3], [2, 2, 2, 1], [2] + [1] * 5)}


@pytest.mark.parametrize("kind", ["svd", "t2v", "t2v_zero"])
def test_parallel_matches_sequential(kind, patch):
    """Batched decoders equal sequential ones, uncapped and split under a cap of 2 steps' frames plus one row less
    than a step (so a step's frames never straddle two sub-batches, and the split is exact)."""
    pipe = pipeline(kind)
    seq_h = patch(pipe, "paper", parallel=False)
    seq = sample(kind)
    par_h = patch(pipe, "paper", parallel=True)
    par = sample(kind)
    cap_h = patch(pipe, "paper", parallel=True, max_decoder_batch=3 * ROWS - 1)
    capped = sample(kind)
    one_h = patch(pipe, "paper", parallel=True, max_decoder_batch=ROWS - 1)      # under one step's frames: 1 a call
    one = sample(kind)
    assert rel(par, seq) < 1e-4 and rel(capped, par) < 1e-5 and rel(one, seq) < 1e-4
    assert [h.reports[-1]["decoder_batches"] for h in (par_h, cap_h, one_h)] == list(BATCHES[kind])
    for h in (seq_h, par_h, cap_h):
        r = h.reports[-1]
        assert r["off_schedule_calls"] == r["fallback_calls"] == 0 and "parallel_off" not in r


@pytest.mark.parametrize("kind", ["svd", "t2v", "t2v_zero"])
def test_encoder_passes_are_counted_per_step(kind, patch):
    """uniform:2 at 8 steps: keys 0, 2, 4, 6, each with one served step.  Text2Video-Zero: the first frame's parts
    (steps 0-1, then 2-3) and the video's (steps 2-7) are call slots of their own, each placed on its steps."""
    h = patch(pipeline(kind), "uniform:2")
    sample(kind)
    r = h.reports[-1]
    keys = 5 if kind == "t2v_zero" else 4                 # t2v_zero: 0 | 2 | 2, 4, 6
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (keys, keys, 0)
    assert r["keys"] == [0, 2, 4, 6] and r["decoder_batches"] == [2] * keys
    assert f"encoder ran {keys}x and was skipped {keys}x" in format_report(r)


@pytest.mark.parametrize("kind", ["svd", "t2v", "t2v_zero"])
def test_forecast_parallel_equals_sequential(kind, patch):
    pipe = pipeline(kind)
    base = sample(kind)
    patch(pipe, "all", propagation="forecast")
    assert torch.equal(sample(kind), base)
    outs = []
    for parallel, cap in ((False, 32), (True, 0), (True, 3 * ROWS - 1)):
        h = patch(pipe, "uniform:3", parallel=parallel, max_decoder_batch=cap, propagation="forecast")
        outs.append(sample(kind))
        assert h.reports[-1]["propagation"] == "forecast (order 1)" and "forecast_off" not in h.reports[-1]
    assert rel(outs[1], outs[0]) < 1e-4 and rel(outs[2], outs[1]) < 1e-5
    patch(pipe, "uniform:3", propagation="reuse")
    assert rel(sample(kind), outs[1]) > 1e-4, "forecast is not reuse"


# ------------------------------------------------------------------------------- glue, refusals

def test_text2video_zero_scheduler_copy_keeps_its_own_state(patch):
    """Text2Video-Zero deep-copies its scheduler after the first part and steps the copy from there in the last:
    the copy steps itself (a multistep scheduler's history included) from the copy's loop position, and is left
    clean.  Forecast and batching run on it as on the others."""
    pipe = pipeline("t2v_zero_dpm")
    base = sample("t2v_zero_dpm")
    seq_h = patch(pipe, "uniform:2", parallel=False)
    seq = sample("t2v_zero_dpm")
    par_h = patch(pipe, "uniform:2", parallel=True)
    par = sample("t2v_zero_dpm")
    assert rel(par, seq) < 1e-4 and rel(par, base) > 1e-4
    for h in (seq_h, par_h):
        r = h.reports[-1]
        assert (r["encoder_calls"], r["cached_calls"], r["off_schedule_calls"], r["fallback_calls"]) == (5, 5, 0, 0)
    assert "step" not in vars(pipe.scheduler)


def test_schedule_sigmas_are_the_schedulers_own_where_it_has_them():
    """SVD's Euler timesteps are 0.25 log sigma: the run's sigma records are the scheduler's sigmas, not
    ``alphas_cumprod`` read at those timesteps; DDIM (no sigmas) keeps the alphas_cumprod ones."""
    sched = diffusers.EulerDiscreteScheduler(**dv.SVD_SCHEDULER)
    sched.set_timesteps(STEPS)
    ts = sched.timesteps.tolist()
    assert fdd.schedule_sigmas(sched, ts[2:], 2) == [float(s) for s in sched.sigmas[2:].double()]
    assert fdd.schedule_sigmas(sched, ts)[0] == pytest.approx(700.0, rel=1e-5)
    ddim = dt.scheduler("DDIMScheduler")
    ddim.set_timesteps(STEPS)
    a = float(ddim.alphas_cumprod[int(ddim.timesteps[0])])
    assert fdd.schedule_sigmas(ddim, ddim.timesteps.tolist())[0] == pytest.approx(((1 - a) / a) ** 0.5)


def test_what_the_video_splits_do_not_mirror_is_named(patch):
    unet3d = dv.t2v_unet()
    adapter = fdd.UNet3DAdapter(unet3d)
    a = lambda **kw: {**adapter.arguments((torch.zeros(1, 4, F, 8, 8), 1, torch.zeros(1, 16, 32)), {}), **kw}
    assert adapter.call_reason(a()) is None
    assert "ControlNet" in adapter.call_reason(a(mid_block_additional_residual=torch.zeros(1)))
    assert "timestep_cond" in adapter.call_reason(a(timestep_cond=torch.zeros(1)))
    assert "attention_mask" in adapter.call_reason(a(attention_mask=torch.ones(1, 16)))
    assert "['foo']" in adapter.call_reason(a(cross_attention_kwargs={"foo": 1}))

    class MyUNet(diffusers.UNetSpatioTemporalConditionModel):
        pass
    with pytest.raises(TypeError, match="MyUNet is not diffusers' UNetSpatioTemporalConditionModel"):
        fdd.SpatioTemporalUNetAdapter(MyUNet(**dv.SVD_UNET))
    with pytest.raises(TypeError, match="MyUNet is not one of the UNet classes"):
        fdd.apply(diffusers.StableVideoDiffusionPipeline(**{**pipeline("svd").components, "unet": MyUNet(**dv.SVD_UNET)}))
    # a call the split cannot serve: the whole run in full, with the reason
    pipe = pipeline("t2v")
    base = sample("t2v", cross_attention_kwargs={"foo": 1.0})
    h = patch(pipe, "paper")
    assert torch.equal(sample("t2v", cross_attention_kwargs={"foo": 1.0}), base)
    assert "['foo']" in h.reports[-1]["bypassed"] and h.reports[-1]["full_calls"] == STEPS
