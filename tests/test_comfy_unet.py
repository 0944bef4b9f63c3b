"""The ComfyUI adapter inside real ComfyUI 0.3.75: exactness, batching, per-run state, samplers."""
from __future__ import annotations

import logging

import pytest
import torch

import testmodel as tm
from conftest import apply

STEPS = 20


def sample(model, tokens, digits=(3, 8), seed=0, steps=STEPS, **kw):
    return tm.sample_digits(model, tokens, list(digits), seed=seed, steps=steps, **kw)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------- the node

def test_node_is_registered_with_tooltips(pack):
    assert pack.display == "FasterDiffusion Apply"
    spec = pack.Apply.INPUT_TYPES()["required"]
    assert list(spec) == ["model", "strategy", "parallel", "max_decoder_batch"]
    assert all(opts.get("tooltip") for _, opts in spec.values())
    assert spec["strategy"][1]["default"] == "paper" and spec["parallel"][1]["default"] is True
    assert list(pack.Apply.RETURN_TYPES) == ["MODEL"] and pack.Apply.OUTPUT_TOOLTIPS


def test_bad_strategy_is_refused_with_the_grammar(pack, digits):
    msg = pack.Apply.validate_inputs(strategy="1,2")
    assert "step 0 must be a key step" in msg and "uniform:K" in msg
    assert pack.Apply.validate_inputs(strategy="uniform:4") is True
    with pytest.raises(ValueError, match="'uniform:zero'"):
        pack.Apply.execute(digits[0], "uniform:zero", True, 32)


def test_other_model_classes_pass_through_with_one_log_line(pack, caplog):
    model = tm.sd3_tiny_model()
    with caplog.at_level(logging.INFO):
        (out,) = pack.Apply.execute(model, "paper", True, 32)
    assert out is model and not model.wrappers
    lines = [r.getMessage() for r in caplog.records if "FasterDiffusion" in r.getMessage()]
    assert lines == ["FasterDiffusion: passing the model through unchanged: OpenAISignatureMMDITWrapper is not a "
                     "model FasterDiffusion serves (ComfyUI's UNetModel: SD1.x, SD2.x, SDXL, SVD; Flux; Wan 2.x)"]


def test_apply_works_on_a_clone(pack, digits):
    model, _ = digits
    patched, config = apply(pack, model)
    assert patched is not model and config is not None
    assert pack.cu.KEY not in model.model_options["transformer_options"]
    assert not model.wrappers and patched.wrappers


def test_applying_twice_keeps_only_the_last_settings(pack, digits):
    model, tok = digits
    once, _ = apply(pack, model, "paper")
    twice, config = apply(pack, once, "uniform:2", parallel=False)
    assert len(twice.get_wrappers(pack.cu.WRAP.DIFFUSION_MODEL, pack.cu.KEY)) == 1
    assert len(twice.get_wrappers(pack.cu.WRAP.OUTER_SAMPLE, pack.cu.KEY)) == 1
    assert torch.equal(sample(twice, tok), sample(apply(pack, model, "uniform:2", parallel=False)[0], tok))
    assert config.reports[-1]["strategy"] == "uniform:2" and config.reports[-1]["cached_calls"] == 10


# ------------------------------------------------------------------------------------- exactness

def test_all_steps_key_and_bypass_are_bit_identical(pack, digits):
    model, tok = digits
    base = sample(model, tok, sampler="dpmpp_2m")
    patched, config = apply(pack, model, "all")
    assert torch.equal(sample(patched, tok, sampler="dpmpp_2m"), base)
    r = config.reports[-1]
    assert (r["full_calls"], r["encoder_calls"], r["cached_calls"]) == (STEPS, 0, 0)
    assert torch.equal(sample(model, tok, sampler="dpmpp_2m"), base), "the input model must stay unpatched"


