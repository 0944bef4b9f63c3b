"""Calibration drift is the measured feature change, not any matrix: exact on known features, and on the
real host the recorded features are the encoder's own."""
from __future__ import annotations

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
    cal = import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".comfy_calibrate")
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
