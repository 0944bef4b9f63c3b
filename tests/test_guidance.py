"""Guidance functions that add model calls of their own (PAG, SAG) or change the prediction (RescaleCFG,
CFG++ samplers), in split and batched cond/uncond calls: every call is served by features of its own.

The mechanism check: a DIFFUSION_MODEL wrapper outside FasterDiffusion's records every UNet output; at a
non-key step the guidance pass (PAG's perturbed attention, SAG's degraded latent) must get an output of its
own, not the regular call's.  The effect check (PAG): the guidance moves the FasterDiffusion result in
the direction it moves the full model's.
"""
from __future__ import annotations

import pytest
import torch

import testmodel as tm
from conftest import apply

STEPS = 10
KEYS = "0,1,2,5"               # non-key steps 3, 4, 6, 7, 8, 9


def rel(a, b):
    return float((a - b).norm() / b.norm())


def recorded(model):
    """(clone of ``model`` whose UNet outputs are recorded, the record list: (step sigma, the cond chunks'
    uuids, whether the pass has replaced attention, output))."""
    import comfy.patcher_extension
    calls = []

    def record(executor, x, timesteps, context, y, control, to, **kw):
        out = executor(x, timesteps, context, y, control, to, **kw)
        calls.append((float(to["sigmas"][0]), tuple(to["uuids"]), bool(to.get("patches_replace")), out))
        return out

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "record", record)
    return m, calls


def run(model, tok, cfg, split=False, sampler="euler"):
    import comfy.sample
    pos, neg = tm.digit_conditioning(tok, [4])
    if split:   # a negative of another token length cannot be batched with the positive: two calls a step
        neg = [[torch.cat([neg[0][0]] * 5, dim=1), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), STEPS, cfg, sampler, "normal",
                               pos, neg, latent, seed=0, disable_pbar=True)


def pag(model, scale=3.0):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return PerturbedAttentionGuidance.execute(model, scale).result[0]


def sag(model, scale=1.0):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return SelfAttentionGuidance.execute(model, scale, 2.0).result[0]


def non_key_sigmas(model):
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).tolist()
    return {round(sigmas[i], 5) for i in range(STEPS) if i not in (0, 1, 2, 5)}


def assert_effect_kept(pack, digits, guide, cfg, split):
    model, tok = digits
    guided = guide(model)
    base_effect = run(guided, tok, cfg, split) - run(model, tok, cfg, split)
    fd_effect = run(apply(pack, guided, KEYS)[0], tok, cfg, split) - run(apply(pack, model, KEYS)[0], tok, cfg, split)
    assert base_effect.norm() > 0.05 * run(model, tok, cfg, split).norm(), "the guidance acts on this model"
    cos = float(fd_effect.flatten() @ base_effect.flatten() / fd_effect.norm() / base_effect.norm())
    assert cos > 0.5, f"FasterDiffusion must keep the guidance's effect (cosine {cos:.2f})"


@pytest.mark.parametrize("cfg,split", [(1.0, False), (3.0, True), (3.0, False)],
                         ids=["cfg1-cond-only", "split-calls", "batched-calls"])
def test_pag_pass_gets_its_own_features(pack, digits, cfg, split):
    model, tok = digits
    probed, calls = recorded(model)
    patched, config = apply(pack, pag(probed), KEYS)
    run(patched, tok, cfg, split)
    late = non_key_sigmas(model)
    pairs = 0
    for i, (sigma, uuids, patched_pass, out) in enumerate(calls):
        if patched_pass and round(sigma, 5) in late:       # PAG's pass: [cond] with the attention replaced
            regular, row = next((o, u.index(uuids[0])) for s, u, p, o in calls[:i]
                                if s == sigma and uuids[0] in u and not p)
            assert rel(out[0], regular[row]) > 1e-3, f"PAG's pass at sigma {sigma} got the regular features"
            pairs += 1
    assert pairs == 6
    assert config.reports[-1]["fallback_calls"] == 0
    assert_effect_kept(pack, digits, pag, cfg, split)


@pytest.mark.parametrize("split", [True, False], ids=["split-calls", "batched-calls"])
def test_sag_degraded_pass_gets_its_own_features(pack, digits, split):
    model, tok = digits
    probed, calls = recorded(model)
    patched, config = apply(pack, sag(probed), KEYS)
    run(patched, tok, 3.0, split)
    late = non_key_sigmas(model)
    checked = 0
    for i, (sigma, uuids, _, out) in enumerate(calls):
        earlier = [(u, o) for s, u, _, o in calls[:i] if s == sigma]
        if round(sigma, 5) in late and len(uuids) == 1 and any(uuids[0] in u for u, _ in earlier):
            # SAG's pass: the uncond conditioning again, on the degraded latent
            u, regular = next((u, o) for u, o in earlier if uuids[0] in u)
            assert rel(out[0], regular[u.index(uuids[0])]) > 1e-3, f"SAG's pass at sigma {sigma} got the regular features"
            checked += 1
    assert checked == 6
    assert config.reports[-1]["fallback_calls"] == 0
    # (SAG's blur map comes from middle-block attention, which is encoder side: it refreshes at key steps
    # only, so its effect is weaker under propagation; the README says so)


def test_rescale_cfg_and_cfg_pp_samplers(pack, digits):
    """Guidance that only reshapes the prediction adds no call: FasterDiffusion serves it as usual, and
    with ``all`` it is the unpatched result bit for bit."""
    from comfy_extras.nodes_model_advanced import RescaleCFG
    model, tok = digits
    (rescaled,) = RescaleCFG().patch(model, 0.7)
    for m, sampler in ((rescaled, "euler"), (model, "euler_cfg_pp"), (model, "euler_ancestral_cfg_pp")):
        base = run(m, tok, 3.0, sampler=sampler)
        assert torch.equal(run(apply(pack, m, "all")[0], tok, 3.0, sampler=sampler), base), sampler
        # the paper's propagation: at 10 steps with keys 0,1,2,5 forecast lands a little further from the full
        # run with euler_cfg_pp (0.46 vs 0.33 here; forecast_digits_steps.md); 'all' above runs with forecast
        fd, config = apply(pack, m, KEYS, propagation="reuse")
        out = run(fd, tok, 3.0, sampler=sampler)
        r = config.reports[-1]
        assert (r["cached_calls"], r["fallback_calls"]) == (6, 0), sampler
        if "ancestral" in sampler:   # fresh noise every step: the same digit, not the same pixels
            assert tm.classify(tm.decode(out)) == tm.classify(tm.decode(base)) == [4], sampler
        else:
            assert rel(tm.decode(out), tm.decode(base)) < 0.4, sampler   # a 10-step run with 4 keys
