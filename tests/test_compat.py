"""The compatibility matrix (README "Works with"): ComfyUI features combined with FasterDiffusion Apply on the
digits test model, each run through ComfyUI's own KSampler node.

Every row checks, unless it says otherwise: (a) strategy ``all`` is bit-identical to the same workflow without
FasterDiffusion; (b) with ``uniform:2`` (keys 0,2,4,6,8 of 10 steps) the encoder is skipped at the non-key
steps (stats), the output is finite and close to the full run (PSNR of the decoded digits, printed at the end
with ``-s``), and the feature's effect survives (FasterDiffusion's with-minus-without points the way the full
model's does); (c) parallel decoders equal sequential ones.  PAG/SAG/RescaleCFG's mechanism is in
test_guidance.py; here they only get their row.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

import testmodel as tm
from conftest import apply
from test_guidance import pag, sag

STEPS = 10
KEYS = "uniform:2"
DIGITS = [3, 8]
PSNR: dict[str, float] = {}
COSINE: dict[str, float] = {}     # of FasterDiffusion's effect with the full model's


@pytest.fixture(scope="module", autouse=True)
def psnr_table():
    yield
    print("\nPSNR of uniform:2 vs the full run, decoded digits (dB); cosine of the feature's effects:")
    for row, db in PSNR.items():
        print(f"  {row:42s} {db:6.1f}  {COSINE.get(row, float('nan')):5.2f}")


def ksampler(model, pos, neg, latent=None, cfg=3.0, sampler="euler", denoise=1.0):
    """ComfyUI's KSampler node; the global RNG is seeded for patches that draw from it (ToMe)."""
    import nodes
    torch.manual_seed(0)
    latent = latent or {"samples": torch.zeros(len(DIGITS), 4, 8, 8)}
    (out,) = nodes.KSampler().sample(model, 0, STEPS, cfg, sampler, "normal", pos, neg, latent, denoise)
    return out["samples"]


