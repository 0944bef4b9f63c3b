"""FasterDiffusion Calibrate: pick key steps for this model, prompt and sampler from one full pass."""
from __future__ import annotations

import logging

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..fasterdiffusion import (choose_keys, keys_for_cost, keys_for_gpu_time, make_plan, plan_drift,
                               predicted_gpu_fraction)
from ..fasterdiffusion.samplers import OFF_SCHEDULE_ONLY
from ..patches.comfy.calibrate import recording_model
from ..patches.comfy.unet import show_on_node
from ..fasterdiffusion.forecast import DEFAULT_PROPAGATION
from .apply import CATEGORY, propagation_input
from .comfy_v3 import Choice, io, node_id

log = logging.getLogger("FasterDiffusion")

# DPM-Solver's own time points between the schedule's ends: no model call lands on the steps the recorder
# measures.  Found by calibrating the digits model with every stock sampler at 7 and 20 steps: all others
# evaluate on every step of the schedule.
OFF_SCHEDULE = OFF_SCHEDULE_ONLY
SUPPORTED = [name for name in comfy.samplers.SAMPLER_NAMES if name not in OFF_SCHEDULE]
# the first is the default: better final images than drift on both test models at 5-9 key steps of 50, worse at
# 13 (tools/calibration_compare.py, docs/quality/calibration.md)
CRITERIA = ["output_error", "drift"]
BUDGET_MODES = ["keys", "gpu_time"]
# forecast cost tables grow as N^3 (and their search as K N^3): past this many steps Calibrate plans for reuse
FORECAST_MAX_STEPS = 100


def sampler_problem(sampler_name):
    """None if Calibrate can measure ``sampler_name``, else the message saying why not and what to use."""
    if sampler_name in SUPPORTED:
        return None
    why = ("picks its own time points between the schedule's ends, so no model call lands on a step to measure"
           if sampler_name in OFF_SCHEDULE else "is not a ComfyUI sampler")
    return (f"FasterDiffusion Calibrate: sampler '{sampler_name}' {why}. Calibrate with a sampler that "
            f"evaluates on the schedule: {', '.join(SUPPORTED)}.")


class FasterDiffusionCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FasterDiffusionCalibrate",
            display_name="FasterDiffusion Calibrate",
            category=CATEGORY,
            description=("Runs one full sampling pass with these settings, measures how much the UNet encoder's "
                         "features change from step to step (and, with the output_error criterion, what that does "
                         "to the decoder's output), and chooses the key steps that keep the decoder's view least "
                         "stale for the given number of encoder passes or predicted GPU time. Connect its strategy output to "
                         "a FasterDiffusion node's strategy input (convert the widget to an input), or copy the text. "
                         "Deterministic for the same inputs."),
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate for."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed of the measuring pass."),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="Steps of the sampler you will use."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale."),
                Choice("sampler_name", options=SUPPORTED, tooltip=
                    "The sampler you will use (every stock sampler except dpm_fast and dpm_adaptive, which never "
                    "step on the schedule)."),
                Choice("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                               tooltip="The scheduler you will use."),
                io.Conditioning.Input("positive", tooltip="A representative prompt."),
                io.Conditioning.Input("negative", tooltip="Its negative prompt."),
                io.Latent.Input("latent_image", tooltip="The latent size you will sample at."),
                io.Int.Input("key_steps", default=7, min=1, max=1000, tooltip=
                    "Budget: how many steps run the encoder (the paper uses 9 of 50, 7 of 20)."),
                io.Float.Input("target_cost", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=
                    "Budget as predicted UNet FLOPs relative to running every step in full (e.g. 0.8); when above "
                    "0 it replaces key_steps. Uses the encoder's FLOP share measured on this model."),
                Choice("criterion", options=CRITERIA, default=CRITERIA[0], optional=True, tooltip=
                    "What the key steps minimise. output_error: how much each step's UNet output changes when its "
                    "decoder runs on the key step's older features, summed over each group and weighted by how far "
                    "the step moves the latent (measured in the same pass by extra decoder-only runs, about N^2/2 "
                    "for N steps, batched). drift: how far the encoder features move from the key step (no extra "
                    "runs; did better on the test models with many key steps, about a quarter of the steps or more)."),
                Choice("budget_mode", options=BUDGET_MODES, default="keys", optional=True, tooltip=
                    "keys: the budget is key_steps (or target_cost when above 0). gpu_time: the budget is "
                    "gpu_time_fraction, the predicted GPU time with parallel decoders relative to every step in "
                    "full; the most key steps that fit are used."),
                io.Float.Input("gpu_time_fraction", default=0.5, min=0.0, max=1.0, step=0.01, optional=True, tooltip=
                    "With budget_mode gpu_time: the GPU time to aim for, relative to running every step in full "
                    "(e.g. 0.4 = 2.5x faster). Predicted with the strategy editor's cost model (SD1.5 UNet, fp16, "
                    "512x512, CFG, measured on an H100); other models and GPUs differ."),
                propagation_input("The propagation the strategy will run with (the FasterDiffusion node's "
                                  "'propagation'): key steps are chosen for what the decoders will see, forecast "
                                  "features or reused ones."),
            ],
            outputs=[
                io.String.Output("strategy", display_name="strategy",
                                 tooltip="The calibrated key steps, as a strategy string."),
                io.Latent.Output("full_run", display_name="full_run", tooltip=
                                 "The latent of the full sampling pass it measured (the baseline to compare against)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None):   # only this one: the host checks the rest
        if sampler_name is None:      # a linked input: checked when the node runs
            return True
        return sampler_problem(sampler_name) or True

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, key_steps,
                target_cost=0.0, criterion=CRITERIA[0], budget_mode="keys", gpu_time_fraction=0.5,
                propagation=DEFAULT_PROPAGATION) -> io.NodeOutput:
        if problem := sampler_problem(sampler_name):
            raise ValueError(problem)
        if criterion not in CRITERIA or budget_mode not in BUDGET_MODES:
            raise ValueError(f"FasterDiffusion Calibrate: criterion must be one of {CRITERIA} and budget_mode one of "
                             f"{BUDGET_MODES}, got {criterion!r} and {budget_mode!r}.")
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, model_options=model.model_options).sigmas
        recorder_model, recorder = recording_model(model, sigmas.tolist(), stale_outputs=criterion == "output_error")
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        samples = comfy.sample.sample_custom(recorder_model, noise, cfg, comfy.samplers.sampler_object(sampler_name),
                                             sigmas, positive, negative, latent,
                                             callback=latent_preview.prepare_callback(model, steps),
                                             disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        n = len(sigmas) - 1
        forecast = propagation == "forecast"
        if forecast and n > FORECAST_MAX_STEPS:
            log.warning("FasterDiffusion Calibrate: %d steps is more than the %d it plans forecast propagation for; "
                        "the key steps were chosen for reuse", n, FORECAST_MAX_STEPS)
            forecast = False
        if criterion == "output_error":
            cost = recorder.forecast_output_error() if forecast else recorder.output_error()
        else:
            cost = recorder.drift(forecast=forecast)
        if budget_mode == "gpu_time":
            keys = keys_for_gpu_time(cost, n, gpu_time_fraction)
        elif target_cost > 0:
            keys = keys_for_cost(cost, n, target_cost, recorder.encoder_share)
        else:
            keys = choose_keys(cost, n, key_steps)
        strategy = ",".join(map(str, keys))
        uniform_k = max(1, -(-n // len(keys)))
        name = criterion.replace("_", " ") + (" with forecast" if forecast else " with reuse")
        text = (f"FasterDiffusion calibrated {len(keys)} key steps of {n}: {strategy} (predicted SD1.5 GPU time "
                f"{predicted_gpu_fraction(make_plan(strategy, n)):.0%}); {name} "
                f"{plan_drift(cost, keys, n):.3g} (uniform:{uniform_k} {plan_drift(cost, make_plan(f'uniform:{uniform_k}', n).keys, n):.3g}, "
                f"paper {plan_drift(cost, make_plan('paper', n).keys, n):.3g})")
        log.info(text)
        show_on_node(node_id(cls), text)
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(strategy, out)
