"""ControlNet reuse in diffusers (``apply(pipe, controlnet_reuse=True)``, fasterdiffusion/diffusers/controlnet.py):
the ControlNet runs at key steps only, non-key steps get its key-step residuals at their own scale, and a group's
decoders batch again.  Tiny random-weight SD1.5 / SDXL ControlNet pipelines (tests/diffusers_tiny.py), text-to-
image and img2img, one ControlNet or two (MultiControlNetModel).  ControlNet forwards are counted where the net
really runs (its ``controlnet_cond_embedding``), per loop position.
"""
from __future__ import annotations

import functools
import logging

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import diffusers_tiny as dt  # noqa: E402
from diffusers_checks import rel  # noqa: E402
from fasterdiffusion import diffusers as fdd  # noqa: E402
from fasterdiffusion.runtime import Outcome, Run, format_report  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")     # diffusers_checks.one_thread

STEPS = 20
PAPER = [0, 1, 2, 3, 5, 10, 15]          # paper's keys at 20 steps: groups [3,4] [5..9] [10..14] [15..19]


def multi(seed: int = 0):
    """SD1.5 with two ControlNets (the pipeline wraps the list in a MultiControlNetModel)."""
    parts = dt._sd_parts(seed, "EulerDiscreteScheduler")
    parts["controlnet"] = [dt.controlnet_model(seed + 1), dt.controlnet_model(seed + 2)]
    pipe = diffusers.StableDiffusionControlNetPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TWO = dict(image=[dt.control_image(0), dt.control_image(1)], controlnet_conditioning_scale=[0.7, 1.2],
           control_guidance_start=[0.0, 0.0], control_guidance_end=[0.6, 1.0])
KINDS = {
    "sd15": (dt.controlnet, dict(image=dt.control_image())),
    "sd15_img2img": (functools.partial(dt.controlnet, img2img=True),
                     dict(image=dt.init_image(), control_image=dt.control_image(), strength=0.6)),
    "sdxl": (dt.controlnet_xl, dict(image=dt.control_image())),
    "sdxl_img2img": (functools.partial(dt.controlnet_xl, img2img=True),
                     dict(image=dt.init_image(), control_image=dt.control_image(), strength=0.6)),
    "multi": (multi, TWO),
}


@functools.lru_cache(maxsize=None)
def pipeline(kind):
    return KINDS[kind][0]()


def sample(kind, **kw):
    return dt.run(pipeline(kind), **{"steps": STEPS, **KINDS[kind][1], **kw})


def nets_of(pipe):
    cn = pipe.controlnet
    return list(cn.nets) if isinstance(cn, diffusers.MultiControlNetModel) else [cn]


class Recorder:
    """During the next pipeline calls: the model output each scheduler.step gets (``outputs``), the loop position
    (``pos``) and the positions at which each ControlNet really ran (``runs[net index]``)."""

    def __init__(self, pipe):
        self.pipe, self.outputs, self.pos = pipe, [], 0
        self.runs = {i: [] for i in range(len(nets_of(pipe)))}

    def __enter__(self):
        sched = self.pipe.scheduler
        original = sched.step

        @functools.wraps(original)
        def step(model_output, *a, **k):
            self.outputs.append(model_output.clone())
            self.pos += 1
            return original(model_output, *a, **k)
        vars(sched)["step"] = step
        self.hooks = [net.controlnet_cond_embedding.register_forward_hook(lambda *a, i=i: self.runs[i].append(self.pos))
                      for i, net in enumerate(nets_of(self.pipe))]
        return self

    def __exit__(self, *exc):
        vars(self.pipe.scheduler).pop("step")
        for h in self.hooks:
            h.remove()


def net_state(pipe):
    return [(sorted(vars(n)), n.forward.__func__) for n in nets_of(pipe)]


# ------------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("kind", list(KINDS))
def test_all_and_remove_are_bit_identical(kind, patch):
    pipe = pipeline(kind)
    base = sample(kind)
    before = net_state(pipe)
    for reuse in (True, False):
        h = patch(pipe, "all", controlnet_reuse=reuse)
        assert torch.equal(sample(kind), base), reuse
        assert (list(nets_of(pipe)[0]._diffusers_hook.hooks) == [fdd.HOOK_NAME]) if reuse else net_state(pipe) == before
        h.remove()
        assert net_state(pipe) == before
    assert torch.equal(sample(kind), base)


# ------------------------------------------------------------------------------------------------ counts

