"""Forecast propagation (fasterdiffusion/forecast.py, Run with a Forecast): the extrapolation itself, the
runtime's contract under forecasting (checked against an independent polynomial fit), and the properties
the method relies on: constant key features give exactly reuse; parallel equals sequential; the history
stays within its call slot and its run; only key-step features are ever used."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fasterdiffusion.forecast import REUSE, Forecast, extrapolate, forecast_settings, weights
from fasterdiffusion.runtime import Features, ModelCall, Run
from fasterdiffusion.settings import Settings
from fasterdiffusion.samplers import forecast_off_reason
from fasterdiffusion.strategy import make_plan, parse_strategy
from test_runtime_contract import FakeAdapter, fake_full, schedule, simulate, strategies


def feats(*values):
    return Features([torch.tensor([float(v)]) for v in values[:-1]], torch.tensor([float(values[-1])]))


# ------------------------------------------------------------------------------ the extrapolation

def test_order_one_is_the_issue_formula():
    history = [(2, feats(1.0, 10.0)), (5, feats(4.0, 4.0))]
    out = extrapolate(Forecast(1), history, 7)
    # f(k) + (s - k) / (k - k') * (f(k) - f(k')) with k' = 2, k = 5, s = 7
    assert out.skips[0].item() == pytest.approx(4 + 2 / 3 * 3)
    assert out.mid.item() == pytest.approx(4 + 2 / 3 * -6)


def test_order_two_is_exact_on_a_quadratic_and_uses_the_last_three_keys():
    q = lambda u: 3 - 2 * u + 0.5 * u * u
    history = [(0, feats(99.0, 99.0))] + [(k, feats(q(k), q(k))) for k in (1, 4, 6)]
    out = extrapolate(Forecast(2), history, 9)
    assert out.skips[0].item() == pytest.approx(q(9)) and out.mid.item() == pytest.approx(q(9))
    assert sum(weights([1.0, 4.0, 6.0], 9.0)) == pytest.approx(1 - 1.0 * (9 - 1) * (9 - 4) / ((6 - 1) * (6 - 4)))


def test_fewer_keys_than_the_order_use_what_there_is():
    assert extrapolate(Forecast(1), [(3, f := feats(1.0, 2.0))], 5) is f          # the first group reuses
    out = extrapolate(Forecast(2), [(0, feats(0.0, 0.0)), (2, feats(2.0, 2.0))], 3)   # order 2 with two keys: linear
    assert out.mid.item() == pytest.approx(3.0)


def test_damping_parts_and_variables():
    history = [(0, feats(0.0, 0.0)), (2, feats(2.0, 2.0))]
    assert extrapolate(Forecast(1, damping=0.5), history, 4).mid.item() == pytest.approx(3.0)
    assert extrapolate(Forecast(1, damping=0.0), history, 4) is history[-1][1]
    skips_only = extrapolate(Forecast(1, parts="skips"), history, 4)
    assert skips_only.skips[0].item() == pytest.approx(4.0) and skips_only.mid.item() == 2.0
    mid_only = extrapolate(Forecast(1, parts="mid"), history, 4)
    assert mid_only.skips[0].item() == 2.0 and mid_only.mid.item() == pytest.approx(4.0)
    timesteps = torch.tensor([900.0, 800.0, 600.0, 500.0, 100.0])   # uneven: the variable matters
    assert extrapolate(Forecast(1, "timestep"), history, 4, timesteps).mid.item() == pytest.approx(2 + 2 * 500 / 300)
    sigmas = [8.0, 4.0, 2.0, 1.0, 0.5, 0.0]
    assert extrapolate(Forecast(1, "log_sigma"), history, 4, None, sigmas).mid.item() == pytest.approx(4.0)


def test_constant_features_forecast_to_exactly_themselves():
    g = torch.Generator().manual_seed(0)
    f = Features([torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)], torch.randn(2, 5, 2, 2, generator=g))
    same = Features([t.clone() for t in f.skips], f.mid.clone())
    for order in (1, 2, 3):
        out = extrapolate(Forecast(order), [(0, same), (3, same), (4, f)], 11)
        assert all(torch.equal(a, b) for a, b in zip(out.skips, f.skips)) and torch.equal(out.mid, f.mid)


def test_settings_names():
    assert forecast_settings("reuse") is REUSE and forecast_settings("forecast") == Forecast(1, clamp=1.0)
    assert forecast_settings(Forecast(2)) == Forecast(2)
    with pytest.raises(ValueError, match="propagation must be one of forecast, reuse"):
        forecast_settings("extrapolate")
    with pytest.raises(ValueError, match="order"):
        Forecast(order=7)


# ------------------------------------------------------------------------------ the runtime, forecasting

def fit(points, s):
    """The polynomial through ``points`` [(step, value tensor)] at ``s``: solved as a Vandermonde system
    in float64 (independent of forecast.weights)."""
    u = torch.tensor([float(k) for k, _ in points], dtype=torch.float64)
    v = torch.stack([x.double() for _, x in points])
    coeffs = torch.linalg.solve(torch.vander(u, increasing=True), v.reshape(len(points), -1))
    powers = torch.tensor([float(s) ** i for i in range(len(points))], dtype=torch.float64)
    return (powers @ coeffs).reshape(v.shape[1:]).float()


def check_forecast_log(run, log, order):
    """Each non-key call equals the decoder on the polynomial through the last order+1 key latents of its
    own (slot, occurrence) in this run (the fake features are the latent), at its own timestep and sigma."""
    plan = run.plan
    keys = {}      # (slot, occurrence) -> {key step: latent of its latest call}
    group_of_key = {}
    for step, slot, occ, call, out in log:
        if step is None:
            torch.testing.assert_close(out, fake_full(call))
            continue
        group = plan.group_of(step)
        if step == group[0]:
            keys.setdefault((slot, occ), {})[step] = call.x[:, 0]
            group_of_key[(slot, occ)] = group
            torch.testing.assert_close(out, fake_full(call), rtol=1e-4, atol=1e-5)
            continue
        if group_of_key.get((slot, occ)) != group:
            torch.testing.assert_close(out, fake_full(call), msg="a non-key call without its own key features")
            continue
        behind = sorted(keys[(slot, occ)].items())[-(order + 1):]
        expected = fit(behind, step)
        torch.testing.assert_close(out[:, 0], expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(out[:, 1:], fake_full(call)[:, 1:])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), strategy=strategies, order=st.integers(1, 2), rows=st.integers(1, 3),
       split=st.booleans(), passes=st.integers(0, 1), corrector=st.booleans(), midpoints=st.booleans(),
       parallel=st.booleans(), cap=st.sampled_from([0, 1, 3, 8]), gaps=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_every_call_is_forecast_from_its_own_slots_keys(n, strategy, order, rows, split, passes, corrector,
                                                        midpoints, parallel, cap, gaps, seed):
    sigmas, timesteps = schedule(n, seed)
    run = Run(Settings(parse_strategy(strategy), parallel, cap, Forecast(order)), sigmas, timesteps)
    adapter = FakeAdapter()
    g = torch.Generator().manual_seed(seed)
    slots = [("cond",), ("uncond",)] if split else [("cond", "uncond")]
    absent = (lambda slot: bool(torch.rand(1, generator=g) < 0.3)) if gaps else None
    log = simulate(run, adapter, fake_full, sigmas, timesteps, lambda: torch.randn(rows, 1, generator=g).double().float(),
                   slots, passes, corrector, midpoints, absent)
    check_forecast_log(run, log, order)
    assert all(len(h) <= order + 1 for h in run.history.values()), "only order + 1 key feature sets are kept"
    stats = run.finish()
    if strategy == "all":
        assert adapter.encoded == 0 and stats["cached_calls"] == 0, "'all' runs the host's forward every step"
    if cap > 0:
        assert max(adapter.decoded_widths, default=0) <= max(1, cap // rows) * rows
    assert not run.history, "finish drops the history"


class ConstantAdapter(FakeAdapter):
    """Features that never change: forecasting them must give exactly what reuse gives."""

    def encode(self, call, emb):
        self.encoded += 1
        return Features([torch.full_like(call.x, 0.37)], torch.full_like(call.x, 1.91))


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("strategy", ["paper", "uniform:3", "0,2,3,9,10,15"])
def test_constant_key_features_give_exactly_reuse(strategy, parallel):
    sigmas, timesteps = schedule(20, 1)
    outs = []
    for forecast in (REUSE, Forecast(1), Forecast(2)):
        run = Run(Settings(parse_strategy(strategy), parallel, 0, forecast), sigmas, timesteps)
        g = torch.Generator().manual_seed(5)
        log = simulate(run, ConstantAdapter(), fake_full, sigmas, timesteps, lambda: torch.randn(2, 1, generator=g),
                       [("c",)], 0, False, False)
        # key steps alone in their group run the host's forward under reuse and the (here inconsistent) split
        # under forecast, which keeps their features: compare what the propagated steps got
        outs.append([out for step, *_, out in log if step not in run.plan.keys])
    assert outs[0]
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_history_never_crosses_call_slots_or_runs():
    """Run A keys slot 'a' at every key; run B first sees 'a' at step 4 (a late cond): B's first group of 'a'
    reuses (one key behind it), never A's features, and slot 'b' is never forecast from 'a'."""
    sigmas, timesteps = schedule(8, 2)
    config = Settings(parse_strategy("uniform:2"), True, 0, Forecast(1))

    def call(step, slot, value):
        x = torch.full((1, 1), float(value))
        return ModelCall(x, torch.tensor([timesteps[step]]), None, torch.tensor([sigmas[step]]), x.dtype, slot)

    def evaluate(run, step, slot, value):
        run.begin_evaluation()
        c = call(step, slot, value)
        return run.forward(FakeAdapter(), c, step, lambda: fake_full(c))

    a = Run(config, sigmas, timesteps)
    for step in range(8):
        evaluate(a, step, "a", 100 + step)
    a.finish()
    b = Run(config, sigmas, timesteps)
    for step in range(4):
        evaluate(b, step, "b", -step)
    for step in range(4, 8):
        out = evaluate(b, step, "a", 7.0 if step == 4 else 1000.0)
        if step == 5:
            assert out[0, 0].item() == 7.0, "first group of a slot in a run: reuse, nothing from run A or slot b"
    # slot b in B: keys 0 (value 0) and 2 (value -2): step 3 forecast -3, from b's own keys only
    b2 = Run(config, sigmas, timesteps)
    outs = [evaluate(b2, s, "b", -s)[0, 0].item() for s in range(4)]
    assert outs[1] == 0.0 and outs[3] == pytest.approx(-3.0)


