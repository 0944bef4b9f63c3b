"""A1111's ControlNet extension with ``controlnet_reuse`` (patches/webui/controlnet.py), on the real ldm UNet through
the FasterDiffusion script, with a project-written fake of the extension's call pattern (tests/webui_fakes.py
``ControlNetExtension``: Mikubill/sd-webui-controlnet's replaced UNet forward, its per-unit control model calls and
weighting, its ``guidance_stopped`` schedule on A1111's ``state.sampling_step``).  The extension itself is not on a
registry and not installed in the real-host test (tests/test_webui_real.py); see that file's note.

A1111's ``state.sampling_step`` is the sampler callback's step: 0 at the evaluations of steps 0 and 1, then
``i - 1`` at step ``i``, so a unit's ``[start, end]`` percent holds at step ``i`` when ``start <= max(i - 1, 0) /
steps <= end``.
"""
from __future__ import annotations

import types

import pytest
import torch

import webui_fakes as wf
from fasterdiffusion.runtime import Run
from fasterdiffusion.settings import Settings
from fasterdiffusion.strategy import parse_strategy
import test_webui
from test_webui import conds, reports

webui, unet = test_webui.webui, test_webui.unet      # the module-scoped fixtures of test_webui.py


def fd(strategy, reuse=True, propagation="reuse"):
    """The accordion's values: FasterDiffusion on, ``strategy``, ``controlnet_reuse``."""
    return [True, strategy, True, 32, 0.0, propagation, reuse]


@pytest.fixture(scope="module")
def nets(unet):
    return [wf.PlugableControlModel(wf.FakeControlNet(unet, seed)) for seed in (11, 12)]


def hints(n=2):
    g = torch.Generator().manual_seed(21)
    return [torch.rand(1, 3, 64, 64, generator=g) for _ in range(n)]


def run_cn(w, unet, args, units, func=None, steps=6, mode="batched", ext_setup=None):
    """One txt2img generation with the fake ControlNet extension hooked on ``unet`` with ``units`` (ControlParams
    made fresh); returns (latent, p, processed, forwards of each unit's net, the extension)."""
    sd = wf.SdModel(unet)
    ext = wf.ControlNetExtension()
    if ext_setup:
        ext_setup(ext)
    ext.hook(unet, units)
    before = [u.control_model.control_model.forwards for u in units]
    noise, cond, uncond = conds(1, 1)
    p = wf.P(sd, steps=steps)
    sampler = wf.KSampler(func or ks_module().sample_euler, sd, mode)
    try:
        outs, processed = wf.generate(w.script, p, args, [wf.Pass(sampler, noise, wf.mark_context(cond, True),
                                                                  wf.mark_context(uncond, False), steps)])
    finally:
        ext.restore()
    forwards = [u.control_model.control_model.forwards - b for u, b in zip(units, before)]
    assert "forward" not in unet.__dict__
    assert all("forward" not in u.control_model.__dict__ for u in units)       # the wrappers are gone
    return outs[0], p, processed, forwards, ext


def ks_module():
    import comfy.k_diffusion.sampling as sampling
    return sampling


def unit(net, hint, **kw):
    return wf.ControlParams(net, hint, **kw)


# ------------------------------------------------------------------------------------------------ forward counts

