"""The diffusers host: the UNet2DConditionModel adapter and apply(pipe) inside real diffusers 0.42.1 pipelines.

Tiny random-weight SD1.5-shaped and SDXL-shaped UNets, SD + ControlNet, img2img (tests/diffusers_tiny.py),
and the trained digits model converted from ComfyUI's layout.  Latents are compared with output_type="latent".
"""
from __future__ import annotations

import functools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import diffusers_tiny as dt  # noqa: E402
from diffusers_checks import rel, state_of, step_outputs  # noqa: E402
from fasterdiffusion import diffusers as fdd  # noqa: E402
from fasterdiffusion.runtime import Run, decode_steps  # noqa: E402
from fasterdiffusion.settings import Settings  # noqa: E402
from fasterdiffusion.strategy import make_plan, parse_strategy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")     # diffusers_checks.one_thread

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
PAPER_20 = [2, 5, 5, 5]          # decoder batches of the paper's keys 0,1,2,3,5,10,15 at 20 steps


KINDS = {
    "sd15": (dt.sd15, {}),
    "sdxl": (dt.sdxl, {}),
    "controlnet": (dt.controlnet, {"image": dt.control_image()}),
    "sd15_img2img": (functools.partial(dt.sd15, img2img=True), {"image": dt.init_image(), "strength": 0.6}),
    "sdxl_img2img": (functools.partial(dt.sdxl, img2img=True), {"image": dt.init_image(), "strength": 0.6}),
    "controlnet_img2img": (functools.partial(dt.controlnet, img2img=True),
                           {"image": dt.init_image(), "control_image": dt.control_image(), "strength": 0.6}),
}


@functools.lru_cache(maxsize=None)
def pipeline(kind):
    return KINDS[kind][0]()


def sample(kind, pipe=None, **kw):
    return dt.run(pipe or pipeline(kind), **{"steps": STEPS, **KINDS[kind][1], **kw})


# ------------------------------------------------------------------------------------ install, import

