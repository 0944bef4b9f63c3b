"""TiUE one-pass sampling: the engine's closed form, the ComfyUI node, the distillation trainer.

Engine: the DDIM coefficients against the method notes' numbers, and the one batched pass equal to K decoders
run one at a time with K sequential DDIM updates (fake adapter: every row's output depends on its own
timestep; the real ldm adapter on the digits UNet).  Node: in the real ComfyUI on the test model, on a v-pred
model, on a student saved by the trainer and loaded with ComfyUI's own loader, bad K, over HTTP.  Trainer: a
few steps on the test model; a checkpointed and resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace
from importlib import import_module

import pytest
import requests
import torch
from hypothesis import given, settings, strategies as st

import testmodel as tm
from fasterdiffusion import onepass as op
from fasterdiffusion import tiue
from fasterdiffusion.runtime import Features, ModelCall


def sd_alphas():
    """SD's scaled-linear schedule (what diffusers' DDIM and ComfyUI's SD models use), float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# ----------------------------------------------------------------------------------------------- engine

def test_coefficients_are_the_method_notes_numbers():
    a = sd_alphas()
    ts = op.ddim_timesteps(4)
    assert ts == [751, 501, 251, 1]
    s, e = op.ddim_coefficients([a[t] for t in ts], a[0], "eps")   # set_alpha_to_one=False: lands on alpha-bar_0
    assert s == pytest.approx(4.2346, abs=1e-4)
    assert e == pytest.approx([-2.4919, -0.9249, -0.6568, -0.0121], abs=1e-4)
    s1, e1 = op.ddim_coefficients([a[t] for t in ts], 1.0, "eps")   # a clean end would give another last weight
    assert e1[-1] == pytest.approx(-0.0413, abs=1e-4) and s1 != pytest.approx(s, abs=1e-4)
    assert op.ddim_timesteps(2) == [501, 1] and op.ddim_timesteps(50)[:2] == [981, 961]


@pytest.mark.parametrize("k", [0, -1, 1000, 1001, True, 2.0])
def test_bad_k_is_refused_by_the_engine(k):
    with pytest.raises(op.OnePassError):
        op.ddim_timesteps(k)


class RowAdapter:
    """A UNet stand-in whose decoder output depends nonlinearly on the features, its row's timestep and its
    row's conditioning; counts encoder calls and decoder widths."""

    def __init__(self):
        self.encoded, self.widths = 0, []

    def embed(self, call):
        return call.timesteps.float()

    def encode(self, call, emb):
        self.encoded += 1
        return Features([torch.tanh(call.x)], torch.sin(call.x) + emb.view(-1, 1, 1, 1) / 1000)

    def decode(self, call, features, emb):
        self.widths.append(call.rows)
        assert call.x is None, "a decoder never reads the latent"
        t = emb.view(-1, 1, 1, 1)
        ctx = call.context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.cos(features.mid * (1 + t / 300)) + features.skips[0] * ctx + 0.01 * t.sqrt()

    def tile(self, call, n, timesteps, sigmas):
        ctx = torch.cat([call.context] * n)
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, context=ctx)

    def own_step_reason(self, call):
        return None


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 12), b=st.integers(1, 3), cap=st.integers(0, 9), v=st.booleans(), seed=st.integers(0, 99))
def test_one_pass_equals_sequential_ddim_on_frozen_features(k, b, cap, v, seed):
    g = torch.Generator().manual_seed(seed)
    a = sd_alphas()
    ts = op.ddim_timesteps(k)
    x = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64)
    call = ModelCall(x, torch.full((b,), float(ts[0]), dtype=torch.float64), torch.randn(b, 2, 5, generator=g,
                     dtype=torch.float64), None, x.dtype)
    pred = "v" if v else "eps"
    ad = RowAdapter()
    res = op.one_pass(ad, call, ts, a, float(a[0]), cap, pred)
    assert ad.encoded == 1, "the encoder runs once"
    assert sum(ad.widths) == k * b and (cap == 0 or max(ad.widths) <= max(b, cap)), ad.widths
    assert res.decoder_batches == [w // b for w in ad.widths]
    ref, outs = op.sequential(RowAdapter(), call, ts, a, float(a[0]), pred)
    for o, r in zip(res.outputs, outs):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.latent, ref, rtol=1e-9, atol=1e-9)


