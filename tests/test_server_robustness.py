"""Hostile use of the pack in a real ComfyUI server: API prompts that skip the UI's clamping, an interrupt in
the middle of a run, several prompts queued at once.  Outputs are compared as saved latents, bit for bit."""
from __future__ import annotations

import json
import time
import uuid

import pytest
import requests
import websocket

CLIENT = "fd-robustness"


# ------------------------------------------------------------------------------------- prompts

def base(copy=0):
    """The test model (``copy``: another number loads a fresh copy, past ComfyUI's output cache), a digit, a latent."""
    return {"1": {"class_type": "FDTestDigitsModel", "inputs": {"copy": copy}},
            "3": {"class_type": "FDTestDigitsCond", "inputs": {"digit": 7}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def save(node, prefix):
    return {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": prefix}}


def fd_ksampler(prefix, copy=0, strategy="uniform:3", steps=10, seed=1, **changes):
    """Model -> FasterDiffusion KSampler -> SaveLatent; ``changes`` replace KSampler inputs."""
    inputs = {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler",
              "scheduler": "normal", "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0],
              "denoise": 1.0, "strategy": strategy, "parallel": True, "max_decoder_batch": 32,
              "injection_alpha": 0.003, "injection_threshold": 500.0}
    return {**base(copy), "9": {"class_type": "FasterDiffusionKSampler", "inputs": {**inputs, **changes}},
            "10": save("9", prefix)}


def apply_ksampler(prefix, copy=0, strategy="paper", steps=10, seed=1, **changes):
    """Model -> FasterDiffusion Apply -> KSampler -> SaveLatent; ``changes`` replace Apply inputs."""
    apply = {"model": ["1", 0], "strategy": strategy, "parallel": True, "max_decoder_batch": 32}
    return {**base(copy), "2": {"class_type": "FasterDiffusionApply", "inputs": {**apply, **changes}},
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["2", 0], "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0],
                "denoise": 1.0}},
            "6": save("5", prefix)}


def fd_sampler_custom(prefix, **changes):
    """FasterDiffusion Sampler -> SamplerCustom -> SaveLatent; ``changes`` replace Sampler inputs."""
    sampler = {"sampler_name": "euler", "strategy": "paper", "parallel": True, "max_decoder_batch": 32,
               "injection_alpha": 0.003, "injection_threshold": 500.0}
    return {**base(), "11": {"class_type": "FasterDiffusionSampler", "inputs": {**sampler, **changes}},
            "12": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 8,
                                                              "denoise": 1.0}},
            "13": {"class_type": "SamplerCustom", "inputs": {
                "model": ["1", 0], "add_noise": True, "noise_seed": 1, "cfg": 3.0, "positive": ["3", 0],
                "negative": ["3", 1], "sampler": ["11", 0], "sigmas": ["12", 0], "latent_image": ["4", 0]}},
            "14": save("13", prefix)}


def calibrate(prefix, **changes):
    """FasterDiffusion Calibrate -> SaveLatent (its full_run output); ``changes`` replace Calibrate inputs."""
    inputs = {"model": ["1", 0], "seed": 0, "steps": 8, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0], "key_steps": 3,
              "target_cost": 0.0}
    return {**base(), "15": {"class_type": "FasterDiffusionCalibrate", "inputs": {**inputs, **changes}},
            "16": {"class_type": "SaveLatent", "inputs": {"samples": ["15", 1], "filename_prefix": prefix}}}