def test_import_fasterdiffusion_imports_no_host():
    code = ("import sys, fasterdiffusion, fasterdiffusion.runtime;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'comfy')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_wheel_holds_only_the_engine_package(tmp_path):
    """pip builds the repository root into a wheel of the fasterdiffusion package alone (the ComfyUI pack's
    __init__.py, nodes/, patches/ stay out), with the diffusers extra and no torch requirement."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.endswith((".png", ".safetensors")):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO / f).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fasterdiffusion", "faster_diffusion-0.1.0.dist-info"}
    assert {"fasterdiffusion/diffusers/__init__.py", "fasterdiffusion/diffusers/unet.py", "fasterdiffusion/ldm.py",
            "fasterdiffusion/runtime.py"} <= set(names)
    meta = zipfile.ZipFile(wheel).read("faster_diffusion-0.1.0.dist-info/METADATA").decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist")]
    assert requires and all("extra == \"diffusers\"" in line for line in requires), requires
    assert not any("torch" in line for line in requires) and "Provides-Extra: diffusers" in meta


# ------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("kind", list(KINDS))
def test_all_and_remove_are_bit_identical(kind):
    pipe = pipeline(kind)
    base = sample(kind)
    before = state_of(pipe)
    handle = fdd.apply(pipe, "all")
    try:
        assert type(pipe).__name__ == before[0].__name__ and isinstance(pipe, before[0])
        assert torch.equal(sample(kind), base)
    finally:
        handle.remove()
    assert state_of(pipe) == before and not hasattr(pipe.unet, "_diffusers_hook")
    assert torch.equal(sample(kind), base), "removal restores the pipeline exactly"
    (r,) = handle.reports
    assert r["full_calls"] == r["steps"] and r["encoder_calls"] == r["cached_calls"] == 0
    assert r["steps"] == (12 if "img2img" in kind else STEPS)        # strength 0.6: the last 12 of 20 steps


def unet_inputs(kind, batch=2, size=dt.LATENT, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    if kind == "sdxl":
        kw = dict(encoder_hidden_states=torch.randn(batch, 16, 64, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g),
                                     "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * batch)})
    else:
        kw = dict(encoder_hidden_states=torch.randn(batch, 16, 32, generator=g))
    return x, kw


@pytest.mark.parametrize("case", ["sd15", "sdxl", "odd_size", "masks", "controlnet", "freeu"])
def test_decoder_on_fresh_features_equals_the_forward(case):
    unet = dt.unet("sdxl" if case == "sdxl" else "sd15", seed=3)
    if case == "freeu":
        unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)      # scales the middle output in place
    x, kw = unet_inputs("sdxl" if case == "sdxl" else "sd15", size=6 if case == "odd_size" else dt.LATENT)
    if case == "masks":
        kw["encoder_attention_mask"] = (torch.rand(2, 16, generator=torch.Generator().manual_seed(5)) > 0.3).float()
    t, t2 = torch.tensor(700), torch.tensor([300, 300])
    if case == "controlnet":
        cn = dt.controlnet_model(seed=3)
        control = lambda t: dict(zip(("down_block_additional_residuals", "mid_block_additional_residual"),
                                     cn(x, t, kw["encoder_hidden_states"], dt.control_image(batch=2),
                                        return_dict=False)))
        kw2 = {**kw, **control(t2)}
        kw = {**kw, **control(t)}
    else:
        kw2 = kw
    adapter = fdd.DiffusersUNetAdapter(unet)
    call = lambda t, kw: fdd.make_call(fdd.forward_arguments(unet, (x, t), kw))
    with torch.no_grad():
        ref = unet(x, t, **kw).sample
        c = call(t, kw)
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        kept = [s.clone() for s in feats.skips] + [feats.mid.clone()]
        assert torch.equal(adapter.decode(c, feats, emb), ref)
        assert torch.equal(adapter.decode(c, feats, emb), ref), "a second decode on the same features"
        assert all(torch.equal(a, b) for a, b in zip(kept, feats.skips + [feats.mid])), "features untouched"
        # the decoder at another timestep (and that step's ControlNet residuals) differs ...
        c2 = call(t2, kw2)
        other = adapter.decode(c2, feats, adapter.embed(c2))
        assert rel(other, ref) > 1e-3
        if case == "controlnet":
            assert adapter.own_step_reason(c) and not adapter.own_step_reason(adapter.tile(c, 2, t2, None))
            mixed = adapter.decode(call(t2, kw), feats, adapter.embed(c2))     # t2 with t's residuals
            assert rel(mixed, other) > 1e-3, "each step's own residuals reach its decoder"
            return
        # ... and batched over steps equals one call per step
        outs, widths = decode_steps(adapter, c, feats, [(c.timesteps, None), (t2, None)], max_decoder_batch=0)
        assert widths == [2] and rel(outs[0], ref) < 1e-5 and rel(outs[1], other) < 1e-5


def test_diffusers_adapter_keeps_the_runtime_contract():
    """The runtime contract suite's simulated sampler (tests/test_runtime_contract.py) on a real
    UNet2DConditionModel through this adapter: every non-key output equals the decoder on its own key
    step's features at its own timestep; off-schedule calls run in full."""
    from test_runtime_contract import check_log, schedule, simulate
    unet = dt.unet("sd15", seed=4)
    adapter = fdd.DiffusersUNetAdapter(unet)
    ctx = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    sigmas, timesteps = schedule(8, 3)

    def ours(call):
        if isinstance(call.host, fdd.DiffusersCall):
            return call
        c = fdd.make_call(fdd.forward_arguments(unet, (call.x, call.timesteps), {"encoder_hidden_states": ctx[:call.rows]}),
                          call.slot)
        return c

    class Wrapped:    # the contract's ModelCall -> this adapter's own call, as the glue builds it
        embed = lambda self, call: adapter.embed(ours(call))
        encode = lambda self, call, emb: adapter.encode(ours(call), emb)
        decode = lambda self, call, f, emb: adapter.decode(ours(call), f, emb)
        tile = lambda self, call, n, t, s: adapter.tile(ours(call), n, t, s)
        own_step_reason = lambda self, call: None

    full = lambda call: unet(call.x, call.timesteps, ctx[:call.rows]).sample

    def reference(key_call, call):
        k, c = ours(key_call), ours(call)
        return adapter.decode(c, adapter.encode(k, adapter.embed(k)), adapter.embed(c))

    with torch.no_grad():
        for parallel, cap in ((True, 0), (True, 4), (False, 0)):
            run = Run(Settings(parse_strategy("0,1,4"), parallel, cap, propagation="reuse"), sigmas, timesteps)
            log = simulate(run, Wrapped(), full, sigmas, timesteps, lambda: torch.randn(2, 4, 8, 8, generator=g),
                           [("cond", "uncond")], passes=1, corrector=False, midpoints=True)
            check_log(run, log, reference, full)
            assert run.finish()["cached_calls"] == 5 * 2


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "controlnet"])
def test_key_steps_are_exact_and_non_key_steps_cached(kind, patch):
    """Sequential: every step up to the first non-key step is bit-identical to the unpatched pipeline, the
    key step of a group included (its output comes from the split, not from the host forward)."""
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
    assert all(torch.equal(fd[i], base[i]) for i in range(11)), "steps 0-10 (10: a key step with a group)"
    assert not torch.equal(fd[11], base[11])
    assert h.reports[-1]["encoder_calls"] == 5 and h.reports[-1]["cached_calls"] == 5


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_parallel_matches_sequential(kind, patch):
    pipe = pipeline(kind)
    seq_h = patch(pipe, "paper", parallel=False)
    seq = sample(kind)
    par_h = patch(pipe, "paper", parallel=True)
    par = sample(kind)
    cap_h = patch(pipe, "paper", parallel=True, max_decoder_batch=4)     # CFG: 2 rows a step -> 2 steps a call
    capped = sample(kind)
    assert rel(par, seq) < 1e-4 and rel(capped, par) < 1e-5
    assert par_h.reports[-1]["decoder_batches"] == PAPER_20
    assert cap_h.reports[-1]["decoder_batches"] == [2, 2, 2, 1, 2, 2, 1, 2, 2, 1]
    assert seq_h.reports[-1]["decoder_batches"] == [1, 1, 1, 1]
    for h in (seq_h, par_h):
        r = h.reports[-1]
        assert (r["full_calls"] + r["encoder_calls"], r["cached_calls"], r["steps"]) == (7, 13, STEPS)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_forecast_parallel_equals_sequential(kind, patch):
    """apply(pipe) forecasts by default: parallel equals sequential and the capped batch, the stats say forecast,
    ancestral Euler reuses (with its reason), and 'all' stays the unpatched result."""
    pipe = pipeline(kind)
    base = sample(kind)
    patch(pipe, "all", propagation="forecast")
    assert torch.equal(sample(kind), base)
    outs, handles = [], []
    for parallel, cap in ((False, 32), (True, 32), (True, 4)):
        handles.append(patch(pipe, "uniform:3", parallel=parallel, max_decoder_batch=cap, propagation="forecast"))
        outs.append(sample(kind))
        assert handles[-1].reports[-1]["propagation"] == "forecast (order 1)"
    assert rel(outs[1], outs[0]) < 1e-4 and rel(outs[2], outs[1]) < 1e-5
    patch(pipe, "uniform:3", propagation="reuse")
    assert rel(sample(kind), outs[1]) > 1e-4, "forecast is not reuse"
    original = pipe.scheduler
    try:
        pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        h = patch(pipe, "uniform:3", propagation="forecast")
        sample(kind)
    finally:
        pipe.scheduler = original                        # the pipeline is shared by the module's tests
    assert h.reports[-1]["propagation"] == "reuse" and "EulerAncestral" in h.reports[-1]["forecast_off"]