def test_reuse_runs_the_controlnet_at_key_steps_only(webui, unet, nets):
    h = hints()
    on, p, processed, fw_on, _ = run_cn(webui, unet, fd("0,3"), [unit(nets[0], h[0], weight=0.8)])
    off, p_off, _, fw_off, _ = run_cn(webui, unet, fd("0,3", reuse=False), [unit(nets[0], h[0], weight=0.8)])
    plain, _, _, fw_plain, _ = run_cn(webui, unet, [False], [unit(nets[0], h[0], weight=0.8)])
    assert fw_plain == [6] and fw_off == [6]              # reuse off: the extension's every-step ControlNet
    assert fw_on == [2]                                   # reuse on: key steps 0 and 3 only
    r = reports(p)[0]
    assert r["controlnet"] == {"key": 2, "reused": 4, "fresh": 0} and r["cached_calls"] == 4
    assert "controlnet" not in reports(p_off)[0] and reports(p_off)[0]["cached_calls"] == 4
    assert "ControlNet runs at key steps only" in processed.comments and "was reused 4x" in processed.comments
    assert p.extra_generation_params["FD stats"] == "6 steps: encoder 2x, skipped 4x, ControlNet 2x, reused 4x"
    assert p.extra_generation_params["FD ControlNet reuse"] is True
    assert p_off.extra_generation_params["FD ControlNet reuse"] is False
    assert torch.isfinite(on).all() and not torch.equal(on, off)
    # the difference reuse makes is small next to what the ControlNet contributes at all
    none, _, _, _, _ = run_cn(webui, unet, fd("0,3"), [])
    assert (on - off).abs().max() < (off - none).abs().max()
    # cond and uncond as separate calls (A1111 with batch_cond_uncond off): each call slot keeps its own outputs
    _, p, _, fw, _ = run_cn(webui, unet, fd("0,3"), [unit(nets[0], h[0])], mode="chunks")
    _, _, _, fw_off, _ = run_cn(webui, unet, fd("0,3", reuse=False), [unit(nets[0], h[0])], mode="chunks")
    assert fw == [4] and fw_off == [12] and reports(p)[0]["controlnet"] == {"key": 4, "reused": 8, "fresh": 0}


def test_all_and_no_fasterdiffusion_are_bit_identical(webui, unet, nets):
    h = hints()
    units = lambda: [unit(nets[0], h[0], weight=0.6), unit(nets[1], h[1], soft_injection=True, start=0.2)]
    base, _, _, fw_base, _ = run_cn(webui, unet, [False], units())
    allk, p, _, fw_all, _ = run_cn(webui, unet, fd("all"), units())
    assert torch.equal(base, allk) and fw_all == fw_base
    assert reports(p)[0]["controlnet"] == {"key": 9, "reused": 0, "fresh": 0}      # A at 6 steps, B at 3 to 5


# ------------------------------------------------------------------------------------------------ start / end

def test_a_unit_starting_inside_a_group_makes_a_late_key(webui, unet, nets):
    """start 0.5 of 6 steps: off at steps 0-3 (sampling_step 0, 0, 1, 2), on at 4 and 5.  Strategy 0,3: step 4 is in
    the group of key 3, where the unit was off: step 4 becomes a key step and the unit's model runs there only."""
    h = hints()
    out, p, processed, fw, ext = run_cn(webui, unet, fd("0,3"), [unit(nets[0], h[0], start=0.5)])
    assert [s[0] for s in ext.stopped_log] == [True, True, True, True, False, False]
    r = reports(p)[0]
    assert r["late_keys"] == [4] and r["keys"] == [0, 3, 4]
    assert fw == [1] and r["controlnet"] == {"key": 1, "reused": 1, "fresh": 0}
    assert "steps [4] made key steps (a ControlNet starts there)" in processed.comments
    _, p_off, _, fw_off, _ = run_cn(webui, unet, fd("0,3", reuse=False), [unit(nets[0], h[0], start=0.5)])
    assert fw_off == [2] and "late_keys" not in reports(p_off)[0]


def test_a_unit_that_ended_drops_out(webui, unet, nets):
    """end 0.5 of 6 steps: on at steps 0-4, off at 5 (sampling_step 4: 0.67 > 0.5).  Strategy 0,3: its model runs at
    the keys 0 and 3, steps 1, 2 and 4 reuse them, step 5 gets nothing from it (no late key for an end)."""
    h = hints()
    _, p, _, fw, ext = run_cn(webui, unet, fd("0,3"), [unit(nets[0], h[0], end=0.5)])
    assert [s[0] for s in ext.stopped_log] == [False] * 5 + [True]
    r = reports(p)[0]
    assert fw == [2] and r["controlnet"] == {"key": 2, "reused": 3, "fresh": 0} and "late_keys" not in r


