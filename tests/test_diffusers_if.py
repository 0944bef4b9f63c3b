"""DeepFloyd-IF in diffusers: apply(pipe) inside real diffusers 0.42.1 IFPipeline (stage I) and
IFSuperResolutionPipeline (stage II), tiny random-weight IF-shaped pipelines (tests/diffusers_tiny_if.py) with IF's own
scheduler (DDPM, learned-range variance); outputs compared with output_type="pt" (the raw denoised pixels).

What IF adds to the split: the text addition embedding (the attention-pooled prompt added to the time embedding),
stage II's noise-level class embedding, the T5 projection, AttnAddedKV attention and a learned variance (6 output
channels).  Every decoder step must get the full embedding, class and text parts included (the official code's
parallel path recomputes only the time part).
"""
from __future__ import annotations

import contextlib
import functools
from math import isqrt

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import diffusers_tiny_if as dti  # noqa: E402
from fasterdiffusion import diffusers as fdd  # noqa: E402
from fasterdiffusion.runtime import decode_steps  # noqa: E402
from fasterdiffusion.strategy import IF_PRESETS, make_plan  # noqa: E402
from diffusers_checks import rel, state_of, step_outputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")     # diffusers_checks.one_thread

STEPS = 20
BUILDERS = {1: dti.stage1, 2: dti.stage2}
SIZE = {1: dti.STAGE1, 2: dti.STAGE2}


@functools.lru_cache(maxsize=None)
def pipeline(stage):
    return BUILDERS[stage]()


def sample(stage, steps=STEPS, **kw):
    return dti.run(pipeline(stage), stage, steps, **kw)


@contextlib.contextmanager
def with_scheduler(pipe, scheduler):
    """``pipe`` with another scheduler inside the block (the pipelines are shared by the module's tests)."""
    original, pipe.scheduler = pipe.scheduler, scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def dpm_solver(pipe):
    """DPM-Solver++ with IF's schedule and learned-range variance (the paper's other IF sampler)."""
    return diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)


# ------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("stage", [1, 2])
def test_all_and_remove_are_bit_identical(stage):
    pipe = pipeline(stage)
    base = sample(stage)
    before = state_of(pipe)
    handle = fdd.apply(pipe, "all")
    try:
        assert torch.equal(sample(stage), base)
    finally:
        handle.remove()
    assert state_of(pipe) == before and not hasattr(pipe.unet, "_diffusers_hook")
    assert torch.equal(sample(stage), base), "removal restores the pipeline exactly"
    (r,) = handle.reports
    assert r["full_calls"] == r["steps"] == STEPS and r["encoder_calls"] == r["cached_calls"] == 0
    assert "bypassed" not in r


