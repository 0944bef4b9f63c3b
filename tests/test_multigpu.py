"""ComfyUI 0.33's MultiGPU CFG split (comfy_extras/nodes_multigpu.py) served: the node's device clones each run their
cond chunks in a thread of their own, and each device keeps its own run state (``Run.for_device``), so no device is
served features another computed.  Driven on the CPU: the host's device list is made to name several CPU devices
(``cpu``, ``cpu:0``, ``cpu:1`` are distinct device keys there) and the test model gets the loader factory the node
deep-clones from; everything else is the host's own threaded code path."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

import testmodel as tm
from conftest import apply
from test_compat import DIGITS, KEYS, ksampler


@pytest.fixture
def devices(monkeypatch):
    """Make the host see ``n`` CPU devices; returns a function giving the MultiGPU CFG split of a model over them."""
    pytest.importorskip("comfy.multigpu", reason="ComfyUI 0.33's MultiGPU CFG split (not in this host)")
    import comfy.model_management as mm
    from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode
    listed = []
    monkeypatch.setattr(mm, "get_all_torch_devices", lambda exclude_current=False: [
        d for d in listed if not (exclude_current and d == mm.get_torch_device())])

    def split(model, n):
        listed[:] = [torch.device("cpu")] + [torch.device("cpu", i) for i in range(n - 1)]
        # the node walks the loaded models and reads each one's ModelPatcher, which is None for an entry whose patcher
        # is gone while its model is still referenced (an earlier test's; ComfyUI 0.33's create_multigpu_deepclones
        # does not skip those): they are dropped from the list, as ComfyUI drops them once their model is collected
        mm.cleanup_models_gc()
        mm.cleanup_models()
        mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.model is not None]
        base = model.clone()
        base.cached_patcher_init = (lambda: tm.load_test_model()[0], ())   # what the node deep-clones from
        out = MultiGPUCFGSplitNode.execute(base, n).result[0]
        assert len(out.get_additional_models_with_key("multigpu")) == n - 1
        return out
    return split


@pytest.fixture
def threads_of_runs(pack, monkeypatch):
    """Run object -> the threads that called its ``forward``."""
    seen = {}
    forward = pack.runtime.Run.forward

    def spy(self, *args, **kwargs):
        seen.setdefault(id(self), set()).add(threading.current_thread().name)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(pack.runtime.Run, "forward", spy)
    return seen


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("order", ["split, then Apply", "Apply, then split"])
def test_each_device_serves_its_own_cond_chunks(pack, digits, devices, threads_of_runs, caplog, order):
    """Two devices: cond on one, uncond on the other, each in its own thread with its own run state; the run is served
    (each device's encoder ran at the key steps only) and equals the single-device FasterDiffusion run to float noise
    (each device computes a batch of one chunk), the same bits run after run; one stats line says so."""
    model, tok = digits
    pos, neg = tm.digit_conditioning(tok, DIGITS)
    single, single_config = apply(pack, model, KEYS)
    want = ksampler(single, pos, neg)
    if order == "split, then Apply":
        fd, config = apply(pack, devices(model, 2), KEYS)
    else:
        patched, config = apply(pack, model, KEYS)
        fd = devices(patched, 2)
    threads_of_runs.clear()
    with caplog.at_level(logging.INFO):
        caplog.clear()
        got = ksampler(fd, pos, neg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FasterDiffusion [")]
    r, one = config.reports[-1], single_config.reports[-1]
    assert len(lines) == 1 and "MultiGPU: each of 2 devices kept its own caches" in lines[0], lines
    assert r["devices"] == ["cpu", "cpu:0"] and not r.get("bypassed")
    assert (r["encoder_calls"], r["cached_calls"]) == (2 * one["encoder_calls"], 2 * one["cached_calls"]), (r, one)
    assert len(threads_of_runs) == 2 and all(len(t) == 1 for t in threads_of_runs.values()), threads_of_runs
    assert rel(got, want) < 1e-5, rel(got, want)
    assert torch.equal(ksampler(fd, pos, neg), got)


def test_a_cond_chunk_that_moves_between_devices_is_never_served_another_devices_features(pack, digits, devices,
                                                                                          threads_of_runs):
    """Three devices and a prompt that starts at 50%: from then on the chunks land on other devices than before. Each
    device's run stays in its own thread, a chunk new to a device runs in full there (counted as a fallback), and the
    result is the single-device run's to float noise."""
    model, tok = digits
    pos, neg = tm.digit_conditioning(tok, DIGITS)
    late = torch.stack([tok[7] for _ in DIGITS])
    pos = [[late, {"start_percent": 0.5}], pos[0]]
    single, _ = apply(pack, model, KEYS)
    want = ksampler(single, pos, neg)
    fd, config = apply(pack, devices(model, 3), KEYS)
    threads_of_runs.clear()
    got = ksampler(fd, pos, neg)
    r = config.reports[-1]
    assert len(r["devices"]) == 3 and r["cached_calls"] > 0 and r["fallback_calls"] > 0, r
    assert len(threads_of_runs) == 3 and all(len(t) == 1 for t in threads_of_runs.values()), threads_of_runs
    assert rel(got, want) < 1e-5, rel(got, want)


def test_without_the_split_the_model_keeps_one_run(pack, digits, threads_of_runs):
    model, tok = digits
    fd, config = apply(pack, model, KEYS)
    threads_of_runs.clear()
    ksampler(fd, *tm.digit_conditioning(tok, DIGITS))
    assert "devices" not in config.reports[-1] and len(threads_of_runs) == 1


def test_a_controlnet_runs_at_every_step_on_each_device(pack, digits, devices):
    """A ControlNet under the split: ComfyUI makes one per device, each computing its device's residuals, so the key
    step's residuals are not reused (``controlnet_reuse`` stays out; the stats say the ControlNet's steps decode one at
    a time): the result is the single-device run's without reuse, to float noise."""
    import nodes
    model, tok = digits
    pos, neg = tm.digit_conditioning(tok, DIGITS)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, tm.digits_controlnet(), hint, 1.0, 0.0, 1.0)
    single, _ = apply(pack, model, KEYS, controlnet_reuse=False)
    want = ksampler(single, pos, neg)
    fd, config = apply(pack, devices(model, 2), KEYS)            # controlnet_reuse on, as by default
    got = ksampler(fd, pos, neg)
    r = config.reports[-1]
    assert len(r["devices"]) == 2 and r["cached_calls"] > 0 and "ControlNet" in r.get("parallel_off", ""), r
    assert rel(got, want) < 1e-5, rel(got, want)
