"""FasterDiffusion Calibrate in real ComfyUI on the trained test model."""
from __future__ import annotations

import pytest
import torch

import testmodel as tm
from fasterdiffusion import make_plan, parse_strategy, plan_drift


@pytest.fixture(scope="module")
def calibrate(pack):
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionCalibrate"]

    def run(model, tok, key_steps=7, steps=20, sampler="euler", scheduler="normal", seed=0, digits=(2, 7), target_cost=0.0,
            **optional):
        pos, neg = tm.digit_conditioning(tok, list(digits))
        latent = {"samples": torch.zeros(len(digits), 4, 8, 8)}
        return node.execute(model, seed, steps, 3.0, sampler, scheduler, pos, neg, latent, key_steps, target_cost,
                            **optional)
    return run


def test_calibration_is_deterministic_and_valid(calibrate, digits):
    model, tok = digits
    strategy, full = calibrate(*digits)
    assert calibrate(*digits)[0] == strategy
    keys = make_plan(parse_strategy(strategy), 20).keys
    assert len(keys) == 7 and keys[0] == 0
    assert torch.equal(full["samples"], tm.sample_digits(model, tok, [2, 7], seed=0, steps=20)), \
        "the measuring pass is the plain full run"
    for budget in (1, 4, 20):
        assert len(make_plan(calibrate(*digits, key_steps=budget)[0], 20).keys) == budget
    # a FLOP budget: the encoder is 27.4 % of this UNet's FLOPs, so 0.8 allows 5 of 20 key steps
    from fasterdiffusion import predicted_cost_fraction
    plan = make_plan(calibrate(*digits, target_cost=0.8)[0], 20)
    assert len(plan.keys) == 5 and predicted_cost_fraction(plan, 0.274) <= 0.8


def test_calibrated_drift_is_no_worse_than_uniform_or_paper(pack, digits):
    import comfy.samplers
    from importlib import import_module
    model, tok = digits
    cal = import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".calibrate")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20)
    recorder_model, recorder = cal.recording_model(model, sigmas.tolist())
    tm.sample_digits(recorder_model, tok, [2, 7], seed=0, steps=20)
    drift = recorder.drift()
    from fasterdiffusion import choose_keys
    for k in (4, 5, 7, 10):
        uniform = make_plan(f"uniform:{-(-20 // k)}", 20).keys
        chosen = choose_keys(drift, 20, len(uniform))
        assert plan_drift(drift, chosen, 20) <= plan_drift(drift, uniform, 20)
    paper = make_plan("paper", 20).keys
    assert plan_drift(drift, choose_keys(drift, 20, len(paper)), 20) <= plan_drift(drift, paper, 20)


def test_calibration_with_a_heun_type_sampler(calibrate, digits):
    """Heun's corrector evaluates the next step before the step itself: the later call's features count."""
    strategy, _ = calibrate(*digits, sampler="heun", key_steps=6)
    assert len(make_plan(strategy, 20).keys) == 6


@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
def test_samplers_off_the_schedule_are_refused_up_front(calibrate, digits, sampler):
    """They never evaluate on the schedule: the error names the sampler and lists the usable ones."""
    import nodes
    with pytest.raises(ValueError) as e:
        calibrate(*digits, sampler=sampler)
    assert f"'{sampler}'" in str(e.value) and "euler, " in str(e.value) and "dpm_fast," not in str(e.value)
    node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionCalibrate"]
    assert node.validate_inputs(sampler_name=sampler) == str(e.value), "refused at queue time too"
    assert node.validate_inputs(sampler_name="dpmpp_2m") is True
    options = node.INPUT_TYPES()["required"]["sampler_name"][1]["options"]
    assert sampler not in options and "dpmpp_2m" in options


def measured(pack, model, tok, stale_outputs, steps=20):
    """The recorder of the same full pass the node runs (digits 2 and 7, seed 0, euler, normal)."""
    import comfy.samplers
    from importlib import import_module
    cal = import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".calibrate")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    recorder_model, recorder = cal.recording_model(model, sigmas.tolist(), stale_outputs=stale_outputs)
    tm.sample_digits(recorder_model, tok, [2, 7], seed=0, steps=steps)
    return recorder