def test_only_key_step_latents_enter_the_forecast():
    """Non-key latents are huge: any of them in a forecast would show."""
    sigmas, timesteps = schedule(9, 4)
    run = Run(Settings(parse_strategy("uniform:3"), False, 0, Forecast(2)), sigmas, timesteps)
    for step in range(9):
        run.begin_evaluation()
        key = step % 3 == 0
        x = torch.full((1, 1), float(step) if key else 1e6)
        c = ModelCall(x, torch.tensor([timesteps[step]]), None, torch.tensor([sigmas[step]]), x.dtype, "s")
        out = run.forward(FakeAdapter(), c, step, lambda c=c: fake_full(c))
        assert out[0, 0].item() == pytest.approx(float(step if step >= 3 else 0)), step


def test_sampler_fallback_reason():
    assert forecast_off_reason("sample_euler_ancestral", 30) and forecast_off_reason("sample_dpmpp_sde", 20)
    assert forecast_off_reason("sample_ddpm", 50) and forecast_off_reason("sample_seeds_2", 50)
    assert forecast_off_reason("sample_euler", 50) is None and forecast_off_reason("sample_dpmpp_2m", 20) is None
    assert forecast_off_reason("sample_euler", 8) is None and "multistep" in forecast_off_reason("sample_dpmpp_2m", 19)
    assert "multistep" in forecast_off_reason("sample_unipc", 12) and forecast_off_reason("sample_unipc", 25) is None
    sigmas, timesteps = schedule(6, 0)
    run = Run(Settings(parse_strategy("uniform:2"), True, 0, Forecast(1)), sigmas, timesteps,
              forecast_off=forecast_off_reason("sample_euler_ancestral", 6))
    stats = run.finish()
    assert stats["propagation"] == "reuse" and "euler_ancestral" in stats["forecast_off"]
    assert Run(Settings(parse_strategy("uniform:2"), True, 0, Forecast(2)), sigmas, timesteps).finish()[
        "propagation"] == "forecast (order 2)"


