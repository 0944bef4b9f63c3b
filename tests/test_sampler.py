"""FasterDiffusion Sampler / KSampler nodes in real ComfyUI: injection, takeover of Apply, interrupts."""
from __future__ import annotations

import math

import pytest
import torch

import testmodel as tm
from conftest import apply

STEPS = 20


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def nodes_(pack):
    import nodes
    return nodes


def fd_ksampler(nodes_, model, tok, sampler="euler", alpha=0.0, strategy="paper", parallel=True, cap=32,
                digits=(3, 8), seed=0, denoise=1.0, latent=None, scheduler="normal", threshold=500.0):
    pos, neg = tm.digit_conditioning(tok, list(digits))
    latent = {"samples": torch.zeros(len(digits), 4, 8, 8) if latent is None else latent}
    node = nodes_.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]
    (out,) = node.execute(model, seed, STEPS, 3.0, sampler, scheduler, pos, neg, latent, denoise, strategy, parallel,
                         cap, alpha, threshold)
    return out["samples"]


def ksampler(nodes_, model, tok, sampler="euler", digits=(3, 8), seed=0, denoise=1.0, latent=None, scheduler="normal"):
    pos, neg = tm.digit_conditioning(tok, list(digits))
    latent = {"samples": torch.zeros(len(digits), 4, 8, 8) if latent is None else latent}
    return nodes_.common_ksampler(model, seed, STEPS, 3.0, sampler, scheduler, pos, neg, latent, denoise=denoise)[0]["samples"]


def test_nodes_are_registered(nodes_):
    assert nodes_.NODE_DISPLAY_NAME_MAPPINGS["FasterDiffusionSampler"] == "FasterDiffusion Sampler"
    assert nodes_.NODE_DISPLAY_NAME_MAPPINGS["FasterDiffusionKSampler"] == "FasterDiffusion KSampler"
    for name in ("FasterDiffusionSampler", "FasterDiffusionKSampler"):
        spec = nodes_.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]
        assert all(opts.get("tooltip") for _, opts in spec.values()), name
        options = spec["sampler_name"][1]["options"]        # a V3 combo: ("COMBO", {"options": [...]})
        assert "heun" not in options and "euler" in options


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_alpha_zero_equals_the_apply_node_path(nodes_, pack, digits, sampler):
    model, tok = digits
    patched, _ = apply(pack, model, "paper")
    assert torch.equal(fd_ksampler(nodes_, model, tok, sampler), ksampler(nodes_, patched, tok, sampler))


def test_sampler_node_in_sampler_custom(nodes_, pack, digits):
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    model, tok = digits
    (sampler,) = nodes_.NODE_CLASS_MAPPINGS["FasterDiffusionSampler"].execute(
        "dpmpp_2m", "paper", True, 32, 0.0, 500.0)
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", STEPS)
    pos, neg = tm.digit_conditioning(tok, [5])
    out = SamplerCustom.execute(model, True, 4, 3.0, pos, neg, sampler, sigmas, {"samples": torch.zeros(1, 4, 8, 8)})
    patched, _ = apply(pack, model, "paper")
    ref = SamplerCustom.execute(patched, True, 4, 3.0, pos, neg, comfy.samplers.sampler_object("dpmpp_2m"), sigmas,
                                {"samples": torch.zeros(1, 4, 8, 8)})
    assert torch.equal(out.result[0]["samples"], ref.result[0]["samples"])
    r = sampler.config.reports[-1]
    # forecast (the default): the lone key steps 0-2 run split too, their features feed the forecasts
    assert (r["steps"], r["cached_calls"], r["decoder_batches"]) == (STEPS, 13, [1, 1, 1, 2, 5, 5, 5])
    assert r["propagation"] == "forecast (order 1)"


