"""Flux in real ComfyUI (``patches/comfy/flux.py``): random-weight tiny Flux models built from the host's own classes
(testmodel.flux_tiny_model: 2 double-stream + 3 single-stream blocks), sampled with ComfyUI's KSampler and
SamplerCustom nodes.  The split is checked inside the double stream (1), at the boundary (2) and inside the single
stream (3; 4, the default for 5 blocks)."""
from __future__ import annotations

import dataclasses
import importlib
import logging
import math

import pytest
import torch

import testmodel as tm
from conftest import apply

STEPS = 10
DOUBLE, SINGLE = 2, 3
SPLITS = [1, 2, 3, 4]          # inside the double stream, the boundary, inside the single stream
LATENT = (16, 8, 8)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def psnr(a, b):
    peak = float(b.abs().max())
    return 10 * math.log10(peak * peak / float(((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def fl(pack):
    """The pack's patches/comfy/flux.py, as ComfyUI loaded it."""
    return importlib.import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".flux")


@pytest.fixture(scope="module")
def flux(comfy):
    """Flux.1-dev-like: the guidance value is embedded (FluxGuidance)."""
    return tm.flux_tiny_model(depth=DOUBLE, depth_single_blocks=SINGLE, guidance_embed=True)


def new_host() -> bool:
    import comfy.ldm.flux.model
    return "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}


def flux2_like():
    """Flux-2-like: global modulation, no pooled text, 4 position axes (the text ids count along the last)."""
    params = dict(global_modulation=True, vec_in_dim=None, axes_dim=[8, 8, 8, 8])
    if new_host():
        params["txt_ids_dims"] = [3]
    return tm.flux_tiny_model(depth=DOUBLE, depth_single_blocks=SINGLE, **params)


def conditioning(guidance=4.0, seed=0):
    """CONDITIONING as CLIPTextEncode + FluxGuidance give it (negative: its own text, default guidance)."""
    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, 4, 64, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                 "guidance": guidance}]]
    neg = [[torch.randn(1, 4, 64, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    return pos, neg


def ksampler(model, conds=None, steps=STEPS, batch=1, cfg=2.0, sampler="euler", seed=0):
    import nodes
    latent = {"samples": torch.zeros(batch, *LATENT)}
    pos, neg = conds or conditioning()
    (out,) = nodes.KSampler().sample(model, seed, steps, cfg, sampler, "simple", pos, neg, latent, 1.0)
    return out["samples"]


def stats(config):
    return config.reports[-1]


# ------------------------------------------------------------------------------------- the split itself

def host_args(rows=2, seed=1, **extra):
    """``Flux._forward``'s arguments for one call: guidance differs per row (cond/uncond of a FluxGuidance)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((rows,), 0.7)
    a = dict(x=torch.randn(rows, 16, 9, 10, generator=g), timestep=t, context=torch.randn(rows, 5, 64, generator=g),
             y=torch.randn(rows, 768, generator=g), guidance=torch.tensor([4.0, 3.5, 2.0, 1.0][:rows]),
             ref_latents=None, control=None, transformer_options={"sigmas": t}, kwargs={})
    a.update(extra)
    return a


def host_forward(unet, a):
    opts = dict(a["transformer_options"])
    return unet(a["x"], a["timestep"], a["context"], a["y"], a["guidance"], a["ref_latents"], a["control"], opts,
                **a["kwargs"])


def split_checks(fl, pack, unet, a, n):
    """The decoder on fresh features equals the host forward bit for bit (twice: the cache stays clean); a batch of
    two steps equals each step alone (float noise)."""
    adapter = fl.FluxAdapter(unet, n)
    call = lambda a: fl.make_call(unet, dict(a, transformer_options=dict(a["transformer_options"])), ())
    t2 = torch.full_like(a["timestep"], 0.3)
    a2 = dict(a, timestep=t2, transformer_options=dict(a["transformer_options"], sigmas=t2))
    with torch.no_grad():
        ref = host_forward(unet, a)
        c = call(a)
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        assert torch.equal(adapter.decode(c, feats, emb), ref), f"split {n}"
        assert torch.equal(adapter.decode(c, feats, emb), ref), f"split {n}: the decoder changed the cached features"
        c2 = call(a2)
        other = adapter.decode(c2, feats, adapter.embed(c2))
        no_ctl = dict(a, control=None)
        c0 = call(no_ctl)
        outs, widths = pack.runtime.decode_steps(adapter, c0, feats, [(a["timestep"], a["timestep"]), (t2, t2)], 0)
        if a["control"] is None:
            assert widths == [2] and rel(outs[0], ref) < 1e-5 and rel(outs[1], other) < 1e-5, f"split {n}: batched"
    return ref, other


@pytest.mark.parametrize("n", SPLITS)
def test_decoder_on_fresh_features_equals_the_host_forward(fl, pack, flux, n):
    unet = flux.model.diffusion_model
    ref, other = split_checks(fl, pack, unet, host_args(), n)
    assert rel(other, ref) > 0.01, "the step's own timestep reaches the decoder"
    ref3, _ = split_checks(fl, pack, unet, host_args(rows=3, guidance=torch.tensor([4.0, 1.0, 9.0])), n)
    ref3b, _ = split_checks(fl, pack, unet, host_args(rows=3, guidance=torch.tensor([4.0, 1.0, 1.0])), n)
    assert rel(ref3[2], ref3b[2]) > 1e-3 and torch.equal(ref3[0], ref3b[0]), "guidance is per row"


@pytest.mark.parametrize("n", SPLITS)
def test_attention_mask_is_per_row_in_every_batched_decoder(fl, pack, flux, n):
    """The attention mask (a [b, q, k] additive mask among the extra arguments) reaches every block, per row."""
    unet = flux.model.diffusion_model
    g = torch.Generator().manual_seed(6)
    mask = torch.randn(2, 30, 30, generator=g)       # 5 text + 25 image tokens
    ref, _ = split_checks(fl, pack, unet, host_args(kwargs={"attention_mask": mask}), n)
    assert rel(ref, host_forward(unet, host_args())) > 1e-3


@pytest.mark.parametrize("n", SPLITS)
def test_reference_latents_and_flux2_layouts(fl, pack, flux, n):
    """Kontext-style reference latents (every method), and a Flux-2-like model (global modulation, 4 axes; on 0.33
    also the reference tokens at timestep 0)."""
    unet = flux.model.diffusion_model
    g = torch.Generator().manual_seed(5)
    refs = [torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 16, 8, 4, generator=g)]
    for method in ("offset", "index", "uxo"):
        split_checks(fl, pack, unet, host_args(ref_latents=refs, kwargs={"ref_latents_method": method}), n)
    unet2 = flux2_like().model.diffusion_model
    a = host_args(rows=1, y=None, guidance=None)
    split_checks(fl, pack, unet2, a, n)
    methods = ["index", "index_timestep_zero"] if new_host() else ["index"]
    for method in methods:
        edit = dict(a, ref_latents=[r[:1] for r in refs], kwargs={"ref_latents_method": method})
        split_checks(fl, pack, unet2, edit, n)


def controls(seed=3, double=True, single=True):
    """A Flux ControlNet's residual dict for host_args' call (tokens: 5 x 5 patches of the 9 x 10 latent)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(2, 25, 64, generator=g)
    return {"input": [r() if double else None, r() if double else None] + [r()] * 17, "middle": [],
            "output": [r() if single else None, None, r() if single else None] + [r()] * 35}


@pytest.mark.parametrize("n", SPLITS)
def test_controlnet_residuals_and_block_patches_on_both_sides(fl, pack, flux, n):
    unet = flux.model.diffusion_model
    plain = host_forward(unet, host_args())
    ref, _ = split_checks(fl, pack, unet, host_args(control=controls()), n)
    assert rel(ref, plain) > 0.01, "the residuals change the output"
    seen, slices = [], []

    def patch(args, extra):
        to = args["transformer_options"]
        seen.append((to["block_type"], to["block_index"]))
        if to["block_type"] == "single":     # 0.33: where the image tokens are (5 text tokens + 25 image tokens)
            slices.append(to.get("img_slice"))
        out = extra["original_block"](args)
        out["img"] = out["img"] * 1.1
        return out
    def post_input(args):        # e.g. an identity pack's extra image tokens; here: scaled tokens, moved positions
        seen.append(("post_input", "transformer_options" in args))
        return dict(args, img=args["img"] * 1.1, img_ids=args["img_ids"] + 0.5)
    replaced = {("double_block", 1): patch, ("single_block", 0): patch, ("single_block", 2): patch}
    a = host_args(transformer_options={"sigmas": torch.full((2,), 0.7), "patches_replace": {"dit": replaced},
                                       "patches": {"post_input": [post_input]}})
    patched, _ = split_checks(fl, pack, unet, a, n)
    assert rel(patched, plain) > 0.01 and ("double", 1) in seen and ("single", 2) in seen
    assert ("post_input", new_host()) in seen and ("post_input", not new_host()) not in seen
    assert slices and all(s == ([5, 30] if new_host() else None) for s in slices), slices
    adapter = fl.FluxAdapter(unet, n)
    reason = lambda control: adapter.own_step_reason(fl.make_call(unet, host_args(control=control), ()))
    assert reason(controls()) == "ControlNet residuals change every step"
    full = controls()       # residuals only after the blocks before the split: the decoders batch
    assert reason({"input": full["input"][:min(n, DOUBLE)], "output": full["output"][:max(n - DOUBLE, 0)]}) is None


# ------------------------------------------------------------------------------------- sampling runs

def test_all_is_bit_identical_and_uniform_counts_encoder_passes(pack, flux):
    base = ksampler(flux)
    allk, _ = apply(pack, flux, "all")
    assert torch.equal(ksampler(allk), base)
    par, config = apply(pack, flux, "uniform:2")
    out = ksampler(par)
    r = stats(config)
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (5, 5, 0), r
    assert r["decoder_batches"] == [2] * 5 and not r.get("parallel_off") and not r.get("bypassed"), r
    seq, config = apply(pack, flux, "uniform:2", parallel=False)
    assert rel(ksampler(seq), out) < 1e-5 and stats(config)["decoder_batches"] == [1] * 5
    assert torch.isfinite(out).all() and 0 < rel(out, base) < 0.5


def test_sampler_custom_node_and_the_split_setting(pack, flux):
    """SamplerCustom (dpmpp_2m, simple schedule): every split point serves; encoder_blocks moves the split."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    sigmas = comfy.samplers.calculate_sigmas(flux.get_model_object("model_sampling"), "simple", STEPS)
    pos, neg = conditioning()
    run = lambda m: SamplerCustom.execute(m, True, 0, 2.0, pos, neg, comfy.samplers.sampler_object("dpmpp_2m"),
                                          sigmas, {"samples": torch.zeros(1, *LATENT)}).result[0]["samples"]
    base = run(flux)
    assert torch.equal(run(apply(pack, flux, "all")[0]), base)
    outs = {}
    for n in SPLITS:
        m, config = apply(pack, flux, "uniform:3", encoder_blocks=n)
        outs[n] = run(m)
        r = stats(config)
        assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (3, 6, 1), r   # key 9 alone: in full
        print(f"split {n}: uniform:3 vs full {psnr(outs[n], base):.1f} dB (tiny random Flux, SamplerCustom dpmpp_2m)")
    assert torch.equal(run(apply(pack, flux, "uniform:3")[0]), outs[4]), "the default split of 5 blocks is 4"
    assert len({float(o.sum()) for o in outs.values()}) == len(SPLITS), "each split point gives its own run"


def test_psnr_of_uniform_strategies_vs_full(pack, flux):
    """A sanity figure on random weights (not a quality claim): printed with -s."""
    base = ksampler(flux)
    for strategy in ("uniform:2", "uniform:3"):
        for n in SPLITS:
            out = ksampler(apply(pack, flux, strategy, encoder_blocks=n)[0])
            assert torch.isfinite(out).all()
            print(f"{strategy} split {n}: {psnr(out, base):.1f} dB vs full (tiny random Flux, KSampler euler)")


def test_guidance_embed_model_takes_each_steps_guidance(pack, flux):
    """FluxGuidance on the positive only: cond and uncond rows carry different guidance, in every batched decoder."""
    strong, weak = conditioning(guidance=8.0), conditioning(guidance=1.0)
    out = {}
    for name, conds in (("strong", strong), ("weak", weak)):
        assert torch.equal(ksampler(apply(pack, flux, "all")[0], conds), ksampler(flux, conds))
        par = ksampler(apply(pack, flux, "uniform:2")[0], conds)
        seq = ksampler(apply(pack, flux, "uniform:2", parallel=False)[0], conds)
        assert rel(par, seq) < 1e-5, name
        out[name] = par
    assert rel(out["strong"], out["weak"]) > 0.01


def test_block_patches_run_where_their_block_runs(pack, flux):
    """A ("double_block", 0) patch is on the encoder side of the default split (4): it runs at the key steps only;
    a ("single_block", 2) patch (block 4) on the decoder side runs at every step (batched: the rows of both steps)."""
    calls = {}

    def recorder(name):
        def patch(args, extra):
            to = args["transformer_options"]
            calls.setdefault(name, set()).update(round(float(s), 5) for s in to["sigmas"])
            out = extra["original_block"](args)
            out["img"] = out["img"] * 1.1
            return out
        return patch
    m = flux.clone()
    m.set_model_patch_replace(recorder("double"), "dit", "double_block", 0)
    m.set_model_patch_replace(recorder("single"), "dit", "single_block", 2)
    import comfy.samplers
    sigmas = [round(float(s), 5) for s in comfy.samplers.calculate_sigmas(
        flux.get_model_object("model_sampling"), "simple", STEPS)[:-1]]
    base = ksampler(m)
    assert set(calls["double"]) == set(calls["single"]) == set(sigmas)
    assert torch.equal(ksampler(apply(pack, m, "all")[0]), base)
    calls.clear()
    patched, config = apply(pack, m, "uniform:2")
    out = ksampler(patched)
    assert calls["double"] == set(sigmas[::2]) and calls["single"] == set(sigmas), calls
    assert stats(config)["decoder_batches"] == [2] * 5
    unpatched = ksampler(apply(pack, flux, "uniform:2")[0])
    assert rel(out, unpatched) > 0.01 and rel(out, base) < rel(unpatched, base)


def test_controlnet_residuals_run_each_step_unbatched(pack, flux):
    """A tiny Flux ControlNet (ControlNetFlux, random weights) through ControlNetApplyAdvanced: 'all' is the host's
    run bit for bit; with key steps its decoder-side residuals change every step, so decoders run one at a time."""
    import nodes
    cnet = tm.flux_tiny_controlnet(flux)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(*conditioning(), cnet, hint, 1.0, 0.0, 1.0)
    base = ksampler(flux, (pos, neg))
    plain = ksampler(flux)
    assert rel(base, plain) > 0.01, "the ControlNet steers the run"
    assert torch.equal(ksampler(apply(pack, flux, "all")[0], (pos, neg)), base)
    par, config = apply(pack, flux, "uniform:2")
    out = ksampler(par, (pos, neg))
    r = stats(config)
    assert r["parallel_off"] == "ControlNet residuals change every step: decoders ran one step at a time", r
    assert (r["encoder_calls"], r["cached_calls"], r["decoder_batches"]) == (5, 5, [1] * 5), r
    seq = ksampler(apply(pack, flux, "uniform:2", parallel=False)[0], (pos, neg))
    assert torch.equal(out, seq)
    assert rel(out, base) < rel(out, plain), "the run follows the controlled run"


def test_batch_size_never_changes_a_sample(pack, flux):
    for strategy in ("all", "uniform:2"):
        one = ksampler(apply(pack, flux, strategy)[0], batch=1)
        two = ksampler(apply(pack, flux, strategy)[0], batch=2)
        host_one, host_two = ksampler(flux, batch=1), ksampler(flux, batch=2)
        tol = max(float((host_two[:1] - host_one).abs().max()) * 10, 1e-5)   # the host's own batch noise
        assert float((two[:1] - one).abs().max()) <= tol, strategy


# ------------------------------------------------------------------------------------- refusals

def test_a_forward_replaced_on_the_model_runs_unpatched(pack):
    """An object patch on diffusion_model.forward_orig (how caching and identity packs hook Flux): the host runs it,
    so every call runs the host's forward, bit for bit.  (Its own model: ComfyUI leaves the patch on the loaded
    module until another model loads.)"""
    import types
    from comfy.ldm.flux.model import Flux
    flux = tm.flux_tiny_model(depth=DOUBLE, depth_single_blocks=SINGLE, guidance_embed=True)
    unet = flux.model.diffusion_model

    def scaled(self, *args, **kwargs):
        return Flux.forward_orig(self, *args, **kwargs) * 0.9
    m = flux.clone()
    m.add_object_patch("diffusion_model.forward_orig", types.MethodType(scaled, unet))
    plain = ksampler(flux)
    patched, config = apply(pack, m, "uniform:2")     # the object patch is set when the model loads, after Apply
    assert config is not None
    base = ksampler(m)
    assert rel(base, plain) > 0.01
    assert torch.equal(ksampler(patched), base)
    s = stats(config)
    assert s["encoder_calls"] == s["cached_calls"] == 0 and s["full_calls"] == 10     # cond and uncond in one call
    assert s["bypassed"].startswith("passing the model through unchanged: ") and "forward_orig" in s["bypassed"]


def test_a_bad_encoder_blocks_setting_raises_at_run_time(pack, flux):
    m, _ = apply(pack, flux, "uniform:2", encoder_blocks=DOUBLE + SINGLE)
    with pytest.raises(ValueError, match=r"encoder_blocks 5 does not split Flux \(5 blocks\): set it to 1..4"):
        ksampler(m)


def test_what_the_hosts_flux_forward_does_is_read_from_its_source(fl):
    from comfy.ldm.flux.model import Flux
    new = new_host()
    assert fl.host_flux(Flux) == fl.HostFlux(options_copy=new, post_input_options=new, ref_options=new, img_slice=new,
                                             txt_ids_dims=new, timestep_zero=new)


def test_an_unknown_forward_runs_unpatched_with_one_reason(fl, pack, flux, caplog, monkeypatch):
    import inspect
    from comfy.ldm.flux.model import Flux
    orig = inspect.getsource(Flux.forward_orig)
    args = list(inspect.signature(Flux.forward_orig).parameters)
    fwd = inspect.getsource(Flux._forward)
    assert fl.read_flux_forward(fwd, orig, args).difference is None
    changed = orig.replace("img = self.final_layer(img, vec_orig",
                           "img = self.final_layer(self.final_norm(img), vec_orig")
    assert changed != orig
    diff = fl.read_flux_forward(fwd, changed, args).difference
    assert "this host's Flux forward differs" in diff and "uses self final_norm" in diff
    assert "uses args extra_tokens" in fl.read_flux_forward(fwd, orig, args + ["extra_tokens"]).difference

    class FluxWithOwnForward(Flux):        # a subclass (another model's) is never served as Flux
        def forward_orig(self, *args, **kwargs):
            return super().forward_orig(*args, **kwargs)
    m = tm.flux_tiny_model(depth=DOUBLE, depth_single_blocks=SINGLE, guidance_embed=True)
    m.model.diffusion_model.__class__ = FluxWithOwnForward
    with caplog.at_level(logging.INFO):
        (out,) = pack.Apply.execute(m, "uniform:2", True, 32)
    lines = [r.getMessage() for r in caplog.records if "FasterDiffusion" in r.getMessage()]
    assert out is m and lines == ["FasterDiffusion: passing the model through unchanged: FluxWithOwnForward is not a "
                                  "model FasterDiffusion serves (ComfyUI's UNetModel: SD1.x, SD2.x, SDXL, SVD; Flux; "
                                  "Wan 2.x)"]
    caplog.clear()
    monkeypatch.setattr(fl, "host_flux", lambda cls: fl.HostFlux(difference=diff))
    with caplog.at_level(logging.INFO):
        (out,) = pack.Apply.execute(flux, "uniform:2", True, 32)
    lines = [r.getMessage() for r in caplog.records if "FasterDiffusion" in r.getMessage()]
    assert out is flux and lines == [f"FasterDiffusion: passing the model through unchanged: {diff}"]


def test_the_faster_diffusion_ksampler_node_serves_flux(pack, flux, caplog):
    """The sampler nodes own their run on a plain model: on Flux they serve it as Apply does (`all`: the plain
    KSampler bit for bit)."""
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]

    def fd(strategy):
        pos, neg = conditioning()
        (out,) = node.execute(flux, 0, STEPS, 2.0, "euler", "simple", pos, neg,
                              {"samples": torch.zeros(1, *LATENT)}, 1.0, strategy, True, 32, 0.0, 500.0)
        return out["samples"]
    import logging
    assert torch.equal(fd("all"), ksampler(flux))
    with caplog.at_level(logging.INFO):
        out = fd("uniform:2")
    assert torch.isfinite(out).all() and rel(out, ksampler(flux)) < 0.5
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FasterDiffusion [uniform:2]")]
    assert len(line) == 1 and "encoder ran 5x and was skipped 5x" in line[0], line