# ------------------------------------------------------------------------------ on the real UNet, in ComfyUI

def test_ldm_forecast_parallel_equals_sequential_and_capped(pack, digits):
    from conftest import apply
    model, tokens = digits
    import testmodel as tm
    latents = {}
    for name, (parallel, cap) in {"seq": (False, 0), "par": (True, 0), "cap": (True, 2)}.items():
        m, config = apply(pack, model, "uniform:4", parallel, cap, propagation="forecast")
        latents[name] = tm.sample_digits(m, tokens, [1, 7, 3], seed=3, steps=12)
        assert config.reports[-1]["propagation"] == "forecast (order 1)"
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(latents["par"], latents["seq"]) < 1e-4
    assert rel(latents["cap"], latents["par"]) < 1e-5        # exact up to the kernels' rounding at other widths
    m, _ = apply(pack, model, "uniform:4", True, 0, propagation="reuse")
    reuse = tm.sample_digits(m, tokens, [1, 7, 3], seed=3, steps=12)
    assert (reuse - latents["par"]).abs().max() > 1e-3, "forecast changes the image"


def test_ldm_forecast_all_is_bit_identical_and_ancestral_reuses(pack, digits):
    from conftest import apply
    import testmodel as tm
    model, tokens = digits
    plain = tm.sample_digits(model, tokens, [2, 5], seed=4, steps=8)
    m, config = apply(pack, model, "all", True, 32, propagation="forecast")
    assert torch.equal(tm.sample_digits(m, tokens, [2, 5], seed=4, steps=8), plain)
    outs = {}
    for propagation in ("forecast", "reuse"):
        m, config = apply(pack, model, "uniform:3", True, 32, propagation=propagation)
        outs[propagation] = tm.sample_digits(m, tokens, [2, 5], seed=4, steps=9, sampler="euler_ancestral")
    assert torch.equal(outs["forecast"], outs["reuse"])
    assert "euler_ancestral" in config.reports[-1].get("forecast_off", "") or config.reports[-1]["propagation"] == "reuse"