@pytest.mark.parametrize("parallel", [False, True])
def test_non_key_output_does_not_depend_on_the_latent(parallel, patch):
    """Shift the latent before step 6 (inside the group of key step 5): steps 6-9 get exactly the outputs
    they get without the shift; key step 10 sees it."""
    pipe = pipeline("sd15")
    patch(pipe, "paper", parallel=parallel)
    runs = []
    for shift in (0.0, 1.0):
        def callback(p, i, t, kw, shift=shift):
            return {"latents": kw["latents"] + shift} if i == 5 else {}
        outs, done = step_outputs(pipe)
        try:
            sample("sd15", callback_on_step_end=callback)
        finally:
            done()
        runs.append(outs)
    plain, shifted = runs
    assert all(torch.equal(plain[i], shifted[i]) for i in range(10)), "steps 0-9 ignore the shifted latent"
    assert rel(shifted[10], plain[10]) > 1e-3, "the next key step sees it"


def test_batch_invariance(patch):
    """A prompt in a batch of three (and with num_images_per_prompt=2) gives what it gives alone."""
    pipe = pipeline("sd15")
    patch(pipe, "paper")
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(4, 4, dt.LATENT, dt.LATENT, generator=g)
    batch = sample("sd15", prompt=list(dt.PROMPTS), latents=latents[:3])
    for i, prompt in enumerate(dt.PROMPTS):
        alone = sample("sd15", prompt=prompt, latents=latents[i:i + 1])
        assert rel(batch[i:i + 1], alone) < 1e-4, i
    twice = sample("sd15", prompt=list(dt.PROMPTS[:2]), num_images_per_prompt=2, latents=latents)   # p0 p0 p1 p1
    assert rel(twice[3:4], sample("sd15", prompt=dt.PROMPTS[1], latents=latents[3:4])) < 1e-4
    assert rel(twice[0:1], batch[0:1]) < 1e-4