def test_the_criterion_input_picks_the_matrix_and_defaults_to_output_error(pack, calibrate, digits):
    import nodes
    from fasterdiffusion import choose_keys
    node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionCalibrate"]
    optional = node.INPUT_TYPES()["optional"]
    assert list(optional["criterion"][1]["options"]) == ["output_error", "drift"]
    assert optional["criterion"][1]["default"] == "output_error"
    assert all(spec[1].get("tooltip") for spec in optional.values())
    stale = measured(pack, *digits, stale_outputs=True)
    want = {("output_error", "forecast"): choose_keys(stale.forecast_output_error(), 20, 5),
            ("drift", "forecast"): choose_keys(stale.drift(forecast=True), 20, 5),
            ("output_error", "reuse"): choose_keys(stale.output_error(), 20, 5),
            ("drift", "reuse"): choose_keys(stale.drift(), 20, 5)}
    # a case where the propagation changes each criterion's plan, and the criteria disagree under each
    assert want["output_error", "forecast"] != want["output_error", "reuse"] != want["drift", "reuse"]
    assert want["output_error", "forecast"] != want["drift", "forecast"]
    assert calibrate(*digits, key_steps=5)[0] == ",".join(map(str, want["output_error", "forecast"])), \
        "a saved workflow: the defaults (output error, forecast)"
    for (criterion, propagation), keys in want.items():
        strategy = calibrate(*digits, key_steps=5, criterion=criterion, propagation=propagation)[0]
        assert strategy == ",".join(map(str, keys)), (criterion, propagation)
        assert calibrate(*digits, key_steps=5, criterion=criterion, propagation=propagation)[0] == strategy, \
            "deterministic"
    with pytest.raises(ValueError, match="criterion must be one of"):
        calibrate(*digits, criterion="psnr")


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75])
def test_a_gpu_time_budget_gets_the_most_keys_that_fit(pack, calibrate, digits, fraction):
    from fasterdiffusion import choose_keys, predicted_gpu_fraction
    cost = measured(pack, *digits, stale_outputs=True).forecast_output_error()      # the default propagation
    strategy = calibrate(*digits, budget_mode="gpu_time", gpu_time_fraction=fraction, key_steps=1, target_cost=0.9)[0]
    plan = make_plan(strategy, 20)
    assert predicted_gpu_fraction(plan) <= fraction, "within the budget (key_steps and target_cost are ignored)"
    assert list(plan.keys) == choose_keys(cost, 20, len(plan.keys)), "the criterion's best plan of that size"
    for more in range(len(plan.keys) + 1, 21):
        assert predicted_gpu_fraction(make_plan(",".join(map(str, choose_keys(cost, 20, more))), 20)) > fraction, more
    assert calibrate(*digits, budget_mode="keys", gpu_time_fraction=fraction, key_steps=6)[0].count(",") == 5, \
        "the fraction is read only in gpu_time mode"


def test_a_model_the_split_cannot_serve_is_refused_with_the_reason(pack, digits, monkeypatch):
    """Not "saw no model call": the reason Apply would pass the model through (another model class; a host forward
    the split does not mirror)."""
    from importlib import import_module
    cal = import_module(pack.cu.__name__.rsplit(".", 1)[0] + ".calibrate")
    with pytest.raises(ValueError, match="cannot calibrate this model: Flux is not ComfyUI's UNetModel"):
        cal.recording_model(tm.flux_tiny_model(), [14.6, 1.0, 0.0])
    monkeypatch.setattr(pack.split, "host_forward",
                        lambda cls: pack.split.HostForward(difference="this host's UNetModel forward differs"))
    with pytest.raises(ValueError, match="cannot calibrate this model: this host's UNetModel forward differs"):
        cal.recording_model(digits[0], [14.6, 1.0, 0.0])
