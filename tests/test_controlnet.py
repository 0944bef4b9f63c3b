"""ControlNet at non-key steps (controlnet_reuse) in real ComfyUI 0.3.75: random-weight ControlNet, T2I-Adapter
and Control-LoRA built from ComfyUI's classes, applied with ComfyUI's ControlNetApplyAdvanced node."""
from __future__ import annotations

import logging

import pytest
import torch

import testmodel as tm
from conftest import apply as apply_node


def apply(pack, model, strategy="paper", *args, **kwargs):
    """The Apply node with ``propagation="reuse"``: these tests compare non-key steps with the key step's own
    features and residuals (ControlNet under forecast propagation: tests/test_forecast.py)."""
    return apply_node(pack, model, strategy, *args, **{"propagation": "reuse", **kwargs})

STEPS = 20
PAPER_KEYS = [0, 1, 2, 3, 5, 10, 15]      # paper at 20 steps: groups [0] [1] [2] [3,4] [5..9] [10..14] [15..19]
HINT = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
MAKERS = {"controlnet": tm.digits_controlnet, "t2i_adapter": tm.digits_t2i_adapter, "control_lora": tm.digits_control_lora}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def controlled(tok, *nets, digit=3):
    """CONDITIONING with ``nets`` = (control, strength, start, end) chained by ControlNetApplyAdvanced."""
    import nodes
    pos, neg = tm.digit_conditioning(tok, [digit])
    for net, strength, start, end in nets:
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, net, HINT, strength, start, end)
    return pos, neg


def run(model, conds, steps=STEPS, **kw):
    import comfy.sample
    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), steps, 3.0, "euler", "normal",
                               *conds, latent, seed=0, disable_pbar=True, **kw)


def schedule(model, steps=STEPS):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).tolist()


def step_of(sigmas, sigma):
    return min(range(len(sigmas) - 1), key=lambda i: abs(sigmas[i] - sigma))


class ControlCalls:
    """Every forward of a ControlNet / T2I-Adapter module: (module, sigma step or None), via torch's global
    module hooks (the Control-LoRA builds its module inside the run).  Also keeps each ControlNet's middle
    residual per step (before strength)."""

    def __init__(self, sigmas):
        import comfy.cldm.cldm
        import comfy.t2i_adapter.adapter
        self.kinds = (comfy.cldm.cldm.ControlNet, comfy.t2i_adapter.adapter.Adapter)
        self.sigmas, self.calls, self.middle = sigmas, [], {}

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, module, args, kwargs, out):
        if isinstance(module, self.kinds):
            t = kwargs.get("timesteps")
            step = None if t is None else self.step_of_timestep(module, float(t[0]))
            self.calls.append((module, step))
            if step is not None and isinstance(out, dict) and out.get("middle"):
                self.middle[(id(module), step)] = out["middle"][0].detach().clone()

    def step_of_timestep(self, module, timestep):
        ms = self.model_sampling
        return step_of([float(ms.timestep(torch.tensor(s))) for s in self.sigmas], timestep)

    def steps(self, module=None):
        return [s for m, s in self.calls if module is None or m is module]


def counting(model, sigmas):
    calls = ControlCalls(sigmas)
    calls.model_sampling = model.get_model_object("model_sampling")
    return calls


