"""Wan 2.x in real ComfyUI (``patches/comfy/wan.py``): random-weight tiny WanModels built from the host's own classes
(testmodel/wan.py: Wan 2.1 T2V, Wan 2.1 I2V with CLIP vision and the concatenated image latent, Wan 2.2 TI2V 5B-style
with per-token timesteps under a noise mask; 6 blocks, default split 4), sampled with ComfyUI's KSampler and
KSamplerAdvanced nodes (the two-expert Wan 2.2 A14B workflow)."""
from __future__ import annotations

import importlib
import inspect
import logging
import math

import pytest
import torch

import testmodel.wan as tw
from conftest import apply

STEPS = 10
SPLITS = [1, 2, 4, 5]
KINDS = ["t2v", "i2v", "ti2v"]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def psnr(a, b):
    peak = float(b.abs().max())
    return 10 * math.log10(peak * peak / float(((a - b) ** 2).mean()))


def stats(config):
    return config.reports[-1]


@pytest.fixture(scope="module")
def wan(pack):
    """The pack's patches/comfy/wan.py, as ComfyUI loaded it."""
    return importlib.import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".wan")


@pytest.fixture(scope="module")
def models(comfy):
    return {"t2v": tw.wan21_t2v(seed=1), "i2v": tw.wan21_i2v(seed=2), "ti2v": tw.wan22_ti2v(seed=3)}


def conditioning(kind, seed=0):
    return tw.i2v_conditioning(seed) if kind == "i2v" else tw.t2v_conditioning(seed)


def latent(kind, batch=1):
    if kind == "ti2v":
        lat = tw.ti2v_latent()
        return {k: v.repeat(batch, 1, 1, 1, 1) for k, v in lat.items()}
    return tw.empty_latent(16, batch)


def ksampler(model, kind, batch=1, steps=STEPS, seed=0):
    import nodes
    pos, neg = conditioning(kind)
    (out,) = nodes.KSampler().sample(model, seed, steps, 4.0, "euler", "simple", pos, neg, latent(kind, batch), 1.0)
    return out["samples"]


def new_host() -> bool:
    from comfy.ldm.wan.model import WanModel
    return "source_id" in inspect.signature(WanModel.rope_encode).parameters     # ComfyUI 0.33


# ------------------------------------------------------------------------------------- the split itself

def host_args(unet, rows=2, seed=1, t=700.0, **extra):
    """``WanModel._forward``'s arguments for one call (odd height and width: the host pads them); CLIP vision
    features for an I2V model; per-token timesteps and their denoise mask for a 48-channel (TI2V) one."""
    g = torch.Generator().manual_seed(seed)
    ts = torch.full((rows,), t)
    a = dict(x=torch.randn(rows, unet.in_dim, tw.FRAMES, 7, 9, generator=g), timestep=ts,
             context=torch.randn(rows, tw.TEXT_TOKENS, tw.TEXT_DIM, generator=g),
             clip_fea=torch.randn(rows, tw.CLIP_TOKENS, tw.CLIP_DIM, generator=g) if unet.img_emb is not None else None,
             time_dim_concat=None, transformer_options={"sigmas": ts / 1000}, kwargs={})
    if unet.in_dim == 48:          # WAN22.process_timestep: frame 0 is the start image (mask 0)
        mask = torch.ones(rows, 1, tw.FRAMES, 7, 9)
        mask[:, :, 0] = 0.0
        a["kwargs"] = {"denoise_mask": mask}
        a["timestep"] = (torch.mean(mask, dim=(1, 3, 4), keepdim=True) * ts.view(rows, 1, 1, 1, 1)).reshape(rows, -1)
    a.update(extra)
    return a


def host_forward(unet, a):
    return unet(a["x"], a["timestep"], a["context"], a["clip_fea"], a["time_dim_concat"],
                dict(a["transformer_options"]), **a["kwargs"])