@pytest.mark.parametrize("parallel", [True, False])
def test_controlnet_runs_at_key_steps_and_decoders_batch(parallel, patch):
    pipe = pipeline("sd15")
    got = {}
    for reuse in (True, False):
        h = patch(pipe, "paper", parallel=parallel, controlnet_reuse=reuse)
        with Recorder(pipe) as rec:
            sample("sd15")
        got[reuse] = rec.runs[0], h.reports[-1]
    runs, r = got[True]
    assert runs == PAPER, "one ControlNet forward per key step (CFG is one batched call)"
    assert r["decoder_batches"] == ([2, 5, 5, 5] if parallel else [1, 1, 1, 1]) and "parallel_off" not in r
    runs, r = got[False]
    assert runs == list(range(STEPS)) and r["decoder_batches"] == [1, 1, 1, 1]
    assert ("ControlNet" in r.get("parallel_off", "")) == parallel


def test_img2img_counts_keys_within_its_steps(patch):
    pipe = pipeline("sdxl_img2img")
    h = patch(pipe, "paper")
    with Recorder(pipe) as rec:
        sample("sdxl_img2img")
    r = h.reports[-1]
    assert r["steps"] == 12 and rec.runs[0] == r["keys"] == [0, 1, 2, 3, 5, 10] and r["decoder_batches"] == [2, 5, 2]


# ------------------------------------------------------------------------------------------------ what steps get

def hand_reference(pipe, keys):
    """Each net's forward replaced by the reference: at ``keys`` the real forward at scale 1 without guess mode
    (its unscaled residuals), at every step those of its last key times this step's scale, as diffusers'
    ControlNetModel.forward scales them (guess mode: 0.1 ... 1.0 per block, times the scale)."""
    rec = Recorder(pipe)
    kept = {}

    def forward_of(i, net):
        real = type(net).forward.__get__(net)

        def forward(sample, timestep, *a, conditioning_scale=1.0, guess_mode=False, return_dict=True, **k):
            if rec.pos in keys:
                kept[i] = real(sample, timestep, *a, conditioning_scale=1.0, guess_mode=False, return_dict=False, **k)
            down, mid = kept[i]
            if guess_mode:
                scales = torch.logspace(-1, 0, len(down) + 1) * conditioning_scale
                return [d * s for d, s in zip(down, scales)], mid * scales[-1]
            return [d * conditioning_scale for d in down], mid * conditioning_scale
        return forward

    for i, net in enumerate(nets_of(pipe)):
        net.forward = forward_of(i, net)
    return rec


CASES = {
    "ends_in_a_group": ("sd15", dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.6)),
    "guess_mode": ("sd15", dict(guess_mode=True, controlnet_conditioning_scale=0.8, control_guidance_end=0.6)),
    "sdxl_guess_mode": ("sdxl", dict(guess_mode=True, control_guidance_end=0.6)),
    "two_nets": ("multi", dict(control_guidance_start=[0.0, 0.2], control_guidance_end=[0.6, 1.0])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_non_key_steps_get_the_key_residuals_at_their_own_scale(case, patch):
    """Sequential: every step's model output equals, bit for bit, a run without reuse whose ControlNet returns the
    key step's unscaled residuals scaled by hand to each step's conditioning_scale (0 after control_guidance_end);
    the parallel run agrees within batching numerics and batches the paper's groups."""
    kind, kw = CASES[case]
    pipe = pipeline(kind)
    h = patch(pipe, "paper", parallel=False)
    with Recorder(pipe) as seq:
        seq_out = sample(kind, **kw)
    keys = h.reports[-1]["keys"]
    assert all(runs == keys for runs in seq.runs.values())
    patch(pipe, ",".join(map(str, keys)), parallel=False, controlnet_reuse=False)
    try:
        with hand_reference(pipe, keys) as ref:
            ref_out = sample(kind, **kw)
    finally:
        for net in nets_of(pipe):
            del net.forward
    assert len(seq.outputs) == len(ref.outputs) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(seq.outputs, ref.outputs)) and torch.equal(seq_out, ref_out)
    par = patch(pipe, "paper", parallel=True)
    assert rel(sample(kind, **kw), seq_out) < 1e-4
    assert "parallel_off" not in par.reports[-1] and len(par.reports[-1]["decoder_batches"]) == 4 - (kind == "multi")


