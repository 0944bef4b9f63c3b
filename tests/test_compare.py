"""FasterDiffusion Compare in real ComfyUI: run through the host's own executor (execution.get_output_data)."""
from __future__ import annotations

import asyncio
import inspect
import math
import re

import pytest
import torch

import testmodel as tm
from conftest import apply

STEPS = 12


@pytest.fixture(scope="module")
def host(pack):
    import execution
    import nodes
    return nodes, execution


def compare(host, digits, strategy, seed=5, fewer=True, batch=2, steps=STEPS, sampler="euler"):
    """Execute the node as ComfyUI does (execution.get_output_data, a hidden unique_id); its four outputs."""
    from comfy_api.latest import io
    nodes, execution = host
    model, tok = digits
    pos, neg = tm.digit_conditioning(tok, [3, 8, 1][:batch])
    inputs = dict(model=model, positive=pos, negative=neg, latent_image={"samples": torch.zeros(batch, 4, 8, 8)},
                  vae=tm.StandInVAE(), seed=seed, steps=steps, cfg=3.0, sampler_name=sampler, scheduler="normal",
                  strategy=strategy, parallel=True, max_decoder_batch=32, compare_fewer_steps=fewer)
    cls = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionCompare"]
    hidden = {io.Hidden.unique_id: "7"}
    if "v3_data" in inspect.signature(execution.get_output_data).parameters:     # ComfyUI 0.33
        extra = {"v3_data": {"hidden_inputs": hidden}}
    else:
        extra = {"hidden_inputs": hidden}
    output, _, _, _ = asyncio.run(execution.get_output_data("test", "7", cls, {k: [v] for k, v in inputs.items()},
                                                            **extra))
    return [o[0] for o in output]


def ksampler(host, model, tok, seed=5, batch=2, sampler="euler", steps=STEPS):
    nodes, _ = host
    pos, neg = tm.digit_conditioning(tok, [3, 8, 1][:batch])
    (out,) = nodes.KSampler().sample(model, seed, steps, 3.0, sampler, "normal", pos, neg,
                                     {"samples": torch.zeros(batch, 4, 8, 8)}, 1.0)
    return out["samples"]


def test_registered_with_the_strategy_widget(host, pack):
    from comfy_api.latest import io
    nodes, _ = host
    cls = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionCompare"]
    assert issubclass(cls, io.ComfyNode)
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["FasterDiffusionCompare"] == "FasterDiffusion Compare"
    info = cls.GET_NODE_INFO_V1()                   # what /object_info serves
    assert info["display_name"] == "FasterDiffusion Compare"
    required = cls.INPUT_TYPES()["required"]
    apply_spec = pack.Apply.INPUT_TYPES()["required"]
    for name in ("strategy", "parallel", "max_decoder_batch"):
        assert required[name] == apply_spec[name], name     # the same widget as the other nodes
    assert all(opts.get("tooltip") for _, opts in required.values())
    assert list(cls.RETURN_TYPES) == ["IMAGE", "LATENT", "LATENT", "STRING"]
    assert required["compare_fewer_steps"][1]["default"] is True


def test_strategy_all_is_identical_and_says_so(host, digits):
    images, full, faster, text = compare(host, digits, "all")
    assert torch.equal(full["samples"], faster["samples"])
    assert torch.equal(full["samples"], ksampler(host, digits[0], digits[1]))    # the full run is KSampler's
    assert "PSNR vs full: FasterDiffusion inf (identical)" in text
    assert "skipped no encoder call" in text and "use the plain sampler" in text
    assert "plain steps" not in text.split("recommendation")[0]                 # no fewer-steps run: nothing to gain
    w = images.shape[2] // 3
    assert torch.equal(images[:, :, 2 * w:], torch.zeros_like(images[:, :, 2 * w:]))   # a black difference panel


def test_faster_latent_is_apply_plus_ksampler(host, pack, digits):
    model, tok = digits
    images, full, faster, text = compare(host, digits, "uniform:3")
    patched, _ = apply(pack, model, "uniform:3")
    assert torch.equal(faster["samples"], ksampler(host, patched, tok))          # bit-identical, same seed
    assert torch.equal(full["samples"], ksampler(host, model, tok))
    assert not torch.equal(faster["samples"], full["samples"])
    # the image batch: per input image, full | FasterDiffusion | difference x4, each as the VAE decodes
    full_img, faster_img = tm.StandInVAE().decode(full["samples"]), tm.StandInVAE().decode(faster["samples"])
    assert images.shape == (2, 16, 48, 3)
    assert torch.equal(images[:, :, :16], full_img) and torch.equal(images[:, :, 16:32], faster_img)
    assert torch.allclose(images[:, :, 32:], ((full_img - faster_img).abs() * 4).clamp(0, 1))
    assert f"PSNR vs full: FasterDiffusion {image_psnr(full_img, faster_img):.2f} dB" in text