def psnr(a, b):
    mse = float(((tm.decode(a) - tm.decode(b)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def cosine(a, b):
    return float(a.flatten() @ b.flatten() / a.norm() / b.norm())


def check_row(pack, row, featured, plain, conds, plain_conds=None, min_psnr=20.0, min_cos=0.7, plain_kw=None, **kw):
    """The row's three checks; ``plain``/``plain_conds``/``plain_kw``: the same workflow without the feature.
    Returns (FasterDiffusion output, full output, the run's stats)."""
    plain_conds = plain_conds or conds
    plain_kw = kw if plain_kw is None else plain_kw
    base = ksampler(featured, *conds, **kw)
    all_model, all_config = apply(pack, featured, "all")
    assert torch.equal(ksampler(all_model, *conds, **kw), base), f"{row}: 'all' must be bit-identical"
    calls = all_config.reports[-1]["full_calls"]
    fd_model, config = apply(pack, featured, KEYS)
    out = ksampler(fd_model, *conds, **kw)
    r = config.reports[-1]
    assert torch.isfinite(out).all()
    assert r["full_calls"] + r["encoder_calls"] + r["cached_calls"] == calls
    assert r["cached_calls"] >= calls // 2 - r["fallback_calls"] > 0, r
    PSNR[row] = psnr(out, base)
    assert PSNR[row] > min_psnr, f"{row}: {PSNR[row]:.1f} dB"
    effect = base - ksampler(plain, *plain_conds, **plain_kw)
    assert effect.norm() > 0.02 * base.norm(), f"{row}: the feature acts on this model"
    fd_effect = out - ksampler(apply(pack, plain, KEYS)[0], *plain_conds, **plain_kw)
    COSINE[row] = cosine(fd_effect, effect)
    if min_cos is None:        # an effect without a direction (random token merges): it must still act
        assert fd_effect.norm() > 0.5 * effect.norm(), row
    else:
        assert cosine(fd_effect, effect) > min_cos, f"{row}: the effect is lost ({cosine(fd_effect, effect):.2f})"
    seq = ksampler(apply(pack, featured, KEYS, parallel=False)[0], *conds, **kw)
    assert psnr(seq, base) > min_psnr, f"{row}: sequential decoders {psnr(seq, base):.1f} dB"
    if min_cos is not None:
        assert float((seq - out).norm() / out.norm()) < 1e-4, f"{row}: parallel must equal sequential"
    return out, base, r


def conditioning(tok, digits=DIGITS):
    return tm.digit_conditioning(tok, digits)


# ------------------------------------------------------------------------------------- model patches

def freeu(model):
    from comfy_extras.nodes_freelunch import FreeU
    return FreeU().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


def freeu_v2(model):
    from comfy_extras.nodes_freelunch import FreeU_V2
    return FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


def rescale_cfg(model):
    from comfy_extras.nodes_model_advanced import RescaleCFG
    return RescaleCFG().patch(model, 0.7)[0]


def tome(model):
    from comfy_extras.nodes_tomesd import TomePatchModel
    return TomePatchModel.execute(model, 0.5).result[0]


def hypertile(model):
    from comfy_extras.nodes_hypertile import HyperTile
    return HyperTile.execute(model, 32, 2, 0, False)[0]     # 8x8 latent -> four 4x4 tiles


def deep_shrink(model):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale
    return PatchModelAddDownscale.execute(model, 1, 2.0, 0.0, 0.5, True, "bicubic", "bicubic").result[0]


def v_prediction_zsnr(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    return ModelSamplingDiscrete().patch(model, "v_prediction", True)[0]


def ip_adapter_style(model, weight=1.0):
    """IPAdapter's way in: attn2 replace patches on every transformer block, adding attention to extra
    (image) tokens on the cond rows only, as IPAdapter does with its uncond embeds."""
    from comfy.ldm.modules.attention import optimized_attention
    tokens = {}

    def image_tokens(dim):
        if dim not in tokens:
            g = torch.Generator().manual_seed(dim)
            tokens[dim] = (torch.randn(1, 4, dim, generator=g), torch.randn(1, 4, dim, generator=g))
        return tokens[dim]

    def attn2(q, k, v, extra):
        heads = extra["n_heads"]
        out = optimized_attention(q, k, v, heads)
        chunks = extra["cond_or_uncond"]
        is_cond = torch.tensor([float(c == 0) for c in chunks]).repeat_interleave(q.shape[0] // len(chunks))
        ik, iv = (t.expand(q.shape[0], -1, -1) for t in image_tokens(q.shape[-1]))
        return out + weight * is_cond.view(-1, 1, 1) * optimized_attention(q, ik, iv, heads)

    m = model.clone()
    for block, n in [("input", 1), ("input", 3), ("input", 5), ("middle", 0)] + [("output", i) for i in range(6)]:
        m.set_model_attn2_replace(attn2, block, n)
    return m


MODEL_PATCHES = {   # row -> (patch, min cosine of the effects: None for ToMe's random merges)
    "FreeU": (freeu, 0.7), "FreeU_V2": (freeu_v2, 0.7), "PAG": (pag, 0.7), "SelfAttentionGuidance": (sag, 0.7),
    "RescaleCFG": (rescale_cfg, 0.7), "TomePatchModel": (tome, None), "HyperTile": (hypertile, 0.7),
    "PatchModelAddDownscale": (deep_shrink, 0.7), "ModelSamplingDiscrete v_prediction zsnr": (v_prediction_zsnr, 0.7),
    "attn2 replace (IPAdapter-style)": (ip_adapter_style, 0.7),
}


@pytest.mark.parametrize("row", list(MODEL_PATCHES))
def test_model_patch(pack, digits, row):
    model, tok = digits
    patch, min_cos = MODEL_PATCHES[row]
    check_row(pack, row, patch(model), model, conditioning(tok), min_cos=min_cos)


def test_attn2_replace_with_a_sigma_window_snaps_to_key_steps(pack, digits):
    """IPAdapter's start_at/end_at: its patch reads ONE sigma per call (``sigmas[0]``).  A batched decoder
    call holds a group's steps, so with parallel decoders a group that straddles the window's edge takes
    its key step's side of it: the edge moves to the group's end.  With parallel off each step decides."""
    import comfy.samplers
    model, tok = digits
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)

    def windowed(end_step):      # the patch acts down to the sigma between steps end_step and end_step + 1
        end = float(sigmas[end_step] + sigmas[end_step + 1]) / 2
        patched = ip_adapter_style(model, weight=2.0)
        replace = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
        inner = replace[("input", 1)]

        def attn2(q, k, v, extra):
            from comfy.ldm.modules.attention import optimized_attention
            if extra["sigmas"].detach().cpu()[0].item() < end:     # as ComfyUI_IPAdapter_plus reads it
                return optimized_attention(q, k, v, extra["n_heads"])
            return inner(q, k, v, extra)
        for block in list(replace):
            patched.set_model_attn2_replace(attn2, *block)
        return patched

    conds = conditioning(tok)
    base = ksampler(windowed(2), *conds)
    for parallel in (True, False):
        assert torch.equal(ksampler(apply(pack, windowed(2), "all", parallel)[0], *conds), base)
    par = ksampler(apply(pack, windowed(2), KEYS)[0], *conds)         # group (2, 3) straddles the edge
    seq = ksampler(apply(pack, windowed(2), KEYS, parallel=False)[0], *conds)
    seq_group_end = ksampler(apply(pack, windowed(3), KEYS, parallel=False)[0], *conds)
    PSNR["attn2 replace, sigma window, parallel"] = psnr(par, base)
    PSNR["attn2 replace, sigma window, sequential"] = psnr(seq, base)
    assert psnr(par, base) > 20 and psnr(seq, base) > 20
    assert float((par - seq_group_end).norm() / par.norm()) < 1e-4, "parallel: the edge at the group's end"
    assert float((par - seq).norm() / par.norm()) > 1e-2, "sequential: the edge where the patch puts it"


# ------------------------------------------------------------------------------------- LoRA

def write_random_lora(model, path, rank=4, scale=0.15, seed=0):
    """A LoRA in the kohya format ComfyUI loads (lora_unet_<module path>.lora_up/.lora_down/.alpha) for
    every linear layer of the UNet's transformer blocks, encoder and decoder side, random weights."""
    import safetensors.torch
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, w in model.model.diffusion_model.state_dict().items():
        if "transformer_blocks" in name and name.endswith(".weight") and w.dim() == 2:
            key = "lora_unet_" + name[:-len(".weight")].replace(".", "_")
            sd[key + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
            sd[key + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * scale
            sd[key + ".alpha"] = torch.tensor(float(rank))
    safetensors.torch.save_file(sd, str(path))
    return len(sd) // 3


@pytest.mark.parametrize("node", ["LoraLoaderModelOnly", "LoraLoader"])
def test_lora(pack, digits, tmp_path, node):
    """ComfyUI's LoRA loader nodes: weights patched in for the run (both UNet halves), and out again after:
    the model then equals the original, weight for weight and sample for sample."""
    import comfy.model_management
    import folder_paths
    import nodes
    model, tok = digits
    modules = write_random_lora(model, tmp_path / "fd_random_lora.safetensors")
    assert modules == 100     # 10 transformer blocks x (attn1, attn2: q k v out; ff: 2)
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    loader = nodes.NODE_CLASS_MAPPINGS[node]()
    if node == "LoraLoader":     # no CLIP here: the model half of LoraLoader, strength_clip unused
        lora_model = loader.load_lora(model, None, "fd_random_lora.safetensors", 1.0, 1.0)[0]
    else:
        lora_model = loader.load_lora_model_only(model, "fd_random_lora.safetensors", 1.0)[0]
    assert len(lora_model.patches) == modules
    conds = conditioning(tok)
    original = {k: v.clone() for k, v in model.model.state_dict().items()}
    plain = ksampler(model, *conds)
    ksampler(apply(pack, lora_model, KEYS)[0], *conds)
    assert torch.equal(ksampler(model, *conds), plain), "the LoRA is patched out after a FasterDiffusion run"
    check_row(pack, node, lora_model, model, conds)
    comfy.model_management.unload_all_models()
    assert all(torch.equal(v, original[k]) for k, v in model.model.state_dict().items()), "LoRA unpatched"
    assert torch.equal(ksampler(model, *conds), plain)


# ------------------------------------------------------------------------------------- conditioning

def test_area_conditioning(pack, digits):
    """ConditioningSetArea: a second prompt on the left half of the latent; ComfyUI runs it as a call on
    the cropped latent (another call slot, its own cached features)."""
    import nodes
    model, tok = digits
    pos, neg = conditioning(tok)
    eight, _ = conditioning(tok, [8, 8])
    (left,) = nodes.ConditioningSetArea().append(eight, 32, 64, 0, 0, 1.0)    # pixels: the 8x8 latent is 64x64
    (both,) = nodes.ConditioningCombine().combine(pos, left)
    check_row(pack, "ConditioningSetArea", model, model, (both, neg), (pos, neg))


def test_timestep_range_conditioning(pack, digits):
    """ConditioningSetTimestepRange: one prompt for the first 30 % of the schedule (steps 0-2), another after.  The
    prompt that takes over at a non-key step has no cached features of its own in that group: that call
    runs in full (counted, said in the stats line), never on the other prompt's features."""
    import nodes
    model, tok = digits
    pos, neg = conditioning(tok)
    other, _ = conditioning(tok, [1, 1])
    (early,) = nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.3)
    (late,) = nodes.ConditioningSetTimestepRange().set_range(other, 0.3, 1.0)
    (both,) = nodes.ConditioningCombine().combine(early, late)
    out, base, r = check_row(pack, "ConditioningSetTimestepRange", model, model, (both, neg), (pos, neg))
    assert r["fallback_calls"] == 1, r     # step 3, the first step of the second prompt


# ------------------------------------------------------------------------------------- inpainting

def inpaint_model(digits_model, seed=0):
    """A 9-channel digits-shaped UNet, which ComfyUI makes its inpaint type (concat_keys mask +
    masked_image) from in_channels > 4 as for SD1.5-inpainting checkpoints.  Initialised as SD-inpainting
    was: the trained model's weights, random (fan-in) weights for the 5 extra input channels."""
    mc = tm.digits_model_config()
    mc.unet_config["in_channels"] = 9
    sd = {k: v.clone() for k, v in digits_model.model.diffusion_model.state_dict().items()}
    conv_in = sd["input_blocks.0.0.weight"]
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(conv_in.shape[0], 5, 3, 3, generator=g) / (9 * 9) ** 0.5
    sd["input_blocks.0.0.weight"] = torch.cat([conv_in, extra], dim=1)
    model = tm.build_model_patcher(mc, sd)
    assert model.model.concat_keys == ("mask", "masked_image")
    return model


@pytest.mark.parametrize("how", ["SetLatentNoiseMask", "concat conditioning"])
def test_inpainting_model(pack, digits, how):
    """The 9-channel input (latent + mask + masked image) reaches the encoder at key steps; the noise mask
    keeps the unmasked half at the input latent in both runs.  ``concat conditioning`` is what
    InpaintModelConditioning sets on the prompts (concat_latent_image, concat_mask; its VAE encode is
    left out: the digits model has no VAE)."""
    import node_helpers
    import nodes
    _, tok = digits
    model = inpaint_model(digits[0])
    image = tm.sample_digits(digits[0], tok, DIGITS, steps=10)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0                          # repaint the right half
    (latent,) = nodes.SetLatentNoiseMask().set_mask({"samples": image}, mask)
    pos, neg = conditioning(tok)
    if how == "concat conditioning":
        values = {"concat_latent_image": image * (mask[:, None, ::8, ::8] < 0.5), "concat_mask": mask[:, None]}
        pos, neg = (node_helpers.conditioning_set_values(c, values) for c in (pos, neg))
    plain = {"samples": image}   # the feature: the mask (without it the whole latent is resampled)
    out, base, _ = check_row(pack, f"inpainting model, {how}", model, model, (pos, neg), latent=latent,
                             plain_kw={"latent": plain})
    keep = mask[:, None, ::8, ::8].expand_as(image) < 0.5
    assert torch.allclose(out[keep], image[keep]) and torch.allclose(base[keep], image[keep])


# ------------------------------------------------------------------------------------- other caches

def check_stays_out(pack, featured, alone, conds, caplog, why, keys=KEYS):
    """FasterDiffusion Apply on ``featured`` leaves its run alone: the result is ``alone`` bit for bit, one log line
    says ``why``, and the stats count every call as full.  Returns the run's stats."""
    fd, config = apply(pack, featured, keys)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out = ksampler(fd, *conds)
    assert torch.equal(out, alone)
    lines = [r.getMessage() for r in caplog.records if "FasterDiffusion" in r.getMessage()]
    assert lines == [f"FasterDiffusion [{keys}]: {STEPS} steps; {why}"]
    r = config.reports[-1]
    assert (r["full_calls"], r["cached_calls"]) == (STEPS, 0), "a bypassed run counts its calls, outside the UNet"
    return r

def cache_node(name, model):
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    node = {"EasyCache": EasyCacheNode, "LazyCache": LazyCacheNode}[name]
    return node.execute(model, 0.2, 0.0, 1.0, False).result[0]    # from step 0: it skips several steps


@pytest.mark.parametrize("order", ["cache, then Apply", "Apply, then cache"])
@pytest.mark.parametrize("name", ["EasyCache", "LazyCache"])
def test_easycache_and_lazycache_pass_through(pack, digits, caplog, name, order):
    """Both skip work at the same steps, each on the other's approximation: FasterDiffusion stays out of
    the run (every call in full, so the cache node alone decides), with one log line, in either order."""
    model, tok = digits
    conds = conditioning(tok)
    cached = cache_node(name, model)
    alone = ksampler(cached, *conds)
    assert float((alone - ksampler(model, *conds)).norm()) > 0, f"{name} skips steps on this model"
    both = apply(pack, cached, KEYS)[0] if order == "cache, then Apply" else cache_node(name, apply(pack, model, KEYS)[0])
    config = both.model_options["transformer_options"][pack.cu.KEY]
    with caplog.at_level(logging.INFO):
        out = ksampler(both, *conds)
    assert torch.equal(out, alone)
    lines = [r.getMessage() for r in caplog.records if "FasterDiffusion" in r.getMessage()]
    assert lines == [f"FasterDiffusion [{KEYS}]: {STEPS} steps; {name} is also applied to this model: "
                     f"every step ran in full, {name} alone decides what to skip"]
    assert config.reports[-1]["cached_calls"] == 0


def test_a_diffusion_model_wrapper_inside_faster_diffusions_runs_every_step_in_full(pack, digits, caplog):
    """A DIFFUSION_MODEL wrapper added after Apply (AnimateDiff-Evolved adds one at sampling time for its GroupNorm
    hack) sits inside FasterDiffusion's and wraps the host's forward, which the split's calls go around: the run
    computes every step in full through it (bit for bit), one log line names it.  Added before Apply, it is outside
    and wraps the split's calls too: served."""
    import comfy.patcher_extension
    model, tok = digits
    conds = conditioning(tok)
    calls = []

    def halve_noise(executor, x, *args, **kwargs):       # a wrapper that changes what the forward computes
        calls.append(x.shape[0])
        return executor(x * 0.5, *args, **kwargs)

    def wrapped(m):
        m = m.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "halve", halve_noise)
        return m
    alone = ksampler(wrapped(model), *conds)
    inside = wrapped(apply(pack, model, KEYS)[0])
    config = inside.model_options["transformer_options"][pack.cu.KEY]      # the clone's own copy
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out = ksampler(inside, *conds)
    assert torch.equal(out, alone)
    lines = [r.getMessage() for r in caplog.records if "FasterDiffusion" in r.getMessage()]
    assert lines == [f"FasterDiffusion [{KEYS}]: {STEPS} steps; a DIFFUSION_MODEL wrapper inside FasterDiffusion's "
                     f"({__name__}.{halve_noise.__qualname__}) wraps the UNet's forward, which the split would go "
                     "around at every served call: every step ran in full (apply that wrapper's node before "
                     "FasterDiffusion Apply to put it outside)"]
    r = config.reports[-1]
    assert (r["full_calls"], r["cached_calls"]) == (STEPS, 0), r
    outside, config = apply(pack, wrapped(model), KEYS)
    calls.clear()
    served = ksampler(outside, *conds)
    r = config.reports[-1]
    assert not r.get("bypassed") and r["cached_calls"] > 0 and len(calls) == STEPS, (r, calls)
    assert psnr(served, alone) > 20


def test_torch_compile_model(pack, digits, caplog):
    """TorchCompileModel compiles the UNet's whole forward with FasterDiffusion's hook inside it.  Where the compiled
    UNet keeps guards on transformer_options (0.3.75), a run that skips steps serves outside dynamo's trace with the
    split's encoder and decoder compiled instead: one graph for the encoder, one per power-of-two bucket of decoder
    rows, none per step, the same image as the eager run within float noise.
    Where it keeps none (0.33), and for a run with nothing to skip, FasterDiffusion leaves the compiled UNet alone
    (bit for bit) with one log line; either way the stats count every call."""
    from importlib import import_module
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    model, tok = digits
    conds = conditioning(tok)
    compiled = TorchCompileModel.execute(model, "inductor").result[0]
    try:
        alone = ksampler(compiled, *conds)
    except Exception as e:      # inductor needs a C++ compiler on CPU
        pytest.skip(f"torch.compile cannot compile on this host: {type(e).__name__}: {str(e)[:200]}")
    check_stays_out(pack, compiled, alone, conds, caplog, "TorchCompileModel: every step is a key step, so the "
                    "compiled UNet ran every step in full, untouched", keys="all")
    settings = compiled.model_options["torch_compile_kwargs"]
    compile_glue = import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".compile")
    if not compile_glue.keeps_guards(settings):
        check_stays_out(pack, compiled, alone, conds, caplog, "TorchCompileModel compiled the whole UNet without "
                        "guards on transformer_options, so per-step encoder skipping cannot run inside it: every "
                        "step ran in full (compiled)")
        return
    eager, config = apply(pack, model, KEYS)
    reference = ksampler(eager, *conds)
    fd, config = apply(pack, compiled, KEYS)
    out = ksampler(fd, *conds)
    r = config.reports[-1]
    assert not r.get("bypassed") and (r["encoder_calls"], r["cached_calls"]) == (5, 5), r
    assert float((out - reference).norm() / reference.norm()) < 1e-4
    split = compile_glue.compiled_split(model.model.diffusion_model, settings)
    assert split.graphs == {"encoder": 1, "decoder": 1}, split.graphs     # 2 steps x 2 rows: the bucket of 4
    (uneven,) = pack.Apply.execute(compiled, "0,3,4,7", True, 32)       # groups of 3, 1, 3 and 3 steps
    ksampler(uneven, *conds)
    # two buckets more: 8 rows for the three groups of 3 steps (6 rows), 2 for the lone key step's own decoder
    assert split.graphs == {"encoder": 1, "decoder": 3}, split.graphs
    ksampler(fd, *conds)
    ksampler(uneven, *conds)
    assert split.graphs == {"encoder": 1, "decoder": 3}, "later runs compile nothing"