# ------------------------------------------------------------------------------ calibration for forecast

def test_forecast_plan_search_is_exact_against_brute_force():
    import itertools
    import numpy as np
    from fasterdiffusion.calibrate import choose_keys, plan_drift, plans_by_count
    rng = np.random.default_rng(0)
    n = 9
    cost = rng.random((n + 1, n, n + 1)) * 10
    for a in range(n):
        cost[1:a + 1 if a else 1, a, :] = cost[1:a + 1 if a else 1, a, :]
        cost[a + 1:, a, :] = np.inf                 # p >= a cannot be
        if a > 0:
            cost[0, a, :] = np.inf                  # only step 0 has no key before it
        cost[:, a, :a + 1] = np.inf
    plans = plans_by_count(cost, n, n)
    for k in range(1, n + 1):
        best = min((plan_drift(cost, (0,) + rest, n), (0,) + rest) for rest in itertools.combinations(range(1, n), k - 1))
        assert plan_drift(cost, plans[k], n) == pytest.approx(best[0]), k
        assert choose_keys(cost, n, k) == plans[k]


def test_forecast_output_cost_is_exact_for_a_linear_decoder():
    """With D_j(f) = M_j f, the table's group cost is the squared norm of the summed step-weighted output
    change of decoding forecast features, computed here directly."""
    from fasterdiffusion.calibrate import forecast_costs, plan_drift
    g = torch.Generator().manual_seed(0)
    n, d = 7, 5
    f = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(n)]
    M = [torch.randn(3, d, generator=g, dtype=torch.float64) for _ in range(n)]
    w = [0.5 + j / n for j in range(n)]
    out = [M[j] @ f[j] for j in range(n)]
    changes = {("c",): {(a, j): w[j] * (M[j] @ f[a] - out[j]) for j in range(n) for a in range(j)}}
    cost, unclamped = forecast_costs(changes, n), forecast_costs(changes, n, clamp=None)
    for keys in ([0, 2, 3, 6], [0, 1, 4], [0, 3], [0, 1, 6]):
        bounds, direct = keys + [n], 0.0
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            p = bounds[i - 1] if i else None
            total = torch.zeros(3, dtype=torch.float64)
            for j in range(a + 1, b):
                fc = f[a] if p is None else f[a] + min((j - a) / (a - p), 1.0) * (f[a] - f[p])   # clamp 1
                total += w[j] * (M[j] @ fc - out[j])
            direct += float((total ** 2).sum())
        assert plan_drift(cost, keys, n) == pytest.approx(direct), keys
    assert plan_drift(unclamped, [0, 1, 6], n) != pytest.approx(plan_drift(cost, [0, 1, 6], n)), "the clamp acts"