def image_psnr(a, b):
    return 10 * math.log10(1 / torch.mean((a.double() - b.double()) ** 2).item())


def test_a_patched_input_model_is_compared_against_its_plain_self(host, pack, digits):
    """An Apply node upstream must not make the "full" run a FasterDiffusion run; this node's settings win."""
    model, tok = digits
    patched, _ = apply(pack, model, "paper")
    _, full, faster, text = compare(host, (patched, tok), "uniform:3")
    assert torch.equal(full["samples"], ksampler(host, model, tok))
    assert torch.equal(faster["samples"], ksampler(host, apply(pack, model, "uniform:3")[0], tok))
    assert "FasterDiffusion [uniform:3]" in text
    assert pack.cu.KEY in patched.model_options["transformer_options"]          # the input model is unchanged


def test_text_has_times_ratio_psnr_and_an_honest_recommendation(host, digits):
    model, tok = digits
    _, full, _, text = compare(host, digits, "uniform:3")
    full_s, faster_s, ratio = map(float, re.search(
        r"time: full ([\d.]+) s, FasterDiffusion ([\d.]+) s \(ratio ([\d.]+), [\d.]+x speed\)", text).groups())
    # the times are printed to 1 ms and the ratio to 0.001: on a short run (~0.2 s) that rounding alone moves the
    # ratio computed back from the times by up to 0.0005 + 0.0005 (1 + ratio) / full
    assert ratio == pytest.approx(faster_s / full_s, abs=5e-4 + 5e-4 * (1 + ratio) / full_s + 1e-9)
    recommendation = text.split("recommendation: ")[1].splitlines()[0]
    if "not faster here" in recommendation:                              # N would be >= steps: no third run
        assert STEPS * ratio >= STEPS - 0.5 - STEPS * 2e-3 and "plain steps" not in text.split("recommendation")[0]
    else:
        n = int(re.search(r"(\d+) plain steps [\d.]+ s", text).group(1))
        assert abs(n - STEPS * ratio) <= 0.5 + STEPS * 2e-3             # N = round(steps x measured time ratio)
        fd_db, fewer_db = map(float, re.search(rf"PSNR vs full: FasterDiffusion ([\d.]+) dB, {n} plain steps "
                                               rf"([\d.]+) dB", text).groups())
        plain_n = tm.StandInVAE().decode(ksampler(host, model, tok, steps=n))    # the baseline is KSampler at N steps
        assert fewer_db == round(image_psnr(tm.StandInVAE().decode(full["samples"]), plain_n), 2)
        expected = "FasterDiffusion wins" if fd_db > fewer_db else f"use {n} plain steps instead"
        assert recommendation.startswith(expected) and f"{n} plain steps" in recommendation
    assert "FasterDiffusion [uniform:3]: 12 steps, encoder ran" in text          # the run's own stats line


def test_fewer_steps_off_and_the_recommendation_rules(host, digits):
    """Off: the equal-time step count is stated, not run; the rule picks whichever is closer to the full run."""
    from fasterdiffusion.compare import Comparison, psnr, recommendation
    *_, text = compare(host, digits, "uniform:3", fewer=False)
    assert "not run: turn on compare_fewer_steps" in text or "not faster here" in text
    c = Comparison("uniform:3", 12, 2.0, 1.0, 30.0, 6, 8, fewer_seconds=1.0, fewer_psnr=25.0)
    assert recommendation(c).startswith("FasterDiffusion wins: at this cost 6 plain steps would be as fast")
    c.fewer_psnr = 35.0
    assert recommendation(c).startswith("use 6 plain steps instead")
    assert psnr(torch.zeros(4), torch.full((4,), 0.1)) == pytest.approx(20.0)


def test_bad_input_is_refused(host, digits):
    nodes, execution = host
    cls = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionCompare"]
    assert "neither a known name nor a step index" in cls.validate_inputs(strategy="every other")
    assert cls.validate_inputs(strategy="uniform:3") is True
    with pytest.raises(Exception, match="neither a known name nor a step index"):   # a linked strategy, at run time
        compare(host, digits, "every other")