def test_two_units_with_different_ranges(webui, unet, nets):
    """A [0, 0.5]: on at steps 0-4; B [0.3, 1]: on at 3-5.  Strategy 0,2 (groups [0,1] and [2..5]): B starts at 3,
    inside the group of key 2, so 3 is a late key; A runs at the keys 0, 2, 3 and is reused at 1 and 4; B runs at
    3 and is reused at 4 and 5."""
    h = hints()
    units = lambda: [unit(nets[0], h[0], end=0.5, weight=0.9), unit(nets[1], h[1], start=0.3, weight=0.5)]
    out, p, _, fw, ext = run_cn(webui, unet, fd("0,2"), units())
    assert [tuple(s) for s in ext.stopped_log] == [(False, True)] * 3 + [(False, False)] * 2 + [(True, False)]
    r = reports(p)[0]
    assert r["late_keys"] == [3] and r["keys"] == [0, 2, 3]
    assert fw == [3, 1] and r["controlnet"] == {"key": 4, "reused": 4, "fresh": 0}
    off, _, _, fw_off, _ = run_cn(webui, unet, fd("0,2", reuse=False), units())
    assert fw_off == [5, 3] and torch.isfinite(out).all()
    # one model shared by both units (the extension's model cache), different hints: each call gets its own unit's
    # kept output (matched by its inputs), and the result equals that of two separate, identical models
    twin = wf.PlugableControlModel(nets[0].control_model)
    shared, p2, _, _, _ = run_cn(webui, unet, fd("0,2"), [unit(nets[0], h[0], end=0.5, weight=0.9),
                                                          unit(twin, h[1], start=0.3, weight=0.5)])
    separate, _, _, _, _ = run_cn(webui, unet, fd("0,2"), [unit(nets[0], h[0], end=0.5, weight=0.9),
                                                           unit(nets[0], h[1], start=0.3, weight=0.5)])
    assert reports(p2)[0]["controlnet"] == {"key": 4, "reused": 4, "fresh": 0}
    assert torch.equal(shared, separate)


def test_a_new_hint_inside_a_group_runs_the_controlnet_fresh(webui, unet, nets):
    """An extension that changes a unit's hint mid-run (hook.py's ``hint_cond`` setter resets ``used_hint_cond``):
    the kept output no longer matches the call's inputs, so the model runs (as with reuse off) until the next key."""
    h = hints(3)
    units = [unit(nets[0], h[0])]

    def setup(ext):
        def weight(step):
            if step == 1 and units[0].hint_cond is h[0]:          # from step 2 on (sampling_step 1)
                units[0].hint_cond, units[0].used_hint_cond = h[2], None
            return 1.0
        ext.step_weights = {0: weight}
    _, p, _, fw, _ = run_cn(webui, unet, fd("0,4"), units, ext_setup=setup)
    assert fw == [4] and reports(p)[0]["controlnet"] == {"key": 2, "reused": 2, "fresh": 2}   # 0 key, 1 reused, 2 3 fresh


# ------------------------------------------------------------------------------------------------ the residuals a non-key step gets

