"""The runtime's contract, checked against any UNet adapter with a simulated k-diffusion sampler.

For random schedules, strategies, batch shapes, split or batched CFG, guidance passes, Heun-type
correctors, off-schedule midpoints, ``parallel`` and the memory cap, every model call must be served
either in full or by the features of its own call slot (and occurrence) from its own group's key step,
decoded at its own step's timestep and sigma; a non-key step never reads its latent; no batched decoder
call is wider than the cap.  The fake adapter makes every output row say which latent and which step
reached it; the ldm adapter runs the same loop on ComfyUI's real UNetModel (no sampler, no host run).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fasterdiffusion.runtime import Features, ModelCall, Outcome, Run
from fasterdiffusion.settings import Settings
from fasterdiffusion.strategy import parse_strategy


class FakeAdapter:
    """Features are the latent itself; a decoder row is (feature value, its timestep, its sigma)."""

    def __init__(self):
        self.encoded, self.decoded_widths = 0, []

    def embed(self, call):
        return call.timesteps.clone()

    def encode(self, call, emb):
        self.encoded += 1
        return Features([call.x.clone()], call.x.clone())

    def decode(self, call, features, emb):
        self.decoded_widths.append(call.rows)
        return torch.stack([features.mid[:, 0], emb, call.sigmas], dim=1)

    def tile(self, call, n, timesteps, sigmas):
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas)

    def own_step_reason(self, call):
        return None


def fake_full(call):
    return torch.stack([call.x[:, 0], call.timesteps, call.sigmas], dim=1)


def schedule(n, seed):
    g = torch.Generator().manual_seed(seed)
    gaps = torch.rand(n, generator=g) + 0.05        # distinct steps: match_step tells sigmas 1e-4 apart as one
    sig = (torch.cumsum(gaps, 0).flip(0) / gaps.sum() * 14 + 0.03).tolist() + [0.0]
    return sig, [1000 * s / (1 + s) for s in sig]


def simulate(run, adapter, full, sigmas, timesteps, make_x, slots, passes, corrector, midpoints, absent=None):
    """A k-diffusion-like loop: per step an evaluation at sigma_i (each slot, then ``passes`` guidance
    passes of slot 0), optionally a Heun corrector at sigma_{i+1} and an off-schedule midpoint.
    ``absent(slot)`` True leaves that slot out of an evaluation (a cond with a timestep range, a
    memory split that changes).  Returns [(step, slot key, occurrence, call, output)]."""
    log = []

    def evaluate(sigma, t):
        run.begin_evaluation()
        occ = {}
        for slot in list(slots) + [slots[0]] * passes:
            if absent is not None and absent(slot):
                continue
            x = make_x()
            call = ModelCall(x, torch.full((x.shape[0],), t), None, torch.full((x.shape[0],), sigma), x.dtype, slot)
            out = run.forward(adapter, call, run.step_of(sigma), lambda c=call: full(c))
            log.append((run.step_of(sigma), slot, occ.get(slot, 0), call, out))
            occ[slot] = occ.get(slot, 0) + 1

    n = len(sigmas) - 1
    for i in range(n):
        evaluate(sigmas[i], timesteps[i])
        if midpoints and i + 1 < n:
            evaluate((sigmas[i] + sigmas[i + 1]) / 2, (timesteps[i] + timesteps[i + 1]) / 2)
        if corrector and i + 1 < n:
            evaluate(sigmas[i + 1], timesteps[i + 1])
    return log


def check_log(run, log, reference, full):
    """Each call: full (key step alone in its group, off schedule, 'all') or served by the latest key-step
    features of its own (slot, occurrence) in its own group."""
    plan = run.plan
    key_calls = {}      # (slot, occurrence) -> (group, the key step's call)
    for step, slot, occ, call, out in log:
        if step is None:
            torch.testing.assert_close(out, full(call), msg="off-schedule calls run in full")
            continue
        group = plan.group_of(step)
        if step == group[0]:
            if len(group) > 1:
                key_calls[(slot, occ)] = (group, call)
            torch.testing.assert_close(out, full(call), rtol=1e-4, atol=1e-5)
            continue
        source = key_calls.get((slot, occ))
        if source is None or source[0] != group:     # its slot missed this group's key step: full
            torch.testing.assert_close(out, full(call), msg="a non-key call without its own key features")
            continue
        torch.testing.assert_close(out, reference(source[1], call), rtol=1e-4, atol=1e-5)


def fake_reference(key_call, call):
    return torch.stack([key_call.x[:, 0], call.timesteps, call.sigmas], dim=1)


strategies = st.one_of(st.sampled_from(["paper", "all"]), st.integers(1, 6).map(lambda k: f"uniform:{k}"),
                       st.sets(st.integers(1, 40), max_size=8).map(lambda s: ",".join(map(str, sorted({0} | s)))))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), strategy=strategies, rows=st.integers(1, 3), split=st.booleans(),
       passes=st.integers(0, 1), corrector=st.booleans(), midpoints=st.booleans(), parallel=st.booleans(),
       cap=st.sampled_from([0, 1, 2, 3, 5, 8, 32]), gaps=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_every_call_is_served_by_its_own_slot_and_group(n, strategy, rows, split, passes, corrector, midpoints,
                                                        parallel, cap, gaps, seed):
    sigmas, timesteps = schedule(n, seed)
    run = Run(Settings(parse_strategy(strategy), parallel, cap, propagation="reuse"), sigmas, timesteps)
    adapter = FakeAdapter()
    g = torch.Generator().manual_seed(seed)
    slots = [("cond",), ("uncond",)] if split else [("cond", "uncond")]
    absent = (lambda slot: bool(torch.rand(1, generator=g) < 0.3)) if gaps else None
    log = simulate(run, adapter, fake_full, sigmas, timesteps, lambda: torch.randn(rows, 1, generator=g),
                   slots, passes, corrector, midpoints, absent)
    check_log(run, log, fake_reference, fake_full)
    stats = run.finish()
    if cap > 0:
        assert max(adapter.decoded_widths, default=0) <= max(1, cap // rows) * rows
    if strategy == "all":
        assert adapter.encoded == 0 and stats["cached_calls"] == 0
    if parallel and not corrector and not midpoints and passes == 0 and not gaps:   # one evaluation a step
        keys_with_groups = sum(len(grp) > 1 for grp in run.plan.groups)
        assert stats["encoder_calls"] == keys_with_groups * len(slots)
        assert sum(stats["decoder_batches"]) == sum(len(grp) for grp in run.plan.groups if len(grp) > 1) * len(slots)
    assert not run.groups and not run.history and not run.outputs, "finish drops the caches"


def test_outcomes_of_one_group():
    sigmas, timesteps = schedule(6, 0)
    run = Run(Settings(parse_strategy("0,3,5"), propagation="reuse"), sigmas, timesteps)
    adapter, x = FakeAdapter(), torch.randn(2, 1)
    call = lambda i: ModelCall(x, torch.full((2,), timesteps[i]), None, torch.full((2,), sigmas[i]), x.dtype, "s")
    seen = []
    for i in range(6):
        run.begin_evaluation()
        slot = (call(i).slot, 0)
        seen.append(run.decide(i, slot))
        run.forward(adapter, call(i), i, lambda i=i: fake_full(call(i)))
    assert seen == [Outcome.KEY, Outcome.SERVED, Outcome.SERVED, Outcome.KEY, Outcome.SERVED, Outcome.FULL]
    run.begin_evaluation()
    assert run.decide(4, ("other", 0)) is Outcome.NO_FEATURES and run.decide(None, ("s", 0)) is Outcome.OFF_SCHEDULE


# ------------------------------------------------------------------------------ the same contract, real UNet

def test_ldm_adapter_keeps_the_contract(pack, digits):
    """The simulated sampler on the trained digits UNet through the ComfyUI adapter: every non-key output
    equals the adapter's decoder on its key step's features at its own timestep."""
    ldm = pack.ldm
    runtime = pack.runtime
    unet = digits[0].model.diffusion_model
    adapter = ldm.LdmUNetAdapter(unet)
    ctx = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    sigmas, timesteps = schedule(8, 3)

    def as_ldm(call):
        return ldm.make_call(call.x, call.timesteps, ctx[:call.rows], None, None, {"sigmas": call.sigmas}, {},
                             call.slot)

    def full(call):
        return unet(call.x, call.timesteps, ctx[:call.rows], None, None, {})

    def reference(key_call, call):
        k, c = as_ldm(key_call), as_ldm(call)
        return adapter.decode(c, adapter.encode(k, adapter.embed(k)), adapter.embed(c))

    class Ldm:   # the runtime's ModelCall -> the adapter's own call, as the ComfyUI glue builds it
        embed = lambda self, call: adapter.embed(call if isinstance(call.host, ldm.LdmCall) else as_ldm(call))
        encode = lambda self, call, emb: adapter.encode(as_ldm(call), emb)
        decode = lambda self, call, f, emb: adapter.decode(call if isinstance(call.host, ldm.LdmCall) else as_ldm(call), f, emb)
        tile = lambda self, call, n, t, s: adapter.tile(as_ldm(call), n, t, s)
        own_step_reason = lambda self, call: None

    with torch.no_grad():
        for parallel, cap in ((True, 0), (True, 4), (False, 0)):
            settings = runtime.Settings(parse_strategy("0,1,4"), parallel, cap, propagation="reuse")
            run = runtime.Run(settings, sigmas, timesteps)
            log = simulate(run, Ldm(), full, sigmas, timesteps, lambda: torch.randn(2, 4, 8, 8, generator=g),
                           [("cond", "uncond")], passes=1, corrector=False, midpoints=True)
            check_log(run, log, reference, full)
            assert run.finish()["cached_calls"] == 5 * 2