def recording(model, sigmas):
    """A clone of ``model`` with an output_block_patch recording, per schedule step, what output block 0
    receives: the middle block's output plus the middle residuals of the ControlNets active at that step
    (the first row of each step).  A function, not an object: ComfyUI deep-copies patch objects."""
    seen = {}

    def block0(h, hsp, to):
        if to["block"][1] == 0:
            per_row = to["sigmas"].repeat(h.shape[0] // to["sigmas"].shape[0])
            for row in range(0, h.shape[0], 2):          # CFG: rows come in (cond, uncond) pairs per step
                seen.setdefault(step_of(sigmas, float(per_row[row])), h[row].clone())
        return h, hsp

    m = model.clone()
    m.set_model_output_block_patch(block0)
    return m, seen


def first_step(model, start=None, end=None):
    """The first schedule step a ControlNet starting at ``start`` is on at, or ending at ``end`` is off at
    (ComfyUI's test in get_control, on float32 sigmas)."""
    ms = model.get_model_object("model_sampling")
    sigmas = [torch.tensor([s]) for s in schedule(model)[:-1]]
    if start is not None:
        return next(i for i, s in enumerate(sigmas) if not s > ms.percent_to_sigma(start))
    return next(i for i, s in enumerate(sigmas) if s < ms.percent_to_sigma(end))


# ------------------------------------------------------------------------------------------------ the node

def test_nodes_take_controlnet_reuse_as_an_optional_input(pack):
    import nodes
    for name in ("FasterDiffusionApply", "FasterDiffusionSampler", "FasterDiffusionKSampler"):
        spec = nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        kind, opts = spec["optional"]["controlnet_reuse"]
        assert kind == "BOOLEAN" and opts["default"] is True and "ControlNet" in opts["tooltip"], name
        assert "controlnet_reuse" not in spec["required"], "saved workflows without it must keep loading"


# ------------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("kind", list(MAKERS))
def test_strategy_all_is_bit_identical(pack, digits, kind):
    model, tok = digits
    conds = controlled(tok, (MAKERS[kind](), 0.8, 0.0, 0.7))
    base = run(model, conds)
    for reuse in (True, False):
        assert torch.equal(run(apply(pack, model, "all", controlnet_reuse=reuse)[0], conds), base), reuse


def test_two_stacked_controlnets_all_is_bit_identical(pack, digits):
    model, tok = digits
    conds = controlled(tok, (tm.digits_controlnet(1), 0.7, 0.0, 0.5), (tm.digits_controlnet(2), 1.3, 0.1, 1.0))
    assert torch.equal(run(apply(pack, model, "all")[0], conds), run(model, conds))


# ------------------------------------------------------------------------------------------------ reuse

@pytest.mark.parametrize("parallel", [True, False])
def test_controlnet_runs_once_per_group_and_decoders_batch(pack, digits, parallel):
    model, tok = digits
    net = tm.digits_controlnet()
    conds = controlled(tok, (net, 1.0, 0.0, 1.0))
    sigmas = schedule(model)
    counts = {}
    for reuse in (True, False):
        fd, config = apply(pack, model, "paper", parallel=parallel, controlnet_reuse=reuse)
        with counting(model, sigmas) as calls:
            run(fd, conds)
        counts[reuse] = (calls.steps(net.control_model), config.reports[-1])
    steps, r = counts[True]
    assert steps == PAPER_KEYS, "one ControlNet forward per group, at its key step"
    assert r["decoder_batches"] == ([2, 5, 5, 5] if parallel else [1, 1, 1, 1])    # as without a ControlNet
    assert "parallel_off" not in r
    steps, r = counts[False]
    assert steps == list(range(STEPS)) and r["decoder_batches"] == [1, 1, 1, 1]
    assert ("ControlNet" in r.get("parallel_off", "")) == parallel


def test_reused_residuals_vs_fresh(pack, digits):
    """The paper's approximation: how far reusing the key step's residuals lands from fresh ones (printed);
    the ControlNet's effect stays: reuse is far from the run without a ControlNet."""
    model, tok = digits
    conds = controlled(tok, (tm.digits_controlnet(), 1.0, 0.0, 1.0))
    base = run(model, conds)
    reused = run(apply(pack, model, "paper")[0], conds)
    fresh = run(apply(pack, model, "paper", controlnet_reuse=False)[0], conds)
    no_cn = run(apply(pack, model, "paper")[0], tm.digit_conditioning(tok, [3]))
    print(f"\nrel to the full run: reuse {rel(reused, base):.4f}, fresh {rel(fresh, base):.4f}; "
          f"reuse vs fresh {rel(reused, fresh):.4f}; reuse vs no ControlNet {rel(reused, no_cn):.4f} "
          f"(the ControlNet's own effect: {rel(base, run(model, tm.digit_conditioning(tok, [3]))):.4f})")
    assert torch.isfinite(reused).all()
    assert rel(reused, no_cn) > 0.5 * rel(base, run(model, tm.digit_conditioning(tok, [3])))
    assert rel(reused, fresh) > 1e-4, "reuse really reuses"


@pytest.mark.parametrize("kind", list(MAKERS))
def test_parallel_matches_sequential_with_reuse(pack, digits, kind):
    model, tok = digits
    conds = controlled(tok, (MAKERS[kind](), 0.9, 0.0, 0.6))
    seq_m, seq_c = apply(pack, model, "paper", parallel=False)
    par_m, par_c = apply(pack, model, "paper", parallel=True, max_decoder_batch=6)
    seq, par = run(seq_m, conds), run(par_m, conds)
    assert rel(par, seq) < 1e-4
    assert par_c.reports[-1]["decoder_batches"] == [2, 3, 2, 3, 2, 3, 2]       # 6 rows: 3 steps x CFG
    assert rel(par, run(model, tm.digit_conditioning(tok, [3]))) > 1e-2, "the control acts"


def test_non_key_steps_get_the_key_steps_residuals_and_end_percent_holds(pack, digits):
    """Output block 0 receives middle + the middle residuals of the ControlNets active at that step.  Within a
    group it is the key step's exactly while the ControlNet is on; after its end_percent it lacks exactly the
    key step's residual; and the ControlNet runs only at key steps before its end."""
    model, tok = digits
    net = tm.digits_controlnet()
    end = 0.6
    conds = controlled(tok, (net, 0.8, 0.0, end))
    sigmas = schedule(model)
    off = first_step(model, end=end)
    group = next(g for g in (range(5, 10), range(10, 15), range(15, 20)) if g.start < off < g.stop)
    rec_model, seen = recording(model, sigmas)
    fd, config = apply(pack, rec_model, "paper")
    with counting(model, sigmas) as calls:
        run(fd, conds)
    assert calls.steps(net.control_model) == [k for k in PAPER_KEYS if k < off]
    key = group.start
    for s in group[1:]:
        if s < off:
            assert torch.equal(seen[s], seen[key]), f"step {s} reuses key {key}'s residual"
        else:
            residual = 0.8 * calls.middle[(id(net.control_model), key)][0]
            assert torch.allclose(seen[key] - seen[s], residual, atol=1e-5), f"step {s}: no residual"
    later = [g for g in (range(10, 15), range(15, 20)) if g.start >= off]
    for g in later:                                           # groups keyed after the end: no ControlNet at all
        assert all(torch.equal(seen[s], seen[g.start]) for s in g)


def test_two_stacked_controlnets_each_keep_their_own_range(pack, digits):
    """ControlNetApplyAdvanced twice chains them (set_previous_controlnet).  A (strength 0.7) ends inside a group,
    B (strength 1.3) runs throughout: after A's end the steps of that group lack exactly A's residual."""
    model, tok = digits
    a, b = tm.digits_controlnet(1), tm.digits_controlnet(2)
    end = 0.6
    conds = controlled(tok, (a, 0.7, 0.0, end), (b, 1.3, 0.0, 1.0))
    assert conds[0][0][1]["control"].previous_controlnet is not None
    sigmas = schedule(model)
    off = first_step(model, end=end)
    assert off not in PAPER_KEYS, off
    rec_model, seen = recording(model, sigmas)
    fd, config = apply(pack, rec_model, "paper")
    with counting(model, sigmas) as calls:
        out = run(fd, conds)
    assert calls.steps(a.control_model) == [k for k in PAPER_KEYS if k < off]
    assert calls.steps(b.control_model) == PAPER_KEYS
    assert config.reports[-1]["decoder_batches"] == [2, 5, 5, 5]
    key = max(k for k in PAPER_KEYS if k < off)
    for s in range(key + 1, min(k for k in PAPER_KEYS + [STEPS] if k > key)):
        if s >= off:
            residual = 0.7 * calls.middle[(id(a.control_model), key)][0]
            assert torch.allclose(seen[key] - seen[s], residual, atol=1e-5), s
        else:
            assert torch.equal(seen[s], seen[key]), s
    only_b = run(apply(pack, model, "paper")[0], controlled(tok, (b, 1.3, 0.0, 1.0)))
    assert rel(out, only_b) > 1e-3, "A contributes before its end"


def test_controlnet_starting_inside_a_group_makes_a_key_step(pack, digits, caplog):
    model, tok = digits
    net = tm.digits_controlnet()
    start = 0.3
    first = first_step(model, start=start)
    assert first not in PAPER_KEYS, first
    conds = controlled(tok, (net, 1.0, start, 1.0))
    sigmas = schedule(model)
    rec_model, seen = recording(model, sigmas)
    fd, config = apply(pack, rec_model, "paper")
    with caplog.at_level(logging.INFO), counting(model, sigmas) as calls:
        run(fd, conds)
    r = config.reports[-1]
    assert r["late_keys"] == [first] and first in r["keys"]
    assert calls.steps(net.control_model) == sorted(k for k in PAPER_KEYS + [first] if k >= first)
    assert sum("starts inside a group" in rec.getMessage() for rec in caplog.records) == 1
    old_key = max(k for k in PAPER_KEYS if k < first)
    assert all(torch.equal(seen[s], seen[old_key]) for s in range(old_key, first)), "no residual yet"


def test_a_control_class_it_does_not_know_runs_every_step(pack, digits, caplog):
    """A pack's own control class (per-step keyframes, masks ...) is never reused: fresh every step, one log line."""
    import comfy.controlnet
    model, tok = digits

    class KeyframedControlNet(comfy.controlnet.ControlNet):
        def copy(self):              # as ControlNetSD35 does: the apply node's copy keeps the class
            c = KeyframedControlNet(None, load_device=self.load_device, manual_cast_dtype=self.manual_cast_dtype)
            c.control_model, c.control_model_wrapped = self.control_model, self.control_model_wrapped
            self.copy_to(c)
            return c

    plain = tm.digits_controlnet()
    net = KeyframedControlNet(plain.control_model, load_device=plain.load_device)
    conds = controlled(tok, (net, 1.0, 0.0, 1.0))
    fd, config = apply(pack, model, "paper")
    with caplog.at_level(logging.WARNING), counting(model, schedule(model)) as calls:
        out = run(fd, conds)
    assert calls.steps(net.control_model) == list(range(STEPS))
    assert torch.equal(out, run(apply(pack, model, "paper", controlnet_reuse=False)[0], conds))
    assert sum("does not serve KeyframedControlNet" in rec.getMessage() for rec in caplog.records) == 1


def test_host_objects_are_left_alone(pack, digits):
    model, tok = digits
    a, b = tm.digits_controlnet(1), tm.digits_controlnet(2)
    conds = controlled(tok, (a, 0.7, 0.0, 0.5), (b, 1.3, 0.0, 1.0))
    head = conds[0][0][1]["control"]
    prev = head.previous_controlnet
    before = {k: v for k, v in vars(head).items() if k != "previous_controlnet"}
    first = run(apply(pack, model, "paper")[0], conds)
    assert conds[0][0][1]["control"] is head and head.previous_controlnet is prev
    assert head.cond_hint is None and head.timestep_range is None   # ComfyUI's own cleanup ran on them
    assert {k: v for k, v in vars(head).items() if k != "previous_controlnet"}.keys() == before.keys()
    assert torch.equal(run(apply(pack, model, "paper")[0], conds), first), "a second run gives the same"


def test_sampler_node_reuses_too(pack, digits):
    import comfy.samplers
    import nodes
    model, tok = digits
    net = tm.digits_controlnet()
    pos, neg = controlled(tok, (net, 1.0, 0.0, 1.0))
    sigmas = schedule(model)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]
    got = {}
    for reuse in (True, False):
        with counting(model, sigmas) as calls:
            node.execute(model, 0, STEPS, 3.0, "euler", "normal", pos, neg, latent, 1.0, "paper", True, 32, 0.0, 500.0,
                         controlnet_reuse=reuse)
        got[reuse] = calls.steps(net.control_model)
    assert got == {True: PAPER_KEYS, False: list(range(STEPS))}