def test_first_timestep_must_match_the_call():
    a = sd_alphas()
    call = ModelCall(torch.zeros(1, 4, 2, 2), torch.tensor([500.0]), torch.zeros(1, 1, 1), None, torch.float32)
    with pytest.raises(op.OnePassError, match="first DDIM timestep"):
        op.one_pass(RowAdapter(), call, [751, 501], a, float(a[0]))


# ----------------------------------------------------------------------------------------------- losses

def test_kl_term_is_the_gaussian_kl_summed_over_every_map():
    g = torch.Generator().manual_seed(0)
    std = [torch.randn(3, 4, 16, 16, generator=g) for _ in range(4)]
    assert float(tiue.kl_loss(std)) < 0.01 * 12, "standard normal maps cost (almost) nothing"
    wide = [2 * o + 0.5 for o in std]
    mu = torch.stack([o.flatten(1).mean(1) for o in wide])
    var = torch.stack([o.flatten(1).var(1, correction=0) for o in wide])
    expect = 0.1 * (0.5 * (var + mu ** 2 - 1 - var.log())).sum()
    assert float(tiue.kl_loss(wide)) == pytest.approx(float(expect), rel=1e-5)
    assert float(tiue.kl_loss(wide, weight=0.3)) == pytest.approx(3 * float(expect), rel=1e-5)
    scale = torch.tensor(2.0, requires_grad=True)
    tiue.kl_loss([scale * o for o in std]).backward()
    assert scale.grad > 0, "descending the KL term shrinks a too-wide noise map towards unit variance"
    per_map = float(tiue.kl_loss(wide, reduce="mean"))
    assert per_map == pytest.approx(float(expect) / 12, rel=1e-5), "mean: the sum over the 4 x 3 maps, divided by 12"
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        tiue.kl_loss(wide, reduce="max")


def test_regression_term_pulls_the_sample_to_the_teachers():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 3, 3, generator=g)
    tiue.regression_loss(x0, target).backward()
    torch.testing.assert_close(x0.grad, 2 * (x0 - target).detach() / x0.numel())


def test_vsd_gradient_is_sigma_squared_times_the_score_difference():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    e_t, e_f = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    alpha = torch.tensor([0.3, 0.9])
    tiue.vsd_loss(x0, e_t, e_f, alpha).backward()
    expect = (1 - alpha).view(-1, 1, 1, 1) * (e_t - e_f) / x0.numel()
    torch.testing.assert_close(x0.grad, expect)


def test_dmd_weighting_is_the_normalised_x0_prediction_difference():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    x_t, e_t, e_f = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    alpha = torch.tensor([0.3, 0.9])
    tiue.vsd_loss(x0, e_t, e_f, alpha, "dmd", x_t).backward()
    a = alpha.view(-1, 1, 1, 1)
    x0_teacher, x0_fake = (x_t - (1 - a).sqrt() * e_t) / a.sqrt(), (x_t - (1 - a).sqrt() * e_f) / a.sqrt()
    norm = (x0.detach() - x0_teacher).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x0.grad, (x0_fake - x0_teacher) / norm / x0.numel())
    with pytest.raises(ValueError, match="x_t"):
        tiue.vsd_loss(x0, e_t, e_f, alpha, "dmd")


# ----------------------------------------------------------------------------------------------- ComfyUI

@pytest.fixture(scope="module")
def onepass(pack):
    import nodes
    package = pack.cu.__name__.rsplit(".", 3)[0]
    glue = import_module(package + ".patches.comfy.onepass")
    return nodes.NODE_CLASS_MAPPINGS["FasterDiffusionOnePass"], glue, import_module(package + ".fasterdiffusion.onepass")