def test_forecast_drift_cost_is_the_forecast_feature_distance():
    from fasterdiffusion.calibrate import forecast_drift_costs
    g = torch.Generator().manual_seed(1)
    n = 6
    per_step = [[torch.randn(2, 3, generator=g), torch.randn(4, generator=g)] for _ in range(n)]
    cost = forecast_drift_costs(per_step, n, clamp=None)
    p, a, b = 1, 3, 6
    direct = 0.0
    for j in range(a + 1, b):
        r = (j - a) / (a - p)
        direct += sum(float(((fa + r * (fa - fp) - fj) ** 2).sum() / (fj ** 2).sum())
                      for fa, fp, fj in zip(per_step[a], per_step[p], per_step[j])) / 2
    assert cost[p + 1, a, b] == pytest.approx(direct, rel=1e-6)


def test_calibrate_plans_for_the_propagation_in_use(pack, digits):
    """Calibrate with propagation=forecast chooses keys by the forecast output error; run with forecast, its
    plan is closer to the full run than the plan calibrated for reuse, at the same number of keys."""
    import nodes
    import testmodel as tm
    from conftest import apply
    node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionCalibrate"]
    model, tok = digits
    pos, neg = tm.digit_conditioning(tok, [2, 7, 4, 1])
    latent = {"samples": torch.zeros(4, 4, 8, 8)}
    plans = {p: node.execute(model, 0, 20, 3.0, "euler", "normal", pos, neg, latent, 5, 0.0, propagation=p)
             for p in ("forecast", "reuse")}
    full = plans["forecast"][1]["samples"]
    assert torch.equal(full, plans["reuse"][1]["samples"])
    assert plans["forecast"][0] != plans["reuse"][0]
    err = {}
    for p, (strategy, _) in plans.items():
        assert len(make_plan(strategy, 20).keys) == 5
        m, _ = apply(pack, model, strategy, True, 0, propagation="forecast")
        err[p] = float(((tm.sample_digits(m, tok, [2, 7, 4, 1], seed=0, steps=20) - full) ** 2).mean())
    print(plans, err)
    assert err["forecast"] < err["reuse"]


def test_keys_with_other_feature_shapes_are_left_out():
    """A patch that resizes features during the run (deep shrink) leaves fewer usable keys: reuse, not a crash."""
    small = Features([torch.zeros(1, 2, 4, 4)], torch.zeros(1, 3, 2, 2))
    big = Features([torch.ones(1, 2, 8, 8)], torch.ones(1, 3, 4, 4))
    assert extrapolate(Forecast(1), [(0, small), (3, big)], 5) is big
    out = extrapolate(Forecast(2), [(0, small), (2, big), (3, Features([torch.full((1, 2, 8, 8), 2.0)], torch.full((1, 3, 4, 4), 2.0)))], 5)
    assert out.mid.flatten()[0].item() == pytest.approx(4.0)


