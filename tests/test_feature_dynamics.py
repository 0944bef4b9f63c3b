"""tools/feature_dynamics.py computes what its figure claims: relative change between adjacent steps."""
from __future__ import annotations

import sys
from importlib.util import module_from_spec, spec_from_file_location

import pytest
import torch

import testmodel as tm


@pytest.fixture(scope="module")
def dyn():
    sys.path.insert(0, str(tm.REPO / "tools"))
    spec = spec_from_file_location("feature_dynamics", tm.REPO / "tools" / "feature_dynamics.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def features(scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"in0": torch.randn(2, 3, 4, 4, generator=g) * scale, "in1": torch.randn(2, 5, 2, 2, generator=g) * scale,
            "mid": torch.randn(2, 5, 2, 2, generator=g) * scale, "out0": torch.randn(2, 3, 4, 4, generator=g) * scale,
            "final": torch.randn(2, 4, 4, 4, generator=g) * scale}


def test_identical_features_do_not_change(dyn):
    f = features()
    assert dyn.step_changes(f, {k: v.clone() for k, v in f.items()}) == \
        {"encoder": 0.0, "middle": 0.0, "decoder": 0.0, "output": 0.0}


def test_scaled_features_change_by_the_scale(dyn):
    prev = features()
    assert dyn.relative_change(prev["in0"], prev["in0"] * 1.5) == pytest.approx(0.5)
    assert dyn.relative_change(prev["in0"], -prev["in0"]) == pytest.approx(2.0)
    # each series is the mean of its tensors' own changes: in0 x1.1, in1 x2 -> encoder (0.1 + 1.0) / 2
    cur = dict(prev, in0=prev["in0"] * 1.1, in1=prev["in1"] * 2.0, mid=prev["mid"] * 0.5, out0=prev["out0"] * 1.25)
    got = dyn.step_changes(prev, cur)
    assert got["encoder"] == pytest.approx(0.55) and got["middle"] == pytest.approx(0.5)
    assert got["decoder"] == pytest.approx(0.25) and got["output"] == 0.0


def test_change_is_relative_to_the_earlier_step_and_thirds_average(dyn):
    a, b = features(seed=1)["in0"], features(seed=2)["in0"]
    assert dyn.relative_change(a, b) == pytest.approx(float((b - a).norm() / a.norm()))
    assert dyn.thirds([1, 1, 1, 2, 2, 2, 3, 3, 3]) == [1, 2, 3]


def test_the_hooks_read_every_block_of_a_real_run(dyn, digits, pack):
    """Per step i >= 1 one entry per series; the encoder series is the skips' change the ldm split makes."""
    model, tok = digits
    series = dyn.measure(model, lambda m: tm.sample_digits(m, tok, [3], steps=4), steps=4)
    assert {k: len(v) for k, v in series.items()} == {s: 3 for s in dyn.SERIES}
    assert all(v > 0 for vals in series.values() for v in vals)