def hand_euler_with_injection(noise, alpha, threshold, ms):
    """k-diffusion's euler, with the paper's injection written out by hand (eps model)."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            if float(ms.timestep(sigmas[i])) < threshold:
                inj = alpha * math.sqrt(1 + float(sigmas[i]) ** 2) * noise
                x = x + inj                      # the latent, before this step's update ...
                denoised = denoised + inj        # ... and what the same eps predicts for it
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x
    return sample


@pytest.mark.parametrize("sampler,scheduler,denoise", [("euler", "normal", 1.0), ("ddim", "ddim_uniform", 1.0),
                                                       ("euler", "normal", 0.5)])
def test_injection_equals_hand_computation(nodes_, pack, digits, sampler, scheduler, denoise):
    import comfy.sample
    import comfy.samplers
    model, tok = digits
    ms = model.get_model_object("model_sampling")
    init = tm.sample_digits(model, tok, [3, 8], seed=9, steps=10) if denoise < 1 else None
    fd = fd_ksampler(nodes_, model, tok, sampler, alpha=0.003, denoise=denoise, latent=init, scheduler=scheduler)
    # by hand: same noise, same schedule as KSampler, the Apply node for propagation
    patched, _ = apply(pack, model, "paper")
    latent = torch.zeros(2, 4, 8, 8) if init is None else init
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = comfy.samplers.KSampler(model, steps=STEPS, device="cpu", sampler=sampler, scheduler=scheduler,
                                     denoise=denoise).sigmas
    base_fn = hand_euler_with_injection(noise, 0.003, 500.0, ms)
    pos, neg = tm.digit_conditioning(tok, [3, 8])
    hand = comfy.sample.sample_custom(patched, noise, 3.0, comfy.samplers.KSAMPLER(base_fn), sigmas, pos, neg, latent,
                                      seed=0, disable_pbar=True)
    assert rel(fd, hand) < 1e-6
    no_injection = fd_ksampler(nodes_, model, tok, sampler, alpha=0.0, denoise=denoise, latent=init, scheduler=scheduler)
    assert rel(fd, no_injection) > 1e-4, "the injection must change the result"


def test_injected_steps_are_the_late_ones(nodes_, digits):
    model, tok = digits
    sampler = nodes_.NODE_CLASS_MAPPINGS["FasterDiffusionSampler"].execute("euler", "paper", True, 32, 0.003, 500.0)[0]
    import comfy.sample
    import comfy.samplers
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)
    pos, neg = tm.digit_conditioning(tok, [1])
    latent = torch.zeros(1, 4, 8, 8)
    comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 0), 3.0, sampler, sigmas, pos, neg, latent,
                               disable_pbar=True, seed=0)
    expected = [i for i in range(STEPS) if float(ms.timestep(sigmas[i])) < 500]
    assert sampler.config.reports[-1]["injected_steps"] == expected and expected[0] >= STEPS // 3


def test_sub_batched_equals_full_batch(nodes_, digits):
    model, tok = digits
    full = fd_ksampler(nodes_, model, tok, alpha=0.003, cap=0, digits=(1, 2, 3))
    split = fd_ksampler(nodes_, model, tok, alpha=0.003, cap=6, digits=(1, 2, 3))
    assert rel(split, full) < 1e-5


def test_batch_does_not_change_a_sample(nodes_, digits):
    """Sample k of a batch of 3 equals that noise sampled alone: injection uses each row's own z_T."""
    import comfy.sample
    import comfy.samplers
    model, tok = digits
    node = nodes_.NODE_CLASS_MAPPINGS["FasterDiffusionSampler"]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    noises = [comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), s) for s in (21, 22, 23)]

    def run(digits_, noise):
        sampler = node.execute("euler", "paper", True, 32, 0.003, 500.0)[0]
        return comfy.sample.sample_custom(model, noise, 3.0, sampler, sigmas, *tm.digit_conditioning(tok, digits_),
                                          torch.zeros_like(noise), disable_pbar=True, seed=0)
    batch = run([4, 5, 6], torch.cat(noises))
    for k, (d, n) in enumerate(zip((4, 5, 6), noises)):
        assert rel(batch[k:k + 1], run([d], n)) < 1e-4, f"sample {k}"


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "ddim", "dpmpp_2m", "lms", "uni_pc", "uni_pc_bh2",
                                     "lcm"])
def test_each_supported_sampler_runs(nodes_, digits, sampler):
    model, tok = digits
    alpha = 0.0 if sampler.startswith("uni_pc") else 0.003
    out = fd_ksampler(nodes_, model, tok, sampler, alpha=alpha, digits=tuple(range(10)), seed=1)
    acc = float((tm.classify(tm.decode(out)) == torch.arange(10).numpy()).mean())
    assert acc >= 0.7, acc