def reference(pack, engine, model, positive_ctx, noise, k, prediction):
    """The node's latent computed without ComfyUI's sampling: frozen features, K sequential DDIM updates."""
    ms = model.get_model_object("model_sampling")
    a = 1 / (1 + ms.sigmas.double() ** 2)
    ts = engine.ddim_timesteps(k)
    unet = model.model.diffusion_model
    call = pack.ldm.make_call(noise, torch.full((noise.shape[0],), float(ts[0])), positive_ctx, None, None, {}, {})
    with torch.no_grad():
        z, _ = engine.sequential(pack.ldm.LdmUNetAdapter(unet), call, ts, a, float(a[0]), prediction)
    return model.model.process_latent_out(z)


def run_node(node, model, positive, batch, seed=3, k=4, cap=32, caplog=None):
    latent = {"samples": torch.zeros(batch, 4, tm.LATENT_SIZE, tm.LATENT_SIZE)}
    with caplog.at_level(logging.INFO, logger="FasterDiffusion"):
        caplog.clear()
        (out,) = node.execute(model, positive, latent, seed, k, cap)
    texts = [r.getMessage() for r in caplog.records if "One-Pass" in r.getMessage()]
    assert len(texts) == 1
    return out["samples"], texts[0]


def test_node_on_the_test_model_is_the_sequential_reference(pack, onepass, digits, caplog):
    import comfy.sample
    node, glue, engine = onepass
    model, tokens = digits
    pos, _ = tm.digit_conditioning(tokens, [1, 4, 7])
    out, text = run_node(node, model, pos, 3, seed=11, cap=4, caplog=caplog)
    noise = comfy.sample.prepare_noise(torch.zeros(3, 4, tm.LATENT_SIZE, tm.LATENT_SIZE), 11)   # KSampler's noise
    torch.testing.assert_close(out, reference(pack, engine, model, pos[0][0], noise, 4, "eps"), rtol=1e-4, atol=1e-4)
    assert "K=4 DDIM steps [751, 501, 251, 1] (eps), encoder ran 1x, decoder batches [1, 1, 1, 1]" in text, text
    assert "not a recognised TiUE student: only distilled students give good images" in text
    assert list(tm.classify(tm.decode(out))) == [1, 4, 7], "the teacher's one pass already draws its digits"


def test_a_non_empty_latent_enters_in_the_models_latent_format(pack, onepass, digits, caplog):
    """process_latent_in on the way in (with KSampler's weight at denoise 1: latent / sigma_max next to the unit
    noise), process_latent_out on the way out; batch_index picks KSampler's noise rows."""
    import comfy.sample
    node, glue, engine = onepass
    model, tokens = digits
    pos, _ = tm.digit_conditioning(tokens, [2, 8])
    image = torch.rand(2, 4, tm.LATENT_SIZE, tm.LATENT_SIZE, generator=torch.Generator().manual_seed(3)) * 20
    latent = {"samples": image, "batch_index": [5, 1]}
    with caplog.at_level(logging.INFO, logger="FasterDiffusion"):
        (out,) = node.execute(model, pos, latent, 9, 4, 32)
    noise = comfy.sample.prepare_noise(image, 9, [5, 1])
    sigma_max = float(model.get_model_object("model_sampling").sigma_max)
    z_k = noise + model.model.process_latent_in(image) / sigma_max
    torch.testing.assert_close(out["samples"], reference(pack, engine, model, pos[0][0], z_k, 4, "eps"),
                               rtol=1e-4, atol=1e-4)
    assert out["batch_index"] == [5, 1]


def test_node_handles_v_prediction_exactly(pack, onepass, digits, caplog):
    import comfy.sample
    node, glue, engine = onepass
    model = tm.vpred_tiny_model(seed=5)
    _, tokens = digits
    pos, _ = tm.digit_conditioning(tokens, [2, 5])
    out, text = run_node(node, model, pos, 2, seed=4, k=3, cap=0, caplog=caplog)
    noise = comfy.sample.prepare_noise(torch.zeros(2, 4, tm.LATENT_SIZE, tm.LATENT_SIZE), 4)
    ref_v = reference(pack, engine, model, pos[0][0], noise, 3, "v")
    torch.testing.assert_close(out, ref_v, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, reference(pack, engine, model, pos[0][0], noise, 3, "eps"), atol=1e-2)
    assert "(v)" in text and "decoder batches [3]" in text and "not a recognised TiUE student" in text