@pytest.mark.parametrize("which", ["digits", "sdxl", "vpred"])
def test_decoder_on_fresh_features_equals_host_forward(pack, digits, which):
    ldm, rt = pack.ldm, pack.runtime
    model = {"digits": lambda: digits[0], "sdxl": tm.sdxl_tiny_model, "vpred": tm.vpred_tiny_model}[which]()
    unet = model.model.diffusion_model
    adapter = ldm.LdmUNetAdapter(unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([700.0, 700.0])
    ctx = torch.randn(2, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g)
    y = torch.randn(2, 2816, generator=g) if which == "sdxl" else None
    call = lambda t: ldm.make_call(x, t, ctx, y, None, {"sigmas": t}, {})
    with torch.no_grad():
        ref = unet(x, t, ctx, y, None, {})
        c = call(t)
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        out = adapter.decode(c, feats, emb)
        assert torch.equal(out, ref)
        # the decoder at another timestep differs (it really uses the step's own embedding) ...
        t2 = torch.tensor([300.0, 300.0])
        c2 = call(t2)
        other = adapter.decode(c2, feats, adapter.embed(c2))
        assert rel(other, ref) > 1e-3
        # ... and batched over steps equals one call per step
        outs, widths = rt.decode_steps(adapter, c, feats, [(t, t), (t2, t2)], max_decoder_batch=0)
        assert widths == [2] and rel(outs[0], ref) < 1e-5 and rel(outs[1], other) < 1e-5
        assert torch.equal(feats.mid, adapter.encode(call(t), emb).mid), "features untouched"


def test_key_steps_are_exact_and_non_key_steps_cached(pack, digits):
    """Sequential EP: every step up to the first non-key step is bit-identical to the baseline."""
    model, tok = digits
    keys = "0,1,2,3,4,5,6,7,8,9,10,12,14,16,18"
    seen = {}
    for name, m in [("base", model), ("fd", apply(pack, model, keys, parallel=False)[0])]:
        x0s = []
        sample(m, tok, callback=lambda i, x0, x, n: x0s.append(x0.clone()))
        seen[name] = x0s
    for i in range(11):                                # steps 0-10 are keys; 10's group has step 11
        assert torch.equal(seen["fd"][i], seen["base"][i]), f"step {i}"
    assert not torch.equal(seen["fd"][11], seen["base"][11])


def test_parallel_matches_sequential(pack, digits):
    model, tok = digits
    # reuse: with forecast the lone key steps 0-2 also run split, and report decoder batches of 1
    seq_m, seq_c = apply(pack, model, "paper", parallel=False, propagation="reuse")
    par_m, par_c = apply(pack, model, "paper", parallel=True, propagation="reuse")
    capped_m, capped_c = apply(pack, model, "paper", parallel=True, max_decoder_batch=12, propagation="reuse")
    seq, par, capped = (sample(m, tok, digits=(0, 4, 9)) for m in (seq_m, par_m, capped_m))
    assert rel(par, seq) < 1e-4
    assert rel(capped, par) < 1e-5
    assert par_c.reports[-1]["decoder_batches"] == [2, 5, 5, 5]        # paper keys at 20 steps
    assert capped_c.reports[-1]["decoder_batches"] == [2, 2, 2, 1, 2, 2, 1, 2, 2, 1]  # 12 rows: 2 steps x 3 x CFG
    assert seq_c.reports[-1]["decoder_batches"] == [1, 1, 1, 1]
    for c in (seq_c, par_c):
        r = c.reports[-1]
        assert (r["full_calls"] + r["encoder_calls"], r["cached_calls"]) == (7, 13)


@pytest.mark.parametrize("parallel", [False, True])
def test_non_key_output_does_not_depend_on_the_latent(pack, digits, parallel):
    """A sampler that asks twice at each non-key step, the second time with a shifted latent, gets the
    same UNet output both times (recorded by a DIFFUSION_MODEL wrapper outside FasterDiffusion's)."""
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    model, tok = digits
    outputs = []

    def record(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        outputs.append(out)
        return out

    probed = model.clone()
    probed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "probe", record)
    patched, config = apply(pack, probed, "0,5", parallel=parallel)
    asked_twice = []

    def probe(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            d = model_fn(x, sigmas[i] * s_in, **extra_args)
            if i not in (0, 5):
                model_fn(x + torch.randn_like(x), sigmas[i] * s_in, **extra_args)
                asked_twice.append(len(outputs) - 1)
            x = x + (x - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 8)
    pos, neg = tm.digit_conditioning(tok, [2])
    comfy.sample.sample_custom(patched, torch.randn(1, 4, 8, 8), 3.0, comfy.samplers.KSAMPLER(probe), sigmas,
                               pos, neg, torch.zeros(1, 4, 8, 8), disable_pbar=True, seed=0)
    assert len(asked_twice) == 6 and len(outputs) == 8 + 6
    for k in asked_twice:
        assert torch.equal(outputs[k], outputs[k - 1])
    r = config.reports[-1]
    assert (r["fallback_calls"], r["cached_calls"], r["encoder_calls"]) == (0, 12, 2)


def test_freeu_in_place_output_patch_keeps_working_and_the_cache_clean(pack, digits):
    """FreeU (a real ComfyUI output_block_patch) edits ``h`` in place; at block 0 that is the cached
    middle output.  It must act at every decoder step without corrupting the cache."""
    from comfy_extras.nodes_freelunch import FreeU_V2
    model, tok = digits
    (free,) = FreeU_V2().patch(model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    base = sample(free, tok)
    assert rel(base, sample(model, tok)) > 1e-3, "FreeU acts on this model's middle block"
    assert torch.equal(sample(apply(pack, free, "all")[0], tok), base)
    seq = sample(apply(pack, free, "paper", parallel=False)[0], tok)
    par = sample(apply(pack, free, "paper")[0], tok)
    assert rel(par, seq) < 1e-4
    assert rel(tm.decode(par), tm.decode(base)) < 0.2


# ------------------------------------------------------------------------------------- batching

def test_batch_does_not_change_a_sample(pack, digits):
    import comfy.sample
    model, tok = digits
    patched, _ = apply(pack, model, "paper")
    one = torch.zeros(1, 4, 8, 8)
    noises = [comfy.sample.prepare_noise(one, s) for s in (11, 12, 13)]
    batch = sample(patched, tok, digits=(1, 5, 7), noise=torch.cat(noises), latent=torch.zeros(3, 4, 8, 8))
    for k, (d, n) in enumerate(zip((1, 5, 7), noises)):
        alone = sample(patched, tok, digits=(d,), noise=n, latent=one)
        assert rel(batch[k:k + 1], alone) < 1e-4, f"sample {k}"
    assert rel(batch[0], batch[1]) > 0.1


def test_cond_and_uncond_split_into_separate_calls(pack, digits):
    """A negative prompt of another token length cannot be batched with the positive: two model calls a
    step, each with its own cache.  Repeating the null tokens leaves attention unchanged, so the result
    must match the batched run."""
    import comfy.sample
    model, tok = digits
    patched, config = apply(pack, model, "paper")
    batched = sample(patched, tok, digits=(6,))
    calls_batched = config.reports[-1]
    pos, neg = tm.digit_conditioning(tok, [6])
    neg = [[torch.cat([neg[0][0]] * 5, dim=1), {}]]   # 20 vs 4 tokens: ComfyUI will not pad to batch
    latent = torch.zeros(1, 4, 8, 8)
    split = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), STEPS, 3.0, "euler", "normal",
                                pos, neg, latent, seed=0, disable_pbar=True)
    r = config.reports[-1]
    assert r["cached_calls"] == 2 * calls_batched["cached_calls"]
    assert r["encoder_calls"] == 2 * calls_batched["encoder_calls"]
    assert rel(split, batched) < 1e-4


def test_cfg_one_runs_cond_only(pack, digits):
    model, tok = digits
    patched, config = apply(pack, model, "paper")
    base = sample(model, tok, cfg=1.0)
    fd = sample(patched, tok, cfg=1.0)
    r = config.reports[-1]
    assert r["cached_calls"] == 13 and r["full_calls"] + r["encoder_calls"] == 7
    assert 0 < rel(fd, base) < 0.3


# ------------------------------------------------------------------------------------- per-run state

def test_runs_do_not_leak_state(pack, digits):
    model, tok = digits
    a, ca = apply(pack, model, "paper")
    b, cb = apply(pack, model, "uniform:2")
    first = sample(a, tok)
    other = sample(b, tok)
    again = sample(a, tok)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert [r["cached_calls"] for r in ca.reports] == [13, 13]
    assert [r["cached_calls"] for r in cb.reports] == [10]


def test_denoise_and_start_end_steps_plan_on_the_run_schedule(pack, digits):
    model, tok = digits
    patched, config = apply(pack, model, "paper")
    init = sample(model, tok, steps=10)
    out = sample(patched, tok, denoise=0.5, latent=init)
    r = config.reports[-1]
    assert r["steps"] == STEPS and r["keys"] == [0, 1, 2, 3, 5, 10, 15]
    assert rel(out, sample(model, tok, denoise=0.5, latent=init)) < 0.2
    sample(patched, tok, start_step=5, last_step=15)
    r = config.reports[-1]
    assert r["steps"] == 10 and r["keys"] == [0, 1, 2, 3, 5] and r["cached_calls"] == 5


# ------------------------------------------------------------------------------------- samplers

# The ancestral 2nd-order samplers (eta 1) put their midpoint exactly on sigma[i+1], like Heun's corrector.
DETERMINISTIC = ["euler", "dpmpp_2m", "heun", "ddim", "uni_pc", "dpm_2"]
STOCHASTIC = ["euler_ancestral", "dpmpp_2s_ancestral", "dpm_2_ancestral", "dpmpp_sde"]
OFF_SCHEDULE = ["dpm_2", "dpmpp_sde"]
FIRST_ORDER = ["euler", "dpmpp_2m", "ddim", "uni_pc", "euler_ancestral"]
TEN = list(range(10))


def accuracy(latents):
    return float((tm.classify(tm.decode(latents)) == torch.tensor(TEN).numpy()).mean())


@pytest.mark.parametrize("sampler", DETERMINISTIC + STOCHASTIC)
def test_stock_samplers(pack, digits, sampler):
    model, tok = digits
    patched, config = apply(pack, model, "paper")
    base = sample(model, tok, digits=TEN, seed=1, sampler=sampler)
    fd = sample(patched, tok, digits=TEN, seed=1, sampler=sampler)
    r = config.reports[-1]
    assert r["fallback_calls"] == 0 and "bypassed" not in r
    assert (r["off_schedule_calls"] > 0) == (sampler in OFF_SCHEDULE)   # those calls run in full
    if sampler in FIRST_ORDER:        # one model call a step (10 digits x CFG batched): 7 keys, 13 cached
        assert (r["full_calls"] + r["encoder_calls"], r["cached_calls"]) == (7, 13)
    else:                             # second evaluations land on keys (full) or non-keys (cached)
        assert r["full_calls"] + r["encoder_calls"] > 7 and r["cached_calls"] >= 13
    assert accuracy(fd) >= accuracy(base) - 0.15, "the digits must stay recognisable"
    if sampler in DETERMINISTIC:    # stochastic samplers add fresh noise each step and drift further
        assert rel(tm.decode(fd), tm.decode(base)) < 0.3


@pytest.mark.parametrize("sampler,why", [("lcm", "lcm re-noises the whole latent every step"),
                                         ("dpmpp_3m_sde", "dpmpp_3m_sde extrapolates from past predictions"),
                                         ("dpmpp_2m_sde", "dpmpp_2m_sde extrapolates from past predictions")])
def test_samplers_propagation_cannot_serve_run_in_full_and_say_so(pack, digits, caplog, sampler, why):
    model, tok = digits
    patched, config = apply(pack, model, "paper")
    with caplog.at_level(logging.WARNING):
        fd = sample(patched, tok, sampler=sampler)
    assert torch.equal(fd, sample(model, tok, sampler=sampler))
    assert why in config.reports[-1]["bypassed"]
    assert [r.getMessage() for r in caplog.records if "every step ran in full" in r.getMessage()] == [
        f"FasterDiffusion [paper]: {STEPS} steps; the {config.reports[-1]['bypassed'][4:]}"]


def test_sdxl_and_vpred_models_sample(pack, digits):
    for model in (tm.sdxl_tiny_model(), tm.vpred_tiny_model()):
        patched, config = apply(pack, model, "paper")
        pos = [[torch.randn(1, 4, tm.CONTEXT_DIM), {"pooled_output": torch.randn(1, 1280)}]]
        neg = [[torch.zeros(1, 4, tm.CONTEXT_DIM), {"pooled_output": torch.zeros(1, 1280)}]]
        import comfy.sample
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        run = lambda m: comfy.sample.sample(m, noise, 10, 4.0, "euler", "normal", pos, neg, latent,
                                            seed=0, disable_pbar=True)
        base, fd = run(model), run(patched)
        assert torch.isfinite(fd).all() and config.reports[-1]["cached_calls"] == 5
        assert torch.equal(run(apply(pack, model, "all")[0]), base)


# ------------------------------------------------------------------------------------- ControlNet

def with_controlnet(tok, digit, start=0.0, end=1.0, strength=1.0):
    import nodes
    pos, neg = tm.digit_conditioning(tok, [digit])
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, tm.digits_controlnet(), hint, strength, start, end)