# ------------------------------------------------------------------------------- schedulers, placement

@pytest.mark.parametrize("name", dt.SCHEDULERS)
def test_every_scheduler_runs_with_the_expected_passes(name, patch):
    pipe = pipeline("sd15")
    original = pipe.scheduler
    try:
        pipe.scheduler = dt.scheduler(name)
        base = sample("sd15", steps=10)
        patch(pipe, "all")
        pipe.scheduler = dt.scheduler(name)         # swapped in after apply: picked up at the next call
        assert torch.equal(sample("sd15", steps=10), base)
        h = patch(pipe, "paper")
        out = sample("sd15", steps=10)
        pipe.scheduler.set_timesteps(10)
        steps = len(pipe.scheduler.timesteps)      # PNDM's PLMS: 11 evaluations for 10 steps
    finally:
        pipe.scheduler = original
    plan = make_plan("paper", steps)
    r = h.reports[-1]
    assert r["steps"] == steps and r["keys"] == list(plan.keys)
    assert r["full_calls"] + r["encoder_calls"] == len(plan.keys) and r["cached_calls"] == steps - len(plan.keys)
    assert r["off_schedule_calls"] == r["fallback_calls"] == 0 and "bypassed" not in r
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_pndm_repeated_timestep_is_placed_by_position(patch):
    """PLMS evaluates timestep 801 at steps 1 and 2: with keys 0,2 step 1 is served from step 0's features
    and step 2 runs the encoder (placement by value would take step 2 for step 1)."""
    pipe = pipeline("sd15")
    original = pipe.scheduler
    try:
        pipe.scheduler = dt.scheduler("PNDMScheduler")
        pipe.scheduler.set_timesteps(10)
        ts = pipe.scheduler.timesteps.tolist()
        assert ts[1] == ts[2]
        reports = []
        for parallel in (False, True):
            h = patch(pipe, "0,2", parallel=parallel)
            reports.append((sample("sd15", steps=10), h.reports[-1]))
    finally:
        pipe.scheduler = original
    (seq, r), (par, _) = reports
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"], r["off_schedule_calls"]) == (2, 9, 0, 0)
    assert rel(par, seq) < 1e-4