def test_node_runs_on_sdxl_with_its_adm_conditioning(onepass, caplog):
    node, glue, engine = onepass
    g = torch.Generator().manual_seed(2)
    pos = [[torch.randn(2, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g), {"pooled_output": torch.randn(2, 1280, generator=g)}]]
    out, text = run_node(node, tm.sdxl_tiny_model(), pos, 2, k=4, caplog=caplog)
    assert out.shape == (2, 4, tm.LATENT_SIZE, tm.LATENT_SIZE) and torch.isfinite(out).all()
    assert "encoder ran 1x, decoder batches [4]" in text


def test_bad_k_and_unservable_models_are_refused(onepass, digits):
    node, glue, engine = onepass
    model, tokens = digits
    pos, _ = tm.digit_conditioning(tokens, [0])
    latent = {"samples": torch.zeros(1, 4, tm.LATENT_SIZE, tm.LATENT_SIZE)}
    spec = node.INPUT_TYPES()["required"]["K"][1]
    assert (spec["min"], spec["max"], spec["default"]) == (2, 100, 4)
    for k in (0, 1, 101):
        with pytest.raises(engine.OnePassError, match="K must be"):
            node.execute(model, pos, latent, 0, k)
    with pytest.raises(engine.OnePassError, match="SD-architecture UNets"):
        node.execute(tm.flux_tiny_model(), pos, latent, 0, 4)
    split = import_module(glue.__name__.rsplit(".", 3)[0] + ".fasterdiffusion.ldm")
    with pytest.MonkeyPatch.context() as mp:      # the real reason, as Apply gives it (e.g. a forward not mirrored)
        mp.setattr(split, "host_forward", lambda cls: split.HostForward(difference="this host's UNetModel forward differs"))
        with pytest.raises(engine.OnePassError, match="this host's UNetModel forward differs"):
            node.execute(model, pos, latent, 0, 4)
    import comfy_extras.nodes_model_advanced as adv
    (lcm,) = adv.ModelSamplingDiscrete().patch(model, "lcm", False)
    with pytest.raises(engine.OnePassError, match="schedule"):
        node.execute(lcm, pos, latent, 0, 4)
    assert all(v[1].get("tooltip") for v in node.INPUT_TYPES()["required"].values())


@pytest.fixture(scope="module")
def trainer_mod(comfy):
    import sys
    sys.path.insert(0, str(tm.REPO / "tools"))
    return import_module("train_tiue")


def sd15_tiny(seed=3):
    """A random-weight UNet that ComfyUI's own detection reads as SD1.5 (320 channels, context 768), but tiny."""
    import comfy.supported_models
    cfg = dict(image_size=8, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
               transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
               use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
               use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False)
    return tm.build_model_patcher(comfy.supported_models.SD15(cfg), seed=seed)