def test_unsupported_settings_are_refused_clearly(nodes_, digits):
    model, tok = digits
    with pytest.raises(ValueError, match="'heun' is not supported .*Supported: euler, euler_ancestral"):
        fd_ksampler(nodes_, model, tok, "heun")
    with pytest.raises(ValueError, match="injection needs a sampler that hands its own latent.*Set injection_alpha to 0"):
        fd_ksampler(nodes_, model, tok, "uni_pc", alpha=0.003)


def test_sampler_settings_win_over_an_apply_node(nodes_, pack, digits):
    model, tok = digits
    patched, apply_config = apply(pack, model, "all")
    node = nodes_.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]
    assert torch.equal(fd_ksampler(nodes_, patched, tok, alpha=0.003), fd_ksampler(nodes_, model, tok, alpha=0.003))
    assert apply_config.reports == [], "the Apply node's run was taken over, so it reports nothing"


def test_interrupt_leaves_no_state_behind(nodes_, digits):
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    model, tok = digits
    sampler = nodes_.NODE_CLASS_MAPPINGS["FasterDiffusionSampler"].execute("euler", "paper", True, 32, 0.003, 500.0)[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    pos, neg = tm.digit_conditioning(tok, [7])
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    options_before = repr(model.model_options)

    def interrupt_at_step_8(step, x0, x, total):
        if step == 8:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()   # what ComfyUI's progress hook does

    with pytest.raises(mm.InterruptProcessingException):
        comfy.sample.sample_custom(model, noise, 3.0, sampler, sigmas, pos, neg, latent, callback=interrupt_at_step_8,
                                   disable_pbar=True, seed=0)
    assert not mm.processing_interrupted()                  # the exception consumed the flag
    assert repr(model.model_options) == options_before
    assert sampler.config.reports[-1]["cached_calls"] == 4  # steps 4, 6, 7, 8 were served before the stop
    after = comfy.sample.sample_custom(model, noise, 3.0, sampler, sigmas, pos, neg, latent, disable_pbar=True, seed=0)
    fresh = nodes_.NODE_CLASS_MAPPINGS["FasterDiffusionSampler"].execute("euler", "paper", True, 32, 0.003, 500.0)[0]
    assert torch.equal(after, comfy.sample.sample_custom(model, noise, 3.0, fresh, sigmas, pos, neg, latent,
                                                         disable_pbar=True, seed=0))


# ------------------------------------------------------------------------------ models and inputs it cannot serve

def other_unet_model():
    """The digits model under a UNet class FasterDiffusion does not know (same forward, other type)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    class SomeOtherUNet(UNetModel):
        pass
    model, tok = tm.load_test_model()
    model.model.diffusion_model.__class__ = SomeOtherUNet
    return model, tok


@pytest.mark.parametrize("alpha", [0.0, 0.003])
def test_unsupported_model_is_exactly_the_plain_sampler_with_one_line(nodes_, pack, caplog, alpha):
    import logging
    model, tok = other_unet_model()
    with caplog.at_level(logging.INFO):
        out = fd_ksampler(nodes_, model, tok, alpha=alpha)
    assert torch.equal(out, ksampler(nodes_, model, tok)), "no propagation and no injection"
    lines = [r.getMessage() for r in caplog.records if "FasterDiffusion" in r.getMessage()]
    assert lines == [f"FasterDiffusion [paper]: {STEPS} steps; passing the model through unchanged: "
                     "SomeOtherUNet is not a model FasterDiffusion serves (ComfyUI's UNetModel: SD1.x, SD2.x, SDXL, "
                     "SVD; Flux; Wan 2.x)"]


def test_zero_size_batch_gets_the_hosts_own_error(nodes_, pack, digits):
    """An empty latent batch is the host's to refuse: the same error as the plain KSampler, not an
    IndexError from inside the pack."""
    model, tok = digits
    empty = torch.zeros(0, 4, 8, 8)
    with pytest.raises(Exception) as host:
        ksampler(nodes_, model, tok, digits=(3,), latent=empty)
    for run in (lambda: fd_ksampler(nodes_, model, tok, digits=(3,), latent=empty, alpha=0.003),
                lambda: ksampler(nodes_, apply(pack, model, "paper")[0], tok, digits=(3,), latent=empty)):
        with pytest.raises(type(host.value)) as ours:
            run()
        assert str(ours.value) == str(host.value)