def split_checks(wan, pack, unet, a, n, t2=300.0):
    """The decoder on fresh features equals the host forward bit for bit (twice: the cache stays clean); a batch of
    two steps (the runtime's rows: the key call's own, then the other step's timestep) equals each step alone."""
    adapter = wan.WanAdapter(unet, n)
    call = lambda a: wan.WanAdapter.make_call(unet, dict(a, transformer_options=dict(a["transformer_options"]),
                                                         kwargs=dict(a["kwargs"])), ())
    a2 = host_args(unet, rows=a["x"].shape[0], t=t2, **{k: a[k] for k in ("x", "context", "clip_fea",
                                                                           "time_dim_concat")})
    a2["kwargs"] = dict(a["kwargs"], **a2["kwargs"])
    a2["transformer_options"] = dict(a["transformer_options"], sigmas=a2["transformer_options"]["sigmas"])
    with torch.no_grad():
        ref = host_forward(unet, a)
        c = call(a)
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        assert torch.equal(adapter.decode(c, feats, emb), ref), f"split {n}"
        assert torch.equal(adapter.decode(c, feats, emb), ref), f"split {n}: the decoder changed the cached features"
        other = adapter.decode(call(a2), feats, adapter.embed(call(a2)))
        rows = a["x"].shape[0]
        s2 = a2["transformer_options"]["sigmas"]
        schedule_t = torch.full((rows,), t2).to(c.timesteps).view(rows, *[1] * (c.timesteps.ndim - 1))
        outs, widths = pack.runtime.decode_steps(adapter, c, feats, [(c.timesteps, c.sigmas),
                                                                     (schedule_t.expand_as(c.timesteps), s2)], 0)
        assert widths == [2] and rel(outs[0], ref) < 1e-5 and rel(outs[1], other) < 1e-5, f"split {n}: batched"
    return ref, other


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SPLITS)
def test_decoder_on_fresh_features_equals_the_host_forward(wan, pack, models, kind, n):
    unet = models[kind].model.diffusion_model
    ref, other = split_checks(wan, pack, unet, host_args(unet), n)
    assert rel(other, ref) > 0.01, "the step's own timestep reaches the decoder"
    ref3, _ = split_checks(wan, pack, unet, host_args(unet, rows=3, seed=4), n)
    assert ref3.shape[0] == 3


@pytest.mark.parametrize("n", SPLITS)
def test_time_concat_reference_latent_rope_options_and_in_context_latents(wan, pack, n):
    """The other inputs ``_forward`` / ``forward_orig`` take: ``time_dim_concat``, a reference latent through
    ``ref_conv`` (its tokens in front, cropped after the head), ``rope_options`` (ScaleROPE), and on 0.33 Bernini's
    in-context latents (tokens after the video, their own rope blocks)."""
    unet = tw.wan21_t2v(seed=5, in_dim_ref_conv=16).model.diffusion_model
    g = torch.Generator().manual_seed(6)
    plain = host_forward(unet, host_args(unet))
    variants = {
        "time_dim_concat": dict(time_dim_concat=torch.randn(2, 16, 2, 7, 9, generator=g)),
        "reference_latent": dict(kwargs={"reference_latent": torch.randn(2, 16, 8, 10, generator=g)}),
        "rope_options": dict(transformer_options={"sigmas": torch.full((2,), 0.7),
                                                  "rope_options": {"scale_t": 0.5, "shift_y": 2.0}}),
    }
    if new_host():
        variants["context_latents"] = dict(kwargs={"context_latents": [torch.randn(2, 16, 1, 7, 9, generator=g)]})
    for name, extra in variants.items():
        ref, _ = split_checks(wan, pack, unet, host_args(unet, **extra), n)
        assert rel(ref, plain) > 1e-3, f"{name} changes the output"


def test_dit_block_replace_patches_on_both_sides_of_the_split(wan, pack, models):
    unet = models["t2v"].model.diffusion_model
    plain = host_forward(unet, host_args(unet))
    seen = []

    def patch(args, extra):
        seen.append(args["vec"].shape[0])
        out = extra["original_block"](args)
        out["img"] = out["img"] * 1.1
        return out
    a = host_args(unet, transformer_options={"sigmas": torch.full((2,), 0.7),
                                             "patches_replace": {"dit": {("double_block", 1): patch,
                                                                         ("double_block", 4): patch}}})
    for n in SPLITS:        # 1 and 4 on each side, and as the decoder's first block
        seen.clear()
        ref, _ = split_checks(wan, pack, unet, a, n)
        assert rel(ref, plain) > 0.01 and len(seen) >= 4