def test_student_saved_by_the_trainer_loads_with_comfyuis_loader_and_is_recognised(onepass, trainer_mod, tmp_path, caplog,
                                                                                   capsys):
    import comfy.sd
    import comfy.utils
    import folder_paths
    node, glue, engine = onepass
    teacher = tmp_path / "teacher_sd15.safetensors"
    comfy.utils.save_torch_file(sd15_tiny().model.diffusion_model.state_dict(), str(teacher))
    g = torch.Generator().manual_seed(0)
    conds = tmp_path / "conds.safetensors"
    comfy.utils.save_torch_file({"context": torch.randn(3, 4, 768, generator=g), "null": torch.zeros(4, 768)}, str(conds))
    models = tmp_path / "diffusion_models"
    student = models / "my_tiue_student.safetensors"
    trainer_mod.main(["--teacher", str(teacher), "--conds", str(conds), "--latent-size", "8", "--batch", "1", "--fake-steps", "1",
                      "--steps", "1", "--cfg", "2.0", "--reg-pairs", "2", "--reg-steps", "2", "--pairs-cache", "",
                      "--out", str(student), "--checkpoint", str(tmp_path / "c.ckpt"),
                      "--no-progress", "--device", "cpu"])
    assert "--reg-hf 1 acts on the latent's channels" in capsys.readouterr().out, "a teacher without a cheap decoder"
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    loaded = comfy.sd.load_diffusion_model(str(student))                  # ComfyUI's own loader (UNETLoader's)
    assert type(loaded.model.model_config).__name__ == "SD15"
    pos = [[torch.randn(2, 4, 768, generator=g), {}]]
    out, text = run_node(node, loaded, pos, 2, k=4, caplog=caplog)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert "TiUE student my_tiue_student.safetensors (distilled for these timesteps)" in text, text
    _, text3 = run_node(node, loaded, pos, 2, k=3, caplog=caplog)
    assert "was distilled for K=4 [751, 501, 251, 1]: set K to 4" in text3, text3
    _, text_teacher = run_node(node, comfy.sd.load_diffusion_model(str(teacher)), pos, 2, caplog=caplog)
    assert "not a recognised TiUE student" in text_teacher
    meta = json.loads(comfy.utils.load_torch_file(str(student), return_metadata=True)[1][tiue.METADATA_KEY])
    assert meta["k"] == 4 and meta["prediction"] == "eps" and meta["teacher"] == "teacher_sd15.safetensors"


@pytest.mark.parametrize("model", ["digits", "fashion"])
def test_committed_students_are_recognised_by_the_node(onepass, model, caplog):
    """Each committed student (the digits and the Fashion-MNIST one), in a models folder, loaded by the project's
    loader (which drops the file's metadata): the node names it from its weights, and it was distilled for K = 4."""
    import comfy.utils
    import folder_paths
    node, glue, engine = onepass
    path = tm.REPO / "testmodel" / f"{model}_tiue_student.safetensors"
    doc = tiue.read_student_metadata(comfy.utils.load_torch_file(str(path), return_metadata=True)[1])
    assert doc["k"] == 4 and doc["timesteps"] == [751, 501, 251, 1] and doc["teacher"] == f"{model}_unet.safetensors"
    folder_paths.add_model_folder_path("diffusion_models", str(path.parent))
    if model == "digits":
        student, tokens = tm.load_test_model(path)
        latent = {"samples": torch.zeros(2, 4, tm.LATENT_SIZE, tm.LATENT_SIZE)}
    else:
        from testmodel import fashion as fm
        student, tokens = fm.load_fashion_model(path)
        latent = {"samples": torch.zeros(2, 4, fm.LATENT_SIZE, fm.LATENT_SIZE)}
    with caplog.at_level(logging.INFO, logger="FasterDiffusion"):
        caplog.clear()
        (out,) = node.execute(student, [[tokens[[3, 7]], {}]], latent, 0, 4, 32)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert f"TiUE student {path.name} (distilled for these timesteps)" in text, text
    assert torch.isfinite(out["samples"]).all()


def test_trainer_refuses_a_v_prediction_teacher(trainer_mod):
    with pytest.raises(SystemExit, match="epsilon-prediction"):
        trainer_mod.schedule_of(tm.vpred_tiny_model())


def make_trainer(trainer_mod, digits, **kw):
    model, tokens = digits
    cfg = trainer_mod.Config(**{"batch": 2, "fake_steps": 1, "reg_pairs": 8, "reg_steps": 2, "reg_batch": 2, **kw})
    return trainer_mod.Trainer(model.model.diffusion_model, trainer_mod.schedule_of(model), tokens[:10], tokens[10],
                               cfg, (4, tm.LATENT_SIZE, tm.LATENT_SIZE), "cpu", trainer_mod.pack_modules())