def test_a_controlnet_that_ends_is_zero_scaled_not_dropped_from_the_key(patch):
    """After control_guidance_end the steps of that group differ from those of a run where it never ends."""
    pipe = pipeline("sd15")
    patch(pipe, "paper", parallel=False)
    runs = []
    for end in (1.0, 0.6):
        with Recorder(pipe) as rec:
            sample("sd15", control_guidance_end=end)
        runs.append(rec.outputs)
    assert all(torch.equal(runs[0][i], runs[1][i]) for i in range(12)), "steps before the end"
    assert all(rel(runs[1][i], runs[0][i]) > 1e-3 for i in (12, 13, 14))


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "multi"])
def test_parallel_matches_sequential(kind, patch):
    kw = dict(control_guidance_end=0.6) if kind != "multi" else {}
    outs, reports = [], []
    for parallel, cap, propagation in ((False, 32, "reuse"), (True, 32, "reuse"), (True, 4, "reuse"),
                                       (False, 32, "forecast"), (True, 32, "forecast")):
        h = patch(pipeline(kind), "paper", parallel=parallel, max_decoder_batch=cap, propagation=propagation)
        outs.append(sample(kind, **kw))
        reports.append(h.reports[-1])
    assert rel(outs[1], outs[0]) < 1e-4 and rel(outs[2], outs[1]) < 1e-5 and rel(outs[4], outs[3]) < 1e-4
    assert rel(outs[3], outs[0]) > 1e-4, "forecast is not reuse"
    assert reports[2]["decoder_batches"] == [2, 2, 2, 1, 2, 2, 1, 2, 2, 1] and not any("parallel_off" in r for r in reports)


def test_controlnet_starting_inside_a_group_makes_a_key_step(patch, caplog):
    """control_guidance_start=0.2 switches the net on at step 4, inside the group [3, 4]: step 4 becomes a key step
    (a late key), so its residuals are its own; step 3 gets none (scale 0)."""
    pipe = pipeline("sd15")
    h = patch(pipe, "paper")
    with caplog.at_level(logging.INFO), Recorder(pipe) as rec:
        sample("sd15", control_guidance_start=0.2)
    r = h.reports[-1]
    assert r["late_keys"] == [4] and r["keys"] == [0, 1, 2, 3, 4, 5, 10, 15] and rec.runs[0] == r["keys"]
    assert r["decoder_batches"] == [5, 5, 5] and "parallel_off" not in r
    assert sum("starts inside a group" in m.getMessage() for m in caplog.records) == 1
    assert "steps [4] made key steps" in format_report(r)
    h2 = patch(pipe, "paper", controlnet_reuse=False)
    with Recorder(pipe) as rec:
        sample("sd15", control_guidance_start=0.2)
    assert "late_keys" not in h2.reports[-1] and rec.runs[0] == list(range(STEPS)), "reuse off: today's behaviour"


def test_two_controlnets_each_keep_their_own_range(patch):
    """Net 0 ends at 0.6 (inside the group 10..14), net 1 starts at 0.2 (late key 4): both run at every key step (the
    pipeline calls them at scale 0 outside their range), and the groups still batch."""
    pipe = pipeline("multi")
    h = patch(pipe, "paper")
    with Recorder(pipe) as rec:
        out = sample("multi", control_guidance_start=[0.0, 0.2], control_guidance_end=[0.6, 1.0])
    r = h.reports[-1]
    assert r["late_keys"] == [4] and rec.runs == {0: r["keys"], 1: r["keys"]} and r["decoder_batches"] == [5, 5, 5]
    only_one = sample("multi", control_guidance_start=[0.0, 0.2], control_guidance_end=[0.6, 1.0],
                      controlnet_conditioning_scale=[0.0, 1.2])
    assert rel(out, only_one) > 1e-3, "net 0 contributes before its end"


def test_a_changed_control_image_is_never_served_stale(patch):
    """A callback swaps the control image after step 6: the ControlNet runs at steps 7-9 on the new image (fresh,
    its inputs changed), those steps decode one at a time, and parallel equals sequential."""
    pipe = pipeline("sd15")
    other = dt.control_image(5)

    def callback(p, i, t, kw):
        return {"image": torch.cat([other] * 2)} if i == 6 else {}

    outs, runs = [], []
    for parallel in (False, True):
        h = patch(pipe, "paper", parallel=parallel)
        with Recorder(pipe) as rec:
            outs.append(sample("sd15", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["image"]))
        runs.append(rec.runs[0])
    assert runs[0] == runs[1] == sorted(PAPER + [7, 8, 9])
    assert rel(outs[1], outs[0]) < 1e-4 and "inputs changed" in h.reports[-1]["parallel_off"]
    assert rel(outs[1], sample("sd15")) > 1e-3


def test_a_full_unet_call_never_gets_reused_residuals(patch, monkeypatch):
    """Should the run compute a non-key UNet call in full after its ControlNet was served, it raises."""
    pipe = pipeline("sd15")
    patch(pipe, "uniform:2", parallel=False)
    real = Run.decide

    def decide(self, step, slot):
        return Outcome.NO_FEATURES if step == 3 else real(self, step, slot)
    monkeypatch.setattr(Run, "decide", decide)
    with pytest.raises(RuntimeError, match="reused ControlNet residuals"):
        sample("sd15", steps=6)