def test_non_key_output_equals_the_decoder_on_key_features_with_key_residuals_at_this_steps_weights(webui, unet, nets):
    """Hooked UNet calls at step 0 (key) and step 1 (non-key) under the extension's forward: unit A's weight
    changes from 0.7 to 1.3 between them (an extension scheduling it), unit B (soft injection, CFG injection) runs at
    the key and ends before step 1.  Step 1's output is the UNet decoder on step 0's encoder features with A's
    step-0 raw residuals times 1.3, B's absent; no control model runs at step 1."""
    ldm = webui.ldm
    h = hints()
    a = unit(nets[0], h[0], weight=0.7)
    b = unit(nets[1], h[1], soft_injection=True, cfg_injection=True)
    ext = wf.ControlNetExtension()
    ext.hook(unet, [a, b])
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    timesteps = [900.0, 700.0, 500.0, 300.0]
    run = Run(Settings(parse_strategy("0,3"), propagation="reuse"), sigmas, timesteps)
    state = types.SimpleNamespace(step=0, evaluation=0)
    hook = ldm.UNetHook(unet, lambda: run, lambda: state.step).install()
    hook.shared = True
    reuse = webui.mod._hosts.webui.controlnet.ControlReuse(run, hook, [a, b], lambda: state.evaluation)
    hook.controls = reuse.install()
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    marked = torch.cat([wf.mark_context(ctx[:1], True), wf.mark_context(ctx[1:], False)])
    t0, t1 = torch.tensor([900.0, 900.0]), torch.tensor([700.0, 700.0])
    counts = lambda: [a.control_model.control_model.forwards, b.control_model.control_model.forwards]
    try:
        with torch.no_grad():
            run.begin_evaluation()
            state.evaluation += 1
            unet(x0, t0, context=marked)
            start = counts()
            a.weight, b.guidance_stopped = 1.3, True                     # step 1: A reweighted, B ended
            state.step = 1
            run.begin_evaluation()
            state.evaluation += 1
            got = unet(x1, t1, context=marked)
            assert counts() == start                                    # no ControlNet ran at step 1
            # the hand reference
            adapter = ldm.CompVisSplit(unet)
            k = ldm.make_call(unet, (x0, t0), {"context": ctx})
            feats = adapter.encode(k, adapter.embed(k))
            raw = nets[0].control_model(x=x0, hint=h[0], timesteps=t0, context=ctx)
            total = [c * 1.3 + 0.0 for c in raw]
            c1 = ldm.make_call(unet, (x1, t1), {"context": ctx})
            emb = adapter.embed(c1)
            hh = feats.mid + total.pop()
            skips = list(feats.skips)
            for module in unet.output_blocks:
                hh = module(torch.cat([hh, skips.pop() + total.pop()], dim=1), emb, ctx)
            want = unet.out(hh)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            # with the ControlNet fresh at step 1 (reuse off) the output differs: the reuse is what made it
            hook.controls = None
            reuse.remove()
            run.begin_evaluation()
            fresh = unet(x1, t1, context=marked)
            assert not torch.allclose(fresh, want, rtol=1e-4, atol=1e-5)
    finally:
        reuse.remove()
        hook.remove()
        ext.restore()
    assert reuse.counts.as_dict() == {"key": 2, "reused": 1, "fresh": 0}
    stats = run.finish()
    assert stats["cached_calls"] == 2 and stats["encoder_calls"] == 1


# ------------------------------------------------------------------------------------------------ the setting

def test_the_setting_reads_from_args_xyz_and_infotext(webui, unet):
    glue = webui.glue
    sd = wf.SdModel(unet)
    assert glue.read_settings(wf.P(sd), [True]).controlnet_reuse is True                   # default on
    assert glue.read_settings(wf.P(sd), fd("paper", reuse=False)).controlnet_reuse is False
    assert glue.read_settings(wf.P(sd), fd("paper", reuse="False")).controlnet_reuse is False
    p = wf.P(sd)
    p.fd_controlnet_reuse = "False"                                                         # the XYZ axis
    assert glue.read_settings(p, [False]) == Settings.of("paper", controlnet_reuse=False)
    assert glue.settings_from_infotext({"FasterDiffusion": "paper", "FD ControlNet reuse": "True"})["controlnet_reuse"] is True
    # an infotext written before the setting existed: the ControlNet ran at every step
    assert glue.settings_from_infotext({"FasterDiffusion": "paper"})["controlnet_reuse"] is False
    assert glue.settings_from_infotext({})["controlnet_reuse"] is True