def test_trainer_resumed_from_a_checkpoint_equals_an_uninterrupted_run(trainer_mod, digits, tmp_path):
    every_term = dict(fake_steps=2, vsd=1.0, kl=0.1, reg=1.0, cosine_steps=3)     # and an lr that moves
    whole = make_trainer(trainer_mod, digits, **every_term)
    for _ in range(4):
        whole.step()
    first = make_trainer(trainer_mod, digits, **every_term)
    first.step(), first.step()
    first.save_checkpoint(tmp_path / "t.ckpt")
    resumed = make_trainer(trainer_mod, digits, **every_term)
    resumed.load_state_dict(torch.load(tmp_path / "t.ckpt", weights_only=False))
    resumed.step(), resumed.step()
    assert resumed.history == whole.history
    for name in ("student", "fake", "ema"):
        for (k, a), b in zip(getattr(whole, name).state_dict().items(), getattr(resumed, name).state_dict().values()):
            assert torch.equal(a, b), (name, k)
    assert torch.equal(whole.gen.get_state(), resumed.gen.get_state())
    teacher = digits[0].model.diffusion_model.state_dict()
    assert any(not torch.equal(teacher[k], v) for k, v in whole.student.state_dict().items()), "the student moved"
    assert all(torch.equal(teacher[k], v) for k, v in whole.teacher.state_dict().items()), "the teacher is frozen"
    with pytest.raises(SystemExit, match="other settings"):
        make_trainer(trainer_mod, digits, **dict(every_term, kl=0.0)).load_state_dict(torch.load(tmp_path / "t.ckpt", weights_only=False))


def test_trainer_descends_the_kl_term(trainer_mod, digits):
    """At the start the fake score model equals the teacher, so VSD is exactly 0 and the first updates follow
    the KL term alone: the student's predicted noise maps must get closer to N(0, 1)."""
    trainer = make_trainer(trainer_mod, digits, vsd=1.0, kl=1.0, reg=0.0, lr=1e-4)
    g = torch.Generator().manual_seed(5)
    noise, context = torch.randn(4, 4, tm.LATENT_SIZE, tm.LATENT_SIZE, generator=g), digits[1][[0, 3, 6, 9]]

    def kl():
        with torch.no_grad():
            return float(tiue.kl_loss(trainer.student_sample(trainer.student, noise, context).outputs))
    before = kl()
    record = trainer.step()
    trainer.step()
    assert record["vsd"] == 0.0 and kl() < before
    assert all(g == 0.0 for g in record["g_vsd"]) and all(g > 0 for g in record["g_kl"]) and len(record["g_kl"]) == 4


def test_trainer_records_which_term_pulls_which_decoder_step(trainer_mod, digits):
    """g_<loss>: each term's gradient norm on each of the K decoder outputs; only the last decoder's output is
    weighted by DDIM's closed form alone, so a term on the sample (regression) reaches every decoder by its E_i."""
    trainer = make_trainer(trainer_mod, digits, vsd=0.0, kl=0.0, reg=1.0, reg_pairs=4, reg_steps=2)
    record = trainer.step(diagnose=True)
    assert set(record) == {"reg", "g_reg", "w_reg", "grad_norm"}
    s, e = trainer.onepass.ddim_coefficients(trainer.onepass.alphas_at(trainer.alphas, trainer.timesteps),
                                             trainer.final_alpha)
    ratios = [g / abs(c) for g, c in zip(record["g_reg"], e)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-4), "d reg / d out_i = E_i * d reg / d x0"
    assert record["w_reg"] == pytest.approx(record["grad_norm"], rel=1e-4), "one term: its own norm is the total"