def unet_inputs(stage, batch=2, seed=1):
    """A call as the pipelines make it: raw T5-width prompt embeddings, stage II's noise level as class labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3 * stage, SIZE[stage], SIZE[stage], generator=g)
    kw = dict(encoder_hidden_states=torch.randn(batch, dti.TOKENS, dti.TEXT_DIM, generator=g))
    if stage == 2:
        kw["class_labels"] = torch.tensor([250, 100])[:batch]
    return x, kw


def time_only_embedding(unet, call):
    """What the official parallel path gives a decoder: the time embedding alone (no class, no text part)."""
    stand_in = torch.empty((call.rows, 0))
    return unet.time_embedding(unet.get_time_embed(sample=stand_in, timestep=call.timesteps), None)


@pytest.mark.parametrize("stage", [1, 2])
def test_decoder_on_fresh_features_equals_the_forward(stage):
    """Bit for bit, with the learned variance's 6 channels; the class (noise level) and text parts of the embedding
    are non-trivial in these models and reach the decoder; batched over steps equals one call per step."""
    pipe = pipeline(stage)
    unet = pipe.unet
    x, kw = unet_inputs(stage)
    t, t2 = torch.tensor(700), torch.tensor([300, 300])
    adapter = fdd.DiffusersUNetAdapter(unet)
    call = lambda t, kw: fdd.make_call(fdd.forward_arguments(unet, (x, t), kw))
    with torch.no_grad():
        ref = unet(x, t, **kw).sample
        assert ref.shape[1] == 6
        c = call(t, kw)
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        assert torch.equal(adapter.decode(c, feats, emb), ref)
        # the official parallel path's embedding (time only) would change the output: the test models can tell
        assert rel(adapter.decode(c, feats, time_only_embedding(unet, c)), ref) > 1e-3
        if stage == 2:      # the noise level alone changes the decoder's output
            other = call(t, {**kw, "class_labels": torch.tensor([20, 20])})
            assert rel(adapter.decode(other, feats, adapter.embed(other)), ref) > 1e-3
        c2 = call(t2, kw)
        other_t = adapter.decode(c2, feats, adapter.embed(c2))
        assert rel(other_t, ref) > 1e-3
        outs, widths = decode_steps(adapter, c, feats, [(c.timesteps, None), (c2.timesteps, None)], max_decoder_batch=0)
        assert widths == [2] and rel(outs[0], ref) < 1e-5 and rel(outs[1], other_t) < 1e-5


@pytest.mark.parametrize("stage", [1, 2])
def test_key_steps_are_exact_and_non_key_steps_cached(stage, patch):
    """Sequential: every step up to the first non-key step is bit-identical to the unpatched pipeline, the key
    step of a group included."""
    pipe = pipeline(stage)
    runs = []
    for strategy in (None, "0,1,2,3,4,5,6,7,8,9,10,12,14,16,18"):
        if strategy:
            h = patch(pipe, strategy, parallel=False)
        outs, done = step_outputs(pipe)
        try:
            sample(stage)
        finally:
            done()
        runs.append(outs)
    base, fd = runs
    assert all(o.shape[1] == 6 for o in fd), "every step's output carries the learned variance"
    assert all(torch.equal(fd[i], base[i]) for i in range(11)), "steps 0-10 (10: a key step with a group)"
    assert not torch.equal(fd[11], base[11])
    assert h.reports[-1]["encoder_calls"] == 5 and h.reports[-1]["cached_calls"] == 5


# --------------------------------------------------------------------------- presets, parallel, forecast

@pytest.mark.parametrize("stage,preset,steps,batches", [
    (1, "if1", 100, [5] * 15),        # keys 10, 15, ..., 80 lead groups of 5; 0-9 and 85-99 run alone
    (2, "if2", 50, [2] * 10),         # keys 20, 22, ..., 38 lead groups of 2
    (2, "if3", 75, None),
    (1, "if1", 50, None),             # moved to 50 steps
])
def test_presets_run_the_encoder_on_their_keys_and_parallel_matches_sequential(stage, preset, steps, batches, patch):
    pipe = pipeline(stage)
    plan = make_plan(preset, steps)
    outs, reports = [], []
    for parallel, cap in ((False, 32), (True, 32), (True, 4)):     # CFG: 2 rows a step -> 2 steps a capped call
        h = patch(pipe, preset, parallel=parallel, max_decoder_batch=cap)
        outs.append(sample(stage, steps))
        reports.append(h.reports[-1])
    seq, par, capped = outs
    assert rel(par, seq) < 1e-4 and rel(capped, par) < 1e-4      # batching's float noise, through up to 100 steps
    for r in reports:
        assert r["steps"] == steps and r["keys"] == list(plan.keys) and "bypassed" not in r
        assert r["full_calls"] + r["encoder_calls"] == len(plan.keys) and r["cached_calls"] == steps - len(plan.keys)
        assert r["off_schedule_calls"] == r["fallback_calls"] == 0
    widths = [w for w in plan.group_sizes if w > 1]
    assert reports[1]["decoder_batches"] == widths and reports[0]["decoder_batches"] == [1] * len(widths)
    assert batches is None or widths == batches
    assert all(w <= 2 for w in reports[2]["decoder_batches"])


@pytest.mark.parametrize("stage", [1, 2])
def test_ddpm_learned_range_reuses_features_and_says_why(stage, patch):
    """IF's own scheduler (DDPM, learned-range variance) draws fresh noise every step: a forecast asked for runs as
    reuse, and the report says so; the learned variance of the non-key decoders drives the step."""
    pipe = pipeline(stage)
    assert isinstance(pipe.scheduler, diffusers.DDPMScheduler) and pipe.scheduler.config.variance_type == "learned_range"
    reused = patch(pipe, "uniform:3", propagation="reuse")
    plain = sample(stage)
    h = patch(pipe, "uniform:3", propagation="forecast")
    out = sample(stage)
    r = h.reports[-1]
    assert r["propagation"] == "reuse" and "DDPMScheduler adds fresh noise every step" in r["forecast_off"]
    assert torch.equal(out, plain) and reused.reports[-1]["cached_calls"] == r["cached_calls"] == 13
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("stage,schedule", [(1, "fast27_timesteps"), (2, "smart27_timesteps")])
def test_custom_timesteps_plan_on_their_own_count(stage, schedule, patch):
    """IF's recommended short schedules (``timesteps=``): the run plans the preset on the 27 steps the loop takes."""
    from diffusers.pipelines import deepfloyd_if
    timesteps = getattr(deepfloyd_if, schedule)
    base = sample(stage, timesteps=timesteps)
    patch(pipeline(stage), "all")
    assert torch.equal(sample(stage, timesteps=timesteps), base)
    h = patch(pipeline(stage), f"if{stage}")
    sample(stage, timesteps=timesteps)
    r, plan = h.reports[-1], make_plan(f"if{stage}", 27)
    assert r["steps"] == 27 and r["keys"] == list(plan.keys) and r["cached_calls"] == 27 - len(plan.keys) > 0
    assert r["off_schedule_calls"] == r["fallback_calls"] == 0