@pytest.mark.parametrize("kind", ["controlnet", "t2i_adapter"])
def test_forecast_with_controlnet_reuse(pack, digits, kind):
    """ControlNet reuse keeps its semantics under forecast: one ControlNet forward per group (at its key step),
    parallel equals sequential, 'all' stays bit-identical, and the control still acts."""
    import test_controlnet as tc
    from conftest import apply
    import testmodel as tm
    model, tok = digits
    net = tc.MAKERS[kind]()
    conds = tc.controlled(tok, (net, 0.9, 0.0, 1.0))
    assert torch.equal(tc.run(apply(pack, model, "all", propagation="forecast")[0], conds), tc.run(model, conds))
    outs = {}
    for parallel in (True, False):
        fd, config = apply(pack, model, "uniform:4", parallel, 32, propagation="forecast")
        if kind == "controlnet":
            with tc.counting(model, tc.schedule(model)) as calls:
                outs[parallel] = tc.run(fd, conds)
            assert calls.steps(net.control_model) == list(range(0, tc.STEPS, 4)), "once per group"
        else:
            outs[parallel] = tc.run(fd, conds)
        assert config.reports[-1]["propagation"] == "forecast (order 1)"
    assert tc.rel(outs[True], outs[False]) < 1e-4
    base = tc.run(model, conds)
    reuse = tc.run(apply(pack, model, "uniform:4", propagation="reuse")[0], conds)
    print(f"\n{kind}: rel to the full run: forecast {tc.rel(outs[True], base):.4f}, reuse {tc.rel(reuse, base):.4f}")
    assert tc.rel(outs[True], tc.run(model, tm.digit_conditioning(tok, [3]))) > 1e-2, "the control acts"


def test_clamp_holds_the_forecast_at_a_multiple_of_the_key_spacing():
    history = [(0, feats(0.0, 0.0)), (2, feats(2.0, 2.0))]
    assert extrapolate(Forecast(1, clamp=1.0), history, 3).mid.item() == pytest.approx(3.0)      # inside: unchanged
    assert extrapolate(Forecast(1, clamp=1.0), history, 9).mid.item() == pytest.approx(4.0)      # held at 2 + 1 x 2
    assert extrapolate(Forecast(1, clamp=0.5), history, 9).mid.item() == pytest.approx(3.0)
    timesteps = torch.tensor([900.0, 800.0, 700.0, 600.0, 500.0, 100.0])    # a decreasing variable too
    assert extrapolate(Forecast(1, "timestep", clamp=1.0), history, 5, timesteps).mid.item() == pytest.approx(4.0)


def test_forecast_keeps_late_keys_img2img_and_two_pass_semantics(pack, digits):
    """Under forecast: a ControlNet starting inside a group still makes a late key step (and runs there, then
    once per group); img2img (denoise < 1) counts steps within its own run, parallel = sequential; a second
    sampling pass is a run of its own (its first group reuses: no history from the first pass)."""
    import test_controlnet as tc
    from conftest import apply
    import testmodel as tm
    model, tok = digits
    net = tm.digits_controlnet()
    first = tc.first_step(model, start=0.3)
    conds = tc.controlled(tok, (net, 1.0, 0.3, 1.0))
    fd, config = apply(pack, model, "uniform:4", True, 32, propagation="forecast")
    with tc.counting(model, tc.schedule(model)) as calls:
        tc.run(fd, conds)
    r = config.reports[-1]
    assert first % 4 and r["late_keys"] == [first] and r["propagation"] == "forecast (order 1)"
    assert calls.steps(net.control_model) == sorted(k for k in list(range(0, tc.STEPS, 4)) + [first] if k >= first)
    # img2img: ComfyUI runs the last 20 steps of a longer schedule (20 / 0.6 steps): steps count within the run
    latents = {}
    for parallel in (True, False):
        m, config = apply(pack, model, "uniform:3", parallel, 32, propagation="forecast")
        init = tm.sample_digits(model, tok, [6], seed=1, steps=8)
        latents[parallel] = tm.sample_digits(m, tok, [6], seed=2, steps=20, denoise=0.6, latent=init)
        assert config.reports[-1]["steps"] == 20 and config.reports[-1]["keys"] == list(range(0, 20, 3))
    assert ((latents[True] - latents[False]).norm() / latents[False].norm()).item() < 1e-4
    # two passes through one patched model: two runs, each with its own history
    m, config = apply(pack, model, "uniform:3", True, 32, propagation="forecast")
    once = tm.sample_digits(m, tok, [6], seed=2, steps=12)
    again = tm.sample_digits(m, tok, [6], seed=2, steps=12)
    assert torch.equal(once, again) and len(config.reports) == 2, "a run never sees the previous run's features"