@pytest.mark.parametrize("first, ts", [(None, [999, 799, 600, 400, 201, 1]), (751, [751, 601, 451, 301, 151, 1])])
def test_regression_targets_are_comfyuis_guided_ddim_from_the_same_noise(trainer_mod, digits, first, ts):
    """The pairs' targets: the teacher's guided DDIM from z = noise at the top of the schedule (or at ``first``),
    as ComfyUI's own ddim sampler computes it on the same timesteps (at the top ComfyUI scales the noise so that
    the UNet's input is that noise; lower, the test scales it so)."""
    import comfy.sample
    import comfy.samplers
    model, tokens = digits
    trainer = make_trainer(trainer_mod, digits, vsd=0.0, kl=0.0, reg=1.0, cfg=2.5)
    g = torch.Generator().manual_seed(4)
    noise, classes = torch.randn(3, 4, tm.LATENT_SIZE, tm.LATENT_SIZE, generator=g), [1, 5, 7]
    ours = trainer.teacher_sample(noise, tokens[classes], steps=6, first=first)
    ms = model.get_model_object("model_sampling")
    sigmas = torch.cat([ms.sigmas[ts], ms.sigmas[:1]]).float()
    pos, neg = tm.digit_conditioning(tokens, classes)
    s0 = float(sigmas[0])
    scale = 1.0 if first is None else (1 + s0 ** 2) ** 0.5 / s0
    out = comfy.sample.sample_custom(model, noise * scale, 2.5, comfy.samplers.sampler_object("ddim"), sigmas, pos, neg,
                                     torch.zeros_like(noise), seed=0, disable_pbar=True)
    theirs = model.model.process_latent_in(out) / (1 + float(sigmas[-1]) ** 2) ** 0.5
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_trainer_command_writes_student_log_and_resumes(trainer_mod, tmp_path, capsys):
    out, ckpt = tmp_path / "s.safetensors", tmp_path / "s.ckpt"
    args = ["--digits", "--steps", "2", "--batch", "2", "--reg-pairs", "8", "--reg-steps", "2", "--reg-batch", "2",
            "--pairs-cache", "", "--out", str(out), "--checkpoint", str(ckpt),
            "--device", "cpu", "--eval-per-digit", "1", "--eval-every", "1"]
    trainer_mod.main(args)
    log = json.loads((tmp_path / "s_log.json").read_text())
    assert log["steps"] == 2 and log["timesteps"] == [751, 501, 251, 1] and log["config"]["reg"] == 1.0
    assert 0 <= log["sample_accuracy"] <= 1 and "TiUE" in capsys.readouterr().out     # the progress bar
    assert [e["step"] for e in log["evals"]] == [1, 2] and {"speckle", "fd", "raw"} <= set(log["evals"][0])
    assert [g["step"] for g in log["weight_gradients"]] == [1, 2] and log["weight_gradients"][0]["w_reg"] > 0
    assert sorted(p.name for p in (tmp_path / "s_samples").iterdir()) == ["step_000001.png", "step_000002.png"]
    trainer_mod.main(args[:2] + ["3"] + args[3:] + ["--resume", "--export", "raw"])
    assert json.loads((tmp_path / "s_log.json").read_text())["steps"] == 3
    import comfy.utils
    sd, meta = comfy.utils.load_torch_file(str(out), return_metadata=True)
    doc = tiue.read_student_metadata(meta)
    assert doc["steps"] == 3 and sd["out.2.weight"].dtype == torch.float16 and "cond.class_tokens" in sd
    assert doc["weights"] == "raw"
    raw = torch.load(ckpt, weights_only=False)["student"]
    assert all(torch.equal(v, raw[k].half()) for k, v in sd.items() if k in raw), "--export raw: the student's own weights"
    sd.pop("cond.class_tokens")
    assert doc["fingerprint"]["float32"] == tiue.fingerprint_of_weights({k: v.float() for k, v in sd.items()})[1]
    # a second stage starts from that student (lr 0: it stays there)
    second = tmp_path / "second.safetensors"
    trainer_mod.main(["--digits", "--steps", "1", "--lr", "0", "--reg-pairs", "8", "--reg-steps", "2", "--reg-batch", "2",
                      "--pairs-cache", "", "--init-student", str(out), "--export", "raw", "--out", str(second),
                      "--checkpoint", str(tmp_path / "second.ckpt"), "--device", "cpu", "--eval-per-digit", "1"])
    again = comfy.utils.load_torch_file(str(second))
    assert all(torch.equal(again[k], v) for k, v in sd.items()), "--init-student: the first stage's weights"