def test_an_unexpected_call_runs_in_full(patch):
    """A UNet call made from a step-end callback at the step just taken is off the schedule: the plain forward."""
    pipe = pipeline("sd15")
    h = patch(pipe, "paper")
    seen = {}

    def callback(p, i, t, kw):
        if i == 5:
            x = torch.cat([kw["latents"]] * 2)
            emb = kw["prompt_embeds"]
            seen["out"] = p.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
            with torch.no_grad():
                seen["ref"] = diffusers.UNet2DConditionModel.forward(p.unet, x, t, encoder_hidden_states=emb).sample
        return {}
    sample("sd15", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert torch.equal(seen["out"], seen["ref"])
    r = h.reports[-1]
    # the extra call opened step 6's evaluation, so step 6's own call is a second pass there: in full too
    assert (r["off_schedule_calls"], r["fallback_calls"], r["cached_calls"]) == (1, 1, 12)


def test_changed_prompt_embeddings_are_never_served_stale(patch):
    """A callback that swaps the prompt embeddings inside a group: the rest of that group runs in full."""
    pipe = pipeline("sd15")
    h = patch(pipe, "paper", parallel=True)
    other = None

    def callback(p, i, t, kw):
        return {"prompt_embeds": other} if i == 5 and other is not None else {}
    inputs = ["latents", "prompt_embeds"]
    plain = sample("sd15", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    embeds = pipe.encode_prompt(dt.PROMPTS[1], "cpu", 1, True)
    other = torch.cat([embeds[1], embeds[0]])
    swapped = sample("sd15", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    r = h.reports[-1]
    assert r["fallback_calls"] == 4 and r["cached_calls"] == 13 - 4     # steps 6-9; key 10 caches the new prompt
    assert rel(swapped, plain) > 1e-3


@pytest.mark.parametrize("kind,name,strength", [
    ("sd15_img2img", "EulerDiscreteScheduler", 0.5),    # the scheduler has a begin index
    ("sd15_img2img", "DDIMScheduler", 0.5),             # no begin index: from pipe.num_timesteps
    ("sd15_img2img", "PNDMScheduler", 0.9),             # the loop starts at the second of PLMS's repeated pair
    ("sdxl_img2img", "EulerDiscreteScheduler", 0.5)])
def test_strength_plans_on_the_remaining_steps(kind, name, strength, patch):
    pipe = pipeline(kind)
    original = pipe.scheduler
    try:
        pipe.scheduler = dt.scheduler(name)
        base = sample(kind, strength=strength)
        patch(pipe, "all")
        assert torch.equal(sample(kind, strength=strength), base)
        h = patch(pipe, "paper")
        sample(kind, strength=strength)
        pipe.scheduler.set_timesteps(STEPS)
        ts = pipe.scheduler.timesteps.tolist()
        begin = STEPS - int(STEPS * strength)
        remaining = len(ts) - begin
    finally:
        pipe.scheduler = original
    if name == "PNDMScheduler":
        assert begin == 2 and ts[1] == ts[2]
    plan = make_plan("paper", remaining)          # the paper's keys cut at the remaining steps
    r = h.reports[-1]
    assert r["steps"] == remaining and r["keys"] == list(plan.keys) and r["off_schedule_calls"] == 0
    assert r["cached_calls"] == remaining - len(plan.keys) and r["fallback_calls"] == 0


def test_sdxl_base_and_refiner_split(patch):
    """denoising_end on the base (DDIM: no begin index, the loop is cut at the end) and denoising_start on
    img2img: each call plans on the steps its loop takes; strategy all stays bit-identical."""
    base_pipe, refiner = pipeline("sdxl"), pipeline("sdxl_img2img")
    originals = base_pipe.scheduler, refiner.scheduler
    results = []
    try:
        for pipe, kind, kw in ((base_pipe, "sdxl", {"denoising_end": 0.6}),
                               (refiner, "sdxl_img2img", {"denoising_start": 0.6, "strength": 0.3})):
            pipe.scheduler = dt.scheduler("DDIMScheduler")
            plain = sample(kind, **kw)
            patch(pipe, "all")
            same = sample(kind, **kw)
            h = patch(pipe, "paper")
            sample(kind, **kw)
            results.append((plain, same, h.reports[-1]))
    finally:
        base_pipe.scheduler, refiner.scheduler = originals
    for (plain, same, r), steps in zip(results, (12, 8)):      # 20 DDIM steps cut at t >= 400, resp. from t < 400
        assert torch.equal(same, plain)
        assert r["steps"] == steps and r["keys"] == list(make_plan("paper", steps).keys)
        assert r["off_schedule_calls"] == 0 and r["cached_calls"] == steps - len(r["keys"])


def test_lora_scale_is_applied_as_the_forward_does(patch):
    """With PEFT LoRA layers and cross_attention_kwargs={"scale": 0.3}: the split scales the LoRA layers as
    the forward's decorator does (sequential key steps bit-identical).  Needs peft (not in the test host)."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    pipe = dt.sd15(seed=5)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    kw = {"cross_attention_kwargs": {"scale": 0.3}}
    runs = []
    for strategy in (None, "0,1,2,3,4,5,6,7,8,9,10,12,14,16,18"):
        if strategy:
            patch(pipe, strategy, parallel=False)
        outs, done = step_outputs(pipe)
        try:
            sample("sd15", pipe=pipe, **kw)
        finally:
            done()
        runs.append(outs)
    assert all(torch.equal(runs[1][i], runs[0][i]) for i in range(11))
    assert rel(sample("sd15", pipe=pipe), sample("sd15", pipe=pipe, **kw)) > 1e-3, "the scale matters"


def test_guidance_scale_one_and_guidance_rescale(patch):
    pipe = pipeline("sd15")
    base1 = sample("sd15", guidance_scale=1.0)
    h = patch(pipe, "all")
    assert torch.equal(sample("sd15", guidance_scale=1.0), base1)
    h = patch(pipe, "paper", max_decoder_batch=2)
    sample("sd15", guidance_scale=1.0)
    assert h.reports[-1]["decoder_batches"] == [2, 2, 2, 1, 2, 2, 1, 2, 2, 1], "one row a step without CFG"
    sample("sd15")
    assert h.reports[-1]["decoder_batches"] == [1] * 17, "two rows a step with CFG"
    rescaled = {}
    for parallel in (False, True):
        patch(pipe, "paper", parallel=parallel)
        rescaled[parallel] = sample("sd15", guidance_rescale=0.7)
    assert rel(rescaled[True], rescaled[False]) < 1e-4
    assert rel(rescaled[True], sample("sd15")) > 1e-4, "guidance_rescale acts"


def test_key_steps_count_within_each_call(patch):
    pipe = pipeline("sd15")
    h = patch(pipe, "uniform:3")
    first = sample("sd15", steps=12)
    sample("sd15", steps=7)
    again = sample("sd15", steps=12)
    assert torch.equal(first, again), "nothing carries over from one call to the next"
    assert [(r["steps"], r["keys"]) for r in h.reports] == [(12, [0, 3, 6, 9]), (7, [0, 3, 6]), (12, [0, 3, 6, 9])]
    assert all(r["seconds"] > 0 for r in h.reports)


def test_controlnet_each_step_gets_its_own_residuals(patch):
    """With controlnet_reuse off the ControlNet runs every step: it stops after step 5 (control_guidance_end=0.3):
    steps 6-9, decoded on key step 5's features, change with it; steps 0-5 do not.  (Reuse on:
    tests/test_diffusers_controlnet.py.)"""
    pipe = pipeline("controlnet")
    h = patch(pipe, "paper", controlnet_reuse=False)
    runs = []
    for end in (1.0, 0.3):
        outs, done = step_outputs(pipe)
        try:
            sample("controlnet", control_guidance_end=end)
        finally:
            done()
        runs.append(outs)
    assert all(torch.equal(runs[0][i], runs[1][i]) for i in range(6))
    assert all(rel(runs[1][i], runs[0][i]) > 1e-3 for i in range(6, 10))
    r = h.reports[-1]
    assert r["decoder_batches"] == [1, 1, 1, 1] and "ControlNet" in r["parallel_off"] and r["cached_calls"] == 13


# --------------------------------------------------------------------------------- apply, refusals

def test_applying_twice_keeps_only_the_last_settings(patch):
    pipe = pipeline("sd15")
    sample("sd15", steps=2)           # the pipeline's own per-call attributes exist from the first call on
    before = state_of(pipe)
    first = patch(pipe, "paper")
    second = patch(pipe, "uniform:2", parallel=False)
    assert vars(type(pipe))[fdd.HANDLE_ATTR] is second and type(pipe).__base__ is before[0]
    assert list(pipe.unet._diffusers_hook.hooks) == [fdd.HOOK_NAME]
    out = sample("sd15")
    assert not first.reports and second.reports[-1]["strategy"] == "uniform:2"
    assert second.reports[-1]["cached_calls"] == 10 and second.reports[-1]["decoder_batches"] == [1] * 10
    second.remove()
    assert state_of(pipe) == before
    fresh = patch(pipe, "uniform:2", parallel=False)
    assert torch.equal(sample("sd15"), out) and fresh.reports


def test_a_later_forward_wrapper_is_never_silently_dropped():
    """accelerate's CPU offload wraps unet.forward: inside ours it would be skipped (refused at apply), and
    remove() must not put the original forward back over one installed after apply (it asks to remove it)."""
    pipe = pipeline("sd15")
    before = state_of(pipe)
    handle = fdd.apply(pipe, "all")
    ours = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: ours(*a, **k)          # what accelerate's add_hook_to_module does
    with pytest.raises(RuntimeError, match="wrapped after apply"):
        handle.remove()
    pipe.unet.forward = ours
    handle.remove()
    assert state_of(pipe) == before
    pipe.unet._hf_hook = object()
    try:
        with pytest.raises(RuntimeError, match="accelerate hook"):
            fdd.apply(pipe)
    finally:
        del pipe.unet._hf_hook
    assert state_of(pipe) == before


def test_other_unet_classes_and_configurations_are_refused():
    pipe = pipeline("sd15")
    before = state_of(pipe)

    class MyUNet(diffusers.UNet2DConditionModel):
        pass
    for unet, words in [(MyUNet(**dt.SD15_UNET), "MyUNet is not one of the UNet classes"),
                        (diffusers.UNet2DModel(block_out_channels=(8, 16), norm_num_groups=4,
                                               down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                         "UNet2DModel is not one of the UNet classes"),
                        (dt.unet(time_cond_proj_dim=8), "time_cond_proj_dim=8")]:
        other = diffusers.StableDiffusionPipeline(**{**pipe.components, "unet": unet})
        with pytest.raises(TypeError, match=words):
            fdd.apply(other)
        assert not hasattr(unet, "_diffusers_hook") and type(other) is diffusers.StableDiffusionPipeline
    with pytest.raises(TypeError, match="StableDiffusionInpaintPipeline is not a supported pipeline"):
        fdd.apply(diffusers.StableDiffusionInpaintPipeline(**pipe.components))
    with pytest.raises(TypeError, match="MyUNet"):
        fdd.DiffusersUNetAdapter(MyUNet(**dt.SD15_UNET))
    with pytest.raises(ValueError, match="step 0 must be a key step"):
        fdd.apply(pipe, "1,2")
    assert state_of(pipe) == before


@pytest.mark.parametrize("what", ["sde_scheduler", "attention_processor", "cross_attention_kwargs"])
def test_what_the_split_does_not_mirror_runs_in_full(what, patch):
    pipe = pipeline("sd15")
    original_sched, original_procs = pipe.scheduler, pipe.unet.attn_processors
    kw = {}
    try:
        if what == "sde_scheduler":
            pipe.scheduler = dt.scheduler("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++")
            words = "dpmpp_2m_sde"
        elif what == "attention_processor":
            class CountingProcessor(diffusers.models.attention_processor.AttnProcessor2_0):
                pass
            pipe.unet.set_attn_processor(CountingProcessor())
            words = "CountingProcessor"
        else:
            kw = {"cross_attention_kwargs": {"foo": 1.0}}
            words = "['foo']"
        base = sample("sd15", seed=3, **kw)
        h = patch(pipe, "paper")
        out = sample("sd15", seed=3, **kw)
    finally:
        pipe.scheduler = original_sched
        pipe.unet.set_attn_processor(original_procs)
    assert torch.equal(out, base)
    r = h.reports[-1]
    assert words in r["bypassed"] and r["full_calls"] == STEPS and r["cached_calls"] == 0


def test_unsupported_call_features_are_named():
    a = lambda **kw: {**fdd.forward_arguments(pipeline("sd15").unet, (torch.zeros(1), 1, None)), **kw}
    assert fdd.unsupported_call_reason(a()) is None
    assert "T2I-Adapter" in fdd.unsupported_call_reason(a(down_intrablock_additional_residuals=[torch.zeros(1)]))
    assert "T2I-Adapter" in fdd.unsupported_call_reason(a(down_block_additional_residuals=[torch.zeros(1)]))
    assert "GLIGEN" in fdd.unsupported_call_reason(a(cross_attention_kwargs={"gligen": {}}))
    assert fdd.unsupported_call_reason(a(cross_attention_kwargs={"scale": 0.5})) is None
    assert "image_embeds" in fdd.unsupported_call_reason(a(added_cond_kwargs={"image_embeds": []}))
    assert "timestep_cond" in fdd.unsupported_call_reason(a(timestep_cond=torch.zeros(1)))


# ------------------------------------------------------------------- the digits model, both hosts

def digits_diffusers_unet():
    """The committed digits model (a ComfyUI UNetModel state dict) in diffusers' layout, converted by
    diffusers' own LDM -> diffusers key mapping."""
    import testmodel as tm
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file
    c = tm.DIGITS_UNET_CONFIG
    unet = diffusers.UNet2DConditionModel(
        sample_size=c["image_size"], in_channels=c["in_channels"], out_channels=c["out_channels"],
        layers_per_block=c["num_res_blocks"][0], block_out_channels=tuple(c["model_channels"] * m for m in c["channel_mult"]),
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=c["context_dim"], attention_head_dim=c["num_heads"],
        use_linear_projection=c["use_linear_in_transformer"], norm_num_groups=32).eval()
    sd = load_file(str(tm.WEIGHTS))
    tokens = sd.pop("cond.class_tokens")
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()}, dict(unet.config))
    assert len(converted) == len(sd)
    unet.load_state_dict(converted, strict=True)
    return unet, tokens