def test_host_forward_outline(wan, models):
    """Both hosts' forwards are known; an unknown attribute, call or option key makes the model run unpatched."""
    from comfy.ldm.wan.model import WanModel
    assert wan.unsupported_reason(models["t2v"].model.diffusion_model) is None
    host = wan.host_forward(WanModel)
    assert host.double_block_patch == host.block_info == host.grid_sizes == host.context_latents == new_host()
    fwd = inspect.getsource(WanModel.forward_orig)
    changed = fwd.replace("x = self.head(x, e)", "x = self.head(self.final_norm(x), e)")
    assert changed != fwd
    assert wan.read_forward(inspect.getsource(WanModel._forward), fwd).difference is None
    diff = wan.read_forward(inspect.getsource(WanModel._forward), changed).difference
    assert "this host's WanModel forward differs" in diff and "uses self final_norm" in diff


# ------------------------------------------------------------------------------------- sampling runs

@pytest.mark.parametrize("kind", KINDS)
def test_all_is_bit_identical_and_uniform_counts_encoder_passes(pack, models, kind):
    model = models[kind]
    base = ksampler(model, kind)
    allk, config = apply(pack, model, "all")
    assert torch.equal(ksampler(allk, kind), base)
    assert (stats(config)["full_calls"], stats(config)["encoder_calls"]) == (STEPS, 0)
    par, config = apply(pack, model, "uniform:2")
    out = ksampler(par, kind)
    r = stats(config)
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (5, 5, 0), r
    assert r["decoder_batches"] == [2] * 5 and not r.get("parallel_off") and not r.get("bypassed"), r
    seq, config = apply(pack, model, "uniform:2", parallel=False)
    assert rel(ksampler(seq, kind), out) < 1e-5, "parallel = sequential (batched matmuls: float noise)"
    assert stats(config)["decoder_batches"] == [1] * 5
    assert torch.isfinite(out).all() and 0 < rel(out, base) < 0.5
    print(f"{kind}: uniform:2 vs full {psnr(out, base):.1f} dB (tiny random Wan, KSampler euler, {STEPS} steps)")


def test_ti2v_decoders_take_each_steps_per_token_timesteps(pack, models):
    """Wan 2.2 TI2V under a noise mask: every call's timesteps are per latent frame (frame 0, the start image, at 0);
    a batched decoder gets each step's own per-frame timesteps, as the step's own call would (parallel = sequential
    above); here: the decoder side sees per-frame modulation and frame 0's is that of timestep 0."""
    model = models["ti2v"].clone()
    vecs = []

    def patch(args, extra):
        vecs.append(args["vec"])
        return extra["original_block"](args)
    model.set_model_patch_replace(patch, "dit", "double_block", 5)
    out = ksampler(apply(pack, model, "uniform:2")[0], "ti2v")
    assert torch.isfinite(out).all()
    unet = model.model.diffusion_model
    e0_at_zero = unet.time_projection(unet.time_embedding(
        pack_sinusoid(unet, torch.zeros(1)))).unflatten(1, (6, unet.dim))
    assert len(vecs) == 5 and all(v.shape[1] == tw.FRAMES for v in vecs)
    assert all(v.shape[0] == 4 for v in vecs), "two steps x cond/uncond in each batched decoder"
    for v in vecs:
        assert torch.allclose(v[:, 0], e0_at_zero.expand(4, -1, -1), atol=1e-6)
        assert not torch.equal(v[0, 1], v[2, 1]), "the two steps' rows carry their own timesteps"
    wan = importlib.import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".wan")
    a = host_args(unet)
    assert wan.WanAdapter(unet, 4).own_step_reason(wan.WanAdapter.make_call(unet, a, ())) is None
    a["kwargs"] = {}
    assert wan.WanAdapter(unet, 4).own_step_reason(wan.WanAdapter.make_call(unet, a, ())) == (
        "per-token timesteps without the denoise mask they come from change every step")


def pack_sinusoid(unet, t):
    import sys
    return sys.modules[type(unet).__module__].sinusoidal_embedding_1d(unet.freq_dim, t)