@pytest.mark.parametrize("stage", [1, 2])
def test_forecast_parallel_equals_sequential(stage, patch):
    """With DPM-Solver++ (learned-range variance, 20 steps) the forecast is on: parallel equals sequential and the
    capped batch, forecast is not reuse, and 'all' stays the unpatched result."""
    pipe = pipeline(stage)
    with with_scheduler(pipe, dpm_solver(pipe)):
        base = sample(stage)
        patch(pipe, "all", propagation="forecast")
        assert torch.equal(sample(stage), base)
        outs = []
        for parallel, cap in ((False, 32), (True, 32), (True, 4)):
            h = patch(pipe, "uniform:3", parallel=parallel, max_decoder_batch=cap, propagation="forecast")
            outs.append(sample(stage))
            assert h.reports[-1]["propagation"] == "forecast (order 1)" and "forecast_off" not in h.reports[-1]
        patch(pipe, "uniform:3", propagation="reuse")
        reused = sample(stage)
    assert rel(outs[1], outs[0]) < 1e-4 and rel(outs[2], outs[1]) < 1e-5
    assert rel(reused, outs[1]) > 1e-4, "forecast is not reuse"


# ------------------------------------------------------------------------------------------- presets

def official_keys(rule, steps):
    """The keys the official pipelines' group loops (utils_if.py register_if1/if2/if3) run the encoder on: a group
    starts at a step and takes the following steps while ``rule`` says they are not key steps."""
    keys, step = [], 0
    while step < steps:
        keys.append(step)
        step += 1
        while not rule(step) and step < steps:
            step += 1
    return keys


def test_presets_at_their_native_step_counts_are_the_official_lists():
    assert make_plan("if1", 100).keys == tuple(official_keys(lambda i: i > 85 or i < 10 or i % 5 == 0, 100))
    assert make_plan("if2", 50).keys == tuple(official_keys(lambda i: i < 20 or i > 40 or i % 2 == 0, 50))
    assert make_plan("if3", 75).keys == tuple(official_keys(lambda i: isqrt(9 + 8 * i) ** 2 == 9 + 8 * i, 75))
    assert make_plan("if3", 75).keys == tuple(75 - t for t in (75, 73, 70, 66, 61, 55, 48, 40, 31, 21, 10)), \
        "stage III: the paper's set {75,73,...,10} in 0-based indices"
    assert [len(make_plan(p, IF_PRESETS[p][0]).keys) for p in ("if1", "if2", "if3")] == [40, 40, 11]


def test_if_pipelines_other_than_the_two_are_refused():
    pipe = pipeline(1)
    before = state_of(pipe)
    parts = {k: v for k, v in pipe.components.items()}
    with pytest.raises(TypeError, match="IFImg2ImgPipeline is not a supported pipeline"):
        fdd.apply(diffusers.IFImg2ImgPipeline(**parts))
    assert state_of(pipe) == before
