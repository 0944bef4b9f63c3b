"""Calibration drift is the measured feature change, not any matrix: exact on known features, and on the
real host the recorded features are the encoder's own."""
from __future__ import annotations

import pytest
import torch

from fasterdiffusion.drift import DriftRecorder, feature_drift, pool
from fasterdiffusion.runtime import Features


def test_drift_is_the_relative_squared_change():
    base = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.ones(2, 5, 2, 2)]
    per_step = [[t * (j + 1) for t in base] for j in range(4)]      # step j: (j+1) * f
    drift = feature_drift(per_step)
    for j in range(4):
        for a in range(4):
            want = ((j - a) / (j + 1)) ** 2 if a < j else 0.0         # |(j+1)f - (a+1)f|^2 / |(j+1)f|^2
            assert abs(drift[a][j] - want) < 1e-6, (a, j)


def test_recorder_pools_each_chunk_and_concatenates_in_chunk_order():
    rec = DriftRecorder(2)
    f = lambda v: Features([torch.full((1, 2, 32, 32), v)], torch.full((1, 4, 8, 8), v))
    for step, cond, uncond in ((0, 1.0, 2.0), (1, 3.0, 2.0)):
        rec.record(step, (("u",), (1,)), f(uncond))
        rec.record(step, (("c",), (0,)), f(cond))
    assert rec.steps[0][(("c",), (0,))][0].shape == (1, 2, 16, 16), "pooled to 16x16"
    drift = rec.drift()
    # step 1 vs 0: cond 1 -> 3, uncond 2 -> 2, per tensor |diff|^2 / |f_1|^2 over the two chunks together
    want = (4 / (9 + 4))
    assert abs(drift[0][1] - want) < 1e-6 and drift[1][0] == 0.0


def test_host_recorder_keeps_the_encoders_features(pack, digits):
    """The calibration wrapper records exactly the (pooled) features the ldm adapter's encoder makes."""
    from importlib import import_module
    import comfy.samplers
    import testmodel as tm
    cal = import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".calibrate")
    model, tok = digits
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    seen = []

    def first_input(executor, x, t, ctx, y, control, to, **kw):
        seen.append((x.clone(), t.clone(), ctx.clone()))
        return executor(x, t, ctx, y, control, to, **kw)

    import comfy.patcher_extension
    probed = model.clone()     # registered first: outside the recorder's wrapper
    probed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "first", first_input)
    rec_model, rec = cal.recording_model(probed, sigmas.tolist())
    tm.sample_digits(rec_model, tok, [2], steps=4)
    x, t, ctx = seen[0]
    adapter = pack.ldm.LdmUNetAdapter(model.model.diffusion_model)
    call = pack.ldm.make_call(x, t, ctx, None, None, {}, {})
    with torch.no_grad():
        feats = adapter.encode(call, adapter.embed(call))
    recorded = torch.cat(list(rec.steps[0].values())[0][-1:])      # the middle output, one chunk (batched CFG)
    assert torch.allclose(recorded, pool(feats.mid), atol=1e-6)


class ToyAdapter:
    """A UNet whose features are its input and whose decoder output is mid * t + skip: stale features of step
    a change step j's output by exactly (2 t_j + 1) (x_a - x_j)."""

    def embed(self, call):
        return call.timesteps

    def encode(self, call, emb):
        return Features([call.x.clone()], call.x * 2)

    def decode(self, call, feats, emb):
        return feats.mid * emb.view(-1, 1, 1, 1) + feats.skips[0]

    def tile(self, call, n, timesteps, sigmas):
        from dataclasses import replace
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas)

    def own_step_reason(self, call):
        return None


def toy_run(n, weights, max_decoder_batch=64):
    from fasterdiffusion.runtime import ModelCall
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 1, 2, 2, generator=g) * (1 + j) for j in range(n)]
    ts = [float(n - j) for j in range(n)]
    rec = DriftRecorder(n, stale_outputs=True, step_weights=weights)
    rec.max_decoder_batch = max_decoder_batch
    for j in range(n):
        call = ModelCall(xs[j], torch.full((2,), ts[j]), None, None, torch.float32)
        out = rec.forward(ToyAdapter(), call, j, ("c",))
        assert torch.equal(out, xs[j] * 2 * ts[j] + xs[j]), "the fresh output is returned"
    return rec, xs, ts


def test_output_error_optimum_is_the_brute_force_one():
    """The key steps chosen on output_error() minimise the summed squared latent error of each group, where
    a group's error is |sum over its steps of w_j^0.5 (out_j(stale) - out_j(fresh))|^2 (errors add coherently)."""
    from itertools import combinations
    from fasterdiffusion import choose_keys, plan_drift
    n = 8
    weights = [0.5 + (j % 3) for j in range(n)]
    rec, xs, ts = toy_run(n, weights)

    def group_error(a, b):
        total = sum((weights[j] ** 0.5 * (2 * ts[j] + 1) * (xs[a] - xs[j]) for j in range(a + 1, b)),
                    torch.zeros_like(xs[0]))
        return float((total ** 2).sum())

    def plan_error(keys):
        bounds = list(keys) + [n]
        return sum(group_error(a, b) for a, b in zip(bounds, bounds[1:]))

    err = rec.output_error()
    for k in (2, 3, 4):
        best = min(((0,) + rest for rest in combinations(range(1, n), k - 1)), key=plan_error)
        chosen = choose_keys(err, n, k)
        assert plan_drift(err, chosen, n) == pytest.approx(plan_error(chosen), rel=1e-5)
        assert plan_error(chosen) == pytest.approx(plan_error(best), rel=1e-6), (k, chosen, best)
    per_step = rec.output_error(coherent=False)
    assert per_step[1][4] == pytest.approx(weights[4] * float((((2 * ts[4] + 1) * (xs[1] - xs[4])) ** 2).sum()))
    assert rec.output_error(coherent=False) != err, "the two forms differ where groups hold several steps"


def flat(matrix):
    return [v for row in matrix for v in row]


def test_stale_decodes_batch_exactly_and_a_repeated_step_replaces_the_first():
    n = 6
    one_by_one = toy_run(n, None, max_decoder_batch=2)[0].output_error()      # 2 rows per call: one stale step per call
    assert flat(toy_run(n, None)[0].output_error()) == pytest.approx(flat(one_by_one), rel=1e-6)
    # a Heun-type corrector calls step 3 before step 3 itself: the later call counts, once
    from fasterdiffusion.runtime import ModelCall
    rec, xs, ts = toy_run(n, None)
    again = DriftRecorder(n, stale_outputs=True)
    for j in (0, 1, 2, 3, 3, 4, 5):
        x = xs[j] * (0.5 if j == 3 and 3 not in again.steps else 1.0)    # the first call of 3 sees another latent
        again.forward(ToyAdapter(), ModelCall(x, torch.full((2,), ts[j]), None, None, torch.float32), j, ("c",))
    assert flat(again.output_error()) == pytest.approx(flat(rec.output_error()), rel=1e-6)


def test_output_error_needs_the_stale_pass():
    with pytest.raises(RuntimeError, match="stale_outputs=True"):
        DriftRecorder(2).output_error()