# ----------------------------------------------------------------------------------------------- over HTTP

def test_node_over_http_shows_its_text_and_refuses_bad_k(server):
    url, base = server
    info = requests.get(url + "/object_info/FasterDiffusionOnePass", timeout=10).json()["FasterDiffusionOnePass"]
    assert info["display_name"] == "FasterDiffusion One-Pass (TiUE)"

    def prompt(k):
        return {"1": {"class_type": "FDTestDigitsModel", "inputs": {}},
                "2": {"class_type": "FDTestDigitsCond", "inputs": {"digit": 3}},
                "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
                "4": {"class_type": "FasterDiffusionOnePass", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                      "latent_image": ["3", 0], "seed": 1, "K": k, "max_decoder_batch": 32}},
                "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "fd_onepass"}}}
    bad = requests.post(url + "/prompt", json={"prompt": prompt(1), "client_id": "x"}, timeout=10)
    assert bad.status_code == 400 and "K" in json.dumps(bad.json())
    import websocket
    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(f"{url.replace('http', 'ws')}/ws?clientId={client_id}", timeout=120)
    r = requests.post(url + "/prompt", json={"prompt": prompt(4), "client_id": client_id}, timeout=10)
    assert r.status_code == 200, r.text
    texts, done, deadline = [], None, time.time() + 120
    while done is None and time.time() < deadline:
        msg = ws.recv()
        if isinstance(msg, bytes):
            if int.from_bytes(msg[:4], "big") == 3:
                n = int.from_bytes(msg[4:8], "big")
                texts.append((msg[8:8 + n].decode(), msg[8 + n:].decode()))
            continue
        m = json.loads(msg)
        if m["type"] in ("execution_success", "execution_error") and m["data"].get("prompt_id") == r.json()["prompt_id"]:
            done = m
    ws.close()
    assert done and done["type"] == "execution_success", done
    shown = [t for node, t in texts if node == "4"]
    assert len(shown) == 1 and "encoder ran 1x" in shown[0] and "only distilled students give good images" in shown[0]
    assert list((base / "output").glob("fd_onepass_*.latent"))


# ----------------------------------------------------------------------------------------------- diffusers

@pytest.mark.parametrize("prediction, alpha_to_one", [("epsilon", False), ("v_prediction", True)])
def test_diffusers_one_pass_is_the_sequential_reference(prediction, alpha_to_one):
    pytest.importorskip("diffusers")
    import sys
    sys.path.insert(0, str(tm.REPO / "tests"))
    import diffusers_tiny as dt
    from fasterdiffusion import diffusers as fdd
    pipe = dt.sd15(sched="DDIMScheduler")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction,
                                                      set_alpha_to_one=alpha_to_one)
    latents = torch.randn(2, 4, dt.LATENT, dt.LATENT, generator=torch.Generator().manual_seed(0))
    z = fdd.one_pass(pipe, ["a cat", "a dog"], latents=latents, output_type="latent", max_decoder_batch=4)
    emb, _ = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, False)
    a = pipe.scheduler.alphas_cumprod
    call = ModelCall(latents, torch.full((2,), 751), emb, None, latents.dtype, (), fdd.DiffusersCall())
    with torch.no_grad():
        ref, _ = op.sequential(fdd.DiffusersUNetAdapter(pipe.unet), call, [751, 501, 251, 1], a,
                               1.0 if alpha_to_one else float(a[0]), "eps" if prediction == "epsilon" else "v")
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-4)
    images = fdd.one_pass(pipe, "a cat", generator=torch.Generator().manual_seed(1), output_type="np")
    assert images.shape == (1, dt.IMAGE, dt.IMAGE, 3)
    with pytest.raises(TypeError, match="StableDiffusionPipeline only"):
        fdd.one_pass(dt.sdxl(), "a cat")