def test_digits_model_forward_equals_comfy(digits):
    unet, tokens = digits_diffusers_unet()
    comfy_unet = digits[0].model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([900.0, 500.0, 20.0])
    ctx = tokens[[3, 8, 10]]
    with torch.no_grad():
        assert rel(unet(x, t, ctx).sample, comfy_unet(x, t, ctx, None, None, {})) < 1e-5


def test_digits_model_decoder_outputs_agree_between_adapters(pack, digits):
    """The same sequence of calls through a Run with the ComfyUI adapter and with the diffusers adapter
    (each host's engine copy): every step's output agrees, key steps and decoder-only steps alike."""
    unet, tokens = digits_diffusers_unet()
    comfy_unet = digits[0].model.diffusion_model
    ldm, rt = pack.ldm, pack.runtime
    ctx = tokens[[3, 10]]
    g = torch.Generator().manual_seed(2)
    timesteps = [999.0, 850.0, 700.0, 520.0, 400.0, 250.0, 120.0, 30.0]
    sigmas = fdd.schedule_sigmas(diffusers.DDIMScheduler(), timesteps)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in timesteps]
    for parallel in (True, False):
        runs = (rt.Run(rt.Settings(parse_strategy("0,3,4"), parallel, 32, propagation="reuse"), sigmas, timesteps),
                Run(Settings(parse_strategy("0,3,4"), parallel, 32, propagation="reuse"), sigmas, timesteps))
        adapters = (ldm.LdmUNetAdapter(comfy_unet), fdd.DiffusersUNetAdapter(unet))
        with torch.no_grad():
            for i, (t, x) in enumerate(zip(timesteps, xs)):
                tt = torch.full((2,), t)
                calls = (ldm.make_call(x, tt, ctx, None, None, {"sigmas": torch.full((2,), sigmas[i])}, {}, "s"),
                         fdd.make_call(fdd.forward_arguments(unet, (x, tt, ctx)), "s"))
                fulls = (lambda: comfy_unet(x, tt, ctx, None, None, {}), lambda: unet(x, tt, ctx).sample)
                outs = []
                for run, adapter, call, full in zip(runs, adapters, calls, fulls):
                    run.begin_evaluation()
                    outs.append(run.forward(adapter, call, i, full))
                assert rel(outs[1], outs[0]) < 1e-5, (parallel, i)
        stats = [r.finish() for r in runs]
        assert stats[0]["cached_calls"] == stats[1]["cached_calls"] == 5
        assert stats[0]["decoder_batches"] == stats[1]["decoder_batches"]