def test_block_patches_run_where_their_block_runs(pack, models):
    """A dit ("double_block", 1) replace patch is on the encoder side of the default split (4): it runs at the key
    steps only; ("double_block", 5) on the decoder side runs at every step (batched: the rows of both steps)."""
    import comfy.samplers
    calls = {}

    def recorder(name):
        def patch(args, extra):
            to, rows = args["transformer_options"], args["img"].shape[0]
            assert len(to["cond_or_uncond"]) == len(to["uuids"]) == rows and rows % len(to["sigmas"]) == 0, to
            calls.setdefault(name, set()).update(round(float(s), 5) for s in to["sigmas"])
            out = extra["original_block"](args)
            out["img"] = out["img"] * 1.1
            return out
        return patch
    plain = models["t2v"]
    m = plain.clone()
    m.set_model_patch_replace(recorder("encoder"), "dit", "double_block", 1)
    m.set_model_patch_replace(recorder("decoder"), "dit", "double_block", 5)
    sigmas = [round(float(s), 5) for s in comfy.samplers.calculate_sigmas(
        plain.get_model_object("model_sampling"), "simple", STEPS)[:-1]]
    base = ksampler(m, "t2v")
    assert calls["encoder"] == calls["decoder"] == set(sigmas)
    assert torch.equal(ksampler(apply(pack, m, "all")[0], "t2v"), base)
    calls.clear()
    patched, config = apply(pack, m, "uniform:2")
    out = ksampler(patched, "t2v")
    assert calls["encoder"] == set(sigmas[::2]) and calls["decoder"] == set(sigmas), calls
    assert stats(config)["decoder_batches"] == [2] * 5
    unpatched = ksampler(apply(pack, plain, "uniform:2")[0], "t2v")
    assert rel(out, unpatched) > 0.01 and rel(out, base) < rel(unpatched, base)


def test_double_block_patches_read_the_latent_so_decoders_run_each_step(pack, models):
    """0.33's patches["double_block"] (Uni3C's ControlNet) get the step's latent (``x``): served, but each
    decoder on its own step's call, never batched."""
    if not new_host():
        pytest.skip("only ComfyUI 0.33's WanModel runs double_block patches")
    seen = []

    def patch(kw):
        seen.append((kw["block_index"], kw["x"].shape, kw["img_offset"]))
        kw["img"] += kw["x"].abs().mean() * torch.linspace(-1, 1, kw["img"].shape[-1])   # in place, as Uni3C
        return kw
    m = models["t2v"].clone()
    m.set_model_double_block_patch(patch)
    base = ksampler(m, "t2v")
    assert rel(base, ksampler(models["t2v"], "t2v")) > 1e-4, "the patch changes the run"
    assert torch.equal(ksampler(apply(pack, m, "all")[0], "t2v"), base)
    seen.clear()
    par, config = apply(pack, m, "uniform:2")
    out = ksampler(par, "t2v")
    r = stats(config)
    assert r["parallel_off"] == "a double_block patch reads each step's latent: decoders ran one step at a time", r
    assert (r["encoder_calls"], r["cached_calls"], r["decoder_batches"]) == (5, 5, [1] * 5), r
    assert len(seen) == 5 * 4 + 10 * 2, "encoder blocks 0-3 at key steps, decoder blocks 4-5 at every step"
    assert torch.equal(ksampler(apply(pack, m, "uniform:2", parallel=False)[0], "t2v"), out)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_never_changes_a_sample(pack, models, kind):
    model = models[kind]
    for strategy in ("all", "uniform:2"):
        one = ksampler(apply(pack, model, strategy)[0], kind, batch=1)
        two = ksampler(apply(pack, model, strategy)[0], kind, batch=2)
        host_one, host_two = ksampler(model, kind, batch=1), ksampler(model, kind, batch=2)
        tol = max(float((host_two[:1] - host_one).abs().max()) * 10, 1e-5)   # the host's own batch noise
        assert float((two[:1] - one).abs().max()) <= tol, strategy