def queue(url, prompt):
    r = requests.post(url + "/prompt", json={"prompt": prompt, "client_id": CLIENT}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["prompt_id"]


def finished(url, prompt_id, timeout=180):
    """The /history entry of ``prompt_id`` once it has run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = requests.get(f"{url}/history/{prompt_id}", timeout=10).json()
        if prompt_id in h:
            return h[prompt_id]
        time.sleep(0.2)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout}s")


def saved_latent(base_dir, prefix):
    from safetensors.torch import load_file
    (path,) = (base_dir / "output").glob(f"{prefix}_*.latent")
    return load_file(str(path))["latent_tensor"]


def run_alone(url, base_dir, make, **kw):
    """Queue one prompt, wait for it, return its saved latent."""
    prefix = f"fd_rb_{uuid.uuid4().hex[:8]}"
    entry = finished(url, queue(url, make(prefix, **kw)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    return saved_latent(base_dir, prefix)


# ------------------------------------------------------------------------------------- bad API prompts

BAD = [  # (graph, node, input, value, text the error must contain)
    (apply_ksampler, "2", "max_decoder_batch", -1, "smaller than min"),
    (apply_ksampler, "2", "max_decoder_batch", 5000, "bigger than max"),
    (apply_ksampler, "2", "strategy", "0,²", "'²' is neither a known name nor a step index"),
    (fd_ksampler, "9", "denoise", 1.5, "bigger than max"),
    (fd_ksampler, "9", "steps", 0, "smaller than min"),
    (fd_ksampler, "9", "scheduler", "nope", "not in"),
    (fd_ksampler, "9", "sampler_name", "dpm_2", "not in"),
    (fd_ksampler, "9", "injection_alpha", -1.0, "smaller than min"),
    (fd_ksampler, "9", "injection_threshold", 5000.0, "bigger than max"),
    (fd_ksampler, "9", "max_decoder_batch", -1, "smaller than min"),
    (fd_ksampler, "9", "strategy", "0," + "9" * 5000, "beyond any real step count (at most 100000)"),
    (fd_sampler_custom, "11", "sampler_name", "heun", "not in"),
    (fd_sampler_custom, "11", "injection_alpha", 1.0, "bigger than max"),
    (fd_sampler_custom, "11", "strategy", "uniform:²", "uniform needs a whole number"),
    (calibrate, "15", "sampler_name", "dpm_fast", "sampler 'dpm_fast' picks its own time points"),
    (calibrate, "15", "sampler_name", "no_such_sampler", "'no_such_sampler' is not a ComfyUI sampler"),
    (calibrate, "15", "key_steps", 0, "smaller than min"),
    (calibrate, "15", "target_cost", 2.0, "bigger than max"),
    (calibrate, "15", "criterion", "psnr", "not in"),                 # the optional inputs are checked too
    (calibrate, "15", "budget_mode", "seconds", "not in"),
    (calibrate, "15", "gpu_time_fraction", 2.0, "bigger than max"),
]


@pytest.mark.parametrize("make,node,name,value,expected", BAD,
                         ids=[f"{make.__name__}-{name}={str(value)[:12]}" for make, _, name, value, _ in BAD])
def test_bad_api_prompts_are_refused_naming_the_input(server, make, node, name, value, expected):
    url, _ = server
    prompt = make(f"fd_rb_bad_{uuid.uuid4().hex[:8]}")
    prompt[node]["inputs"][name] = value
    r = requests.post(url + "/prompt", json={"prompt": prompt, "client_id": CLIENT}, timeout=10)
    assert r.status_code == 400, f"accepted: {r.text}"
    errors = r.json()["node_errors"][node]["errors"]
    assert {e["extra_info"]["input_name"] for e in errors} == {name}, errors
    assert expected in json.dumps(errors, ensure_ascii=False), errors
    assert len(json.dumps(errors)) < 4000, "the error quotes a shortened input"


def test_good_prompts_of_each_kind_still_pass_validation_and_run(server):
    """The counterpart of the table above: the unchanged prompts are accepted and run."""
    url, base_dir = server
    for make in (apply_ksampler, fd_ksampler, fd_sampler_custom, calibrate):
        assert run_alone(url, base_dir, make).shape == (1, 4, 8, 8), make.__name__
    # a saved Calibrate prompt has no optional inputs (above); a new one sets them
    assert run_alone(url, base_dir, calibrate, criterion="drift", budget_mode="gpu_time",
                     gpu_time_fraction=0.6).shape == (1, 4, 8, 8)


# ------------------------------------------------------------------------------------- interrupt

def interrupt_mid_run(url, prompt):
    """Queue ``prompt``, interrupt it over /interrupt once its sampler is a few steps in; the step it reached."""
    ws = websocket.create_connection(f"{url.replace('http', 'ws')}/ws?clientId={CLIENT}", timeout=120)
    try:
        prompt_id = queue(url, prompt)
        reached, outcome = None, None
        deadline = time.time() + 180
        while outcome is None and time.time() < deadline:
            msg = ws.recv()
            if isinstance(msg, bytes):
                continue
            m = json.loads(msg)
            if m["data"].get("prompt_id") != prompt_id:
                continue
            if m["type"] == "progress" and reached is None and m["data"]["value"] >= 4:
                reached = m["data"]["value"], m["data"]["max"]
                requests.post(url + "/interrupt", json={"prompt_id": prompt_id}, timeout=10)
            elif m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                outcome = m["type"]
    finally:
        ws.close()
    assert outcome == "execution_interrupted", outcome
    assert reached is not None and reached[0] < reached[1], reached
    return reached


@pytest.mark.parametrize("make", [fd_ksampler, apply_ksampler])
def test_a_run_after_an_interrupt_equals_a_fresh_one(server, make):
    """Interrupted in the middle of a group, the same model (and Apply node, from ComfyUI's cache) then gives
    exactly what a freshly loaded copy gives."""
    url, base_dir = server
    copy = {fd_ksampler: 301, apply_ksampler: 302}[make]
    interrupt_mid_run(url, make(f"fd_rb_long_{uuid.uuid4().hex[:8]}", copy=copy, strategy="uniform:3", steps=2000))
    after = run_alone(url, base_dir, make, copy=copy, strategy="uniform:3")
    fresh = run_alone(url, base_dir, make, copy=copy + 100, strategy="uniform:3")
    assert after.equal(fresh)


# ------------------------------------------------------------------------------------- concurrent prompts

def test_prompts_queued_together_each_equal_the_prompt_run_alone(server):
    url, base_dir = server
    runs = [(fd_ksampler, "paper"), (apply_ksampler, "uniform:3"), (fd_ksampler, "0,1,4"),
            (apply_ksampler, "paper"), (fd_ksampler, "all"), (apply_ksampler, "0,2,3,7")]
    prefixes = [f"fd_rb_together_{i}_{uuid.uuid4().hex[:6]}" for i in range(len(runs))]
    ids = [queue(url, make(prefix, copy=400, strategy=strategy, seed=i))       # all queued before any runs
           for i, ((make, strategy), prefix) in enumerate(zip(runs, prefixes))]
    for prompt_id in ids:
        assert finished(url, prompt_id)["status"]["status_str"] == "success"
    for i, ((make, strategy), prefix) in enumerate(zip(runs, prefixes)):
        alone = run_alone(url, base_dir, make, copy=410 + i, strategy=strategy, seed=i)
        assert saved_latent(base_dir, prefix).equal(alone), (make.__name__, strategy)
    together = [saved_latent(base_dir, p) for p in prefixes]
    assert not together[0].equal(together[2]), "the strategies differ, and so do the results"