def run_conds(model, pos, neg, steps=STEPS, **kw):
    import comfy.sample
    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), steps, 3.0, "euler", "normal",
                               pos, neg, latent, seed=0, disable_pbar=True, **kw)


@pytest.mark.parametrize("reuse", [False, True])
def test_controlnet_key_steps_stay_exact(pack, digits, reuse):
    """With a ControlNet, a key step computed through the split equals the host's forward bit for bit
    (decoded alone: with reuse, parallel would batch the key step's decoder with step 19's)."""
    model, tok = digits
    pos, neg = with_controlnet(tok, 3)
    fd, config = apply(pack, model, ",".join(map(str, range(STEPS - 1))),   # only the last step is not a key
                       parallel=not reuse, controlnet_reuse=reuse)
    seen = {}
    for name, m in (("base", model), ("fd", fd)):
        seen[name] = []
        run_conds(m, pos, neg, callback=lambda i, x0, x, n: seen[name].append(x0.clone()))
    for i in range(STEPS - 1):
        assert torch.equal(seen["fd"][i], seen["base"][i]), f"step {i}"
    r = config.reports[-1]
    assert r["cached_calls"] == 1 and (reuse or "ControlNet" in r["parallel_off"])


@pytest.mark.parametrize("reuse", [False, True])
def test_controlnet_residuals_reach_non_key_steps(pack, digits, reuse):
    """A ControlNet active only during non-key steps still changes the FasterDiffusion result, as it
    changes the full model's (with reuse, through the step where it starts, made a key step)."""
    model, tok = digits
    fd, config = apply(pack, model, "paper", controlnet_reuse=reuse)
    ms = model.get_model_object("model_sampling")
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)
    start = 0.85
    active = [i for i in range(STEPS) if float(sigmas[i]) <= float(ms.percent_to_sigma(start))]
    assert active and not set(active) & set(config_keys := [0, 1, 2, 3, 5, 10, 15]), (active, config_keys)
    plain = tm.digit_conditioning(tok, [3])
    late = with_controlnet(tok, 3, start=start, strength=2.0)
    fd_late = run_conds(fd, *late)
    late_report = config.reports[-1]
    fd_effect = fd_late - run_conds(fd, *plain)
    base_effect = run_conds(model, *late) - run_conds(model, *plain)
    assert base_effect.norm() > 0 and fd_effect.norm() > 0.5 * base_effect.norm()
    cos = float(torch.nn.functional.cosine_similarity(fd_effect.flatten(), base_effect.flatten(), dim=0))
    print(f"reuse={reuse}: effect rel {rel(fd_effect, base_effect):.3f}, cos {cos:.3f}")
    if not reuse:
        assert rel(fd_effect, base_effect) < 0.5
    else:   # served at the step where it starts (a key now), then the random net's residuals are reused
        assert late_report["late_keys"] == [active[0]] and cos > 0.7


def test_batched_decoder_rows_carry_their_own_sigma(pack, digits):
    """A decoder-side patch that reads transformer_options['sigmas'] per row (as sigma-dependent attention
    and block patches do) sees the same sigma for each step in a batched group as in a call of its own."""
    model, tok = digits

    def sigma_scaled(h, hsp, to):
        sigmas = to["sigmas"]      # one per latent row, repeated for each cond chunk of the call
        per_row = sigmas.repeat(h.shape[0] // sigmas.shape[0])
        return h * (1 + per_row.view(-1, 1, 1, 1) / 10), hsp

    m = model.clone()
    m.set_model_output_block_patch(sigma_scaled)
    seq, par = (sample(apply(pack, m, "paper", parallel=p)[0], tok) for p in (False, True))
    assert rel(par, seq) < 1e-4
    assert rel(seq, sample(apply(pack, model, "paper", parallel=False)[0], tok)) > 1e-2, "the patch acts"