def test_encoder_blocks_setting(pack, models):
    """encoder_blocks moves the split (each gives its own run, the default is 4 of 6); one that leaves no decoder
    block raises the clear error when the run starts."""
    model = models["t2v"]
    outs = {n: ksampler(apply(pack, model, "uniform:2", encoder_blocks=n)[0], "t2v") for n in SPLITS}
    assert torch.equal(ksampler(apply(pack, model, "uniform:2")[0], "t2v"), outs[4])
    assert len({float(o.sum()) for o in outs.values()}) == len(SPLITS)
    m, _ = apply(pack, model, "uniform:2", encoder_blocks=tw.DEPTH)
    with pytest.raises(ValueError, match=r"encoder_blocks 6 does not split Wan \(6 blocks\): set it to 1..5"):
        ksampler(m, "t2v")


def test_vace_passes_through_with_one_line(pack, caplog):
    vace = tw.wan21_vace(seed=7)
    with caplog.at_level(logging.INFO):
        (out,) = pack.Apply.execute(vace, "uniform:2", True, 32)
    lines = [r.getMessage() for r in caplog.records if "FasterDiffusion" in r.getMessage()]
    assert out is vace and lines == ["FasterDiffusion: passing the model through unchanged: VaceWanModel is not a "
                                     "model FasterDiffusion serves (ComfyUI's UNetModel: SD1.x, SD2.x, SDXL, SVD; "
                                     "Flux; Wan 2.x)"]


# ------------------------------------------------------------------------------------- Wan 2.2 A14B: two experts

def expert_stage(model, samples, first):
    """One KSamplerAdvanced of the two-expert workflow: the high-noise expert takes steps 0-4 of 10 (adds the
    noise, returns the leftover), the low-noise one steps 5-9."""
    import nodes
    pos, neg = tw.t2v_conditioning()
    on = lambda flag: "enable" if flag else "disable"
    (out,) = nodes.KSamplerAdvanced().sample(model, on(first), 0, STEPS, 4.0, "euler", "simple", pos, neg,
                                             {"samples": samples}, 0 if first else 5, 5 if first else 10000, on(first))
    return out["samples"]


def recording(model, outputs: list):
    """A clone of ``model`` whose every model output (one call a step: cond and uncond batched) lands in
    ``outputs`` (ComfyUI's model function wrapper)."""
    def wrapper(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        outputs.append(out.clone())
        return out
    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m


def two_experts(high, low):
    mid = expert_stage(high, tw.empty_latent()["samples"], True)
    return mid, expert_stage(low, mid, False)


def test_two_expert_wan22_each_run_keeps_its_own_features(pack):
    high, low = tw.wan21_t2v(seed=11), tw.wan21_t2v(seed=12)
    base_mid, base = two_experts(high, low)
    mid, out = two_experts(apply(pack, high, "all")[0], apply(pack, low, "all")[0])
    assert torch.equal(mid, base_mid) and torch.equal(out, base)

    (hp, hc), (lp, lc) = apply(pack, high, "uniform:2"), apply(pack, low, "uniform:2")
    mid, out = two_experts(hp, lp)
    for config in (hc, lc):        # each expert's run: its own 5 steps (keys 0, 2, 4; 4 alone runs in full)
        assert len(config.reports) == 1
        r = stats(config)
        assert (r["steps"], r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (5, 2, 2, 1), r
    assert 0 < rel(out, base) < 0.5
    # no features cross: each stage gives the same whatever ran before it ...
    assert torch.equal(expert_stage(hp, tw.empty_latent()["samples"], True), mid)
    assert torch.equal(expert_stage(lp, mid, False), out)
    # ... and at the key steps of each expert's run (0-3: each run in split form, 3's group has step 4) the output
    # is that expert's own, bit for bit: the low expert's encoder, context and decoder, never the high one's
    for model, first, start in ((high, True, tw.empty_latent()["samples"]), (low, False, mid)):
        seen = {"host": [], "fd": []}
        expert_stage(recording(model, seen["host"]), start, first)
        expert_stage(recording(apply(pack, model, "0,1,2,3", parallel=False)[0], seen["fd"]), start, first)
        assert len(seen["fd"]) == 5, first
        assert all(torch.equal(a, b) for a, b in zip(seen["fd"][:4], seen["host"][:4])), first
        assert not torch.equal(seen["fd"][4], seen["host"][4])
