"""FasterDiffusion inside a real AUTOMATIC1111 (v1.10.1), offline on CPU, through its HTTP API.

Skipped unless ``A1111_PATH`` points at a prepared checkout (the source at tag v1.10.1 with its ``repositories/``
and a venv that runs it; hosts.md D2 lists what that takes): this never downloads or builds A1111.
``A1111_PYTHON`` (default ``$A1111_PATH/venv/bin/python``) runs it, with ``HF_HOME`` pointing at a cache that
holds the CLIP tokenizer files.  The server runs with a temporary ``--data-dir`` whose ``extensions/`` holds
this checkout and a small probe extension (written here).  The probe gives A1111's keyless test checkpoint
(``empty.pt``: every weight of the model would be left uninitialised) seeded random weights for the *whole*
model (UNet, CLIP text encoder, VAE), records each pass's latents after sampling (``post_sample``) so results
can be compared numerically, and says through ``/fd_probe/ready`` when the model-loaded callbacks have all run;
the fixture waits for that before the first request.

``tools/setup_webui_hosts.sh`` prepares both hosts (checkouts, ``repositories/``, venvs, ``HF_HOME``, Forge's
seeded random checkpoint) and prints the command:

    A1111_PATH=/path/to/a1111 HF_HOME=/path/to/hf FORGE_PATH=/path/to/forge FORGE_CKPT=/path/to/ckpt \\
        FD_CHROMIUM=/usr/bin/chromium OMP_NUM_THREADS=1 .testhost/venv/bin/python -m pytest tests/test_webui_real.py -q

``FD_CHROMIUM`` (a path, or ``1`` for the one on PATH) or ``CI`` makes the browser test fail instead of
skipping when Chromium or Playwright is missing.

ControlNet reuse (``controlnet_reuse``) is tested with a fake of the ControlNet extension's call pattern only
(tests/test_webui_controlnet.py): Mikubill/sd-webui-controlnet is not installed here.  Its ``scripts/controlnet.py``
fails to load without ``controlnet_aux`` (imported by ``annotator/mobile_sam``), and the extension's pin
``controlnet-aux==0.0.9`` pulls numpy 2 and timm 0.6.7 into A1111 v1.10.1's venv (numpy 1.26.2, which gradio 3.41
needs); a real-host test would also need a seeded random SD1.5 ControlNet checkpoint in ``models/ControlNet``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
A1111 = os.environ.get("A1111_PATH")
FORGE = os.environ.get("FORGE_PATH")          # Forge Classic; FORGE_CKPT: an SD1.5-layout checkpoint it can detect
HOSTS = [h for h, path in (("a1111", A1111), ("forge", FORGE)) if path]
pytestmark = pytest.mark.skipif(not HOSTS, reason="neither A1111_PATH nor FORGE_PATH is set (a prepared "
                                                  "AUTOMATIC1111 v1.10.1 / Forge Classic checkout)")

PROBE = '''
import hashlib, os, torch
from modules import script_callbacks, scripts
LATENTS = []
STATE = {"ready": False, "reinitialised": 0}

def reinit(sd_model):
    """A1111's empty.pt has no keys, so no parameter of the model (UNet, CLIP text encoder, VAE) gets a value from
    it: each keeps what A1111's loader made it with torch's init disabled.  Re-initialising the UNet alone left the
    text encoder unseeded, and some starts gave NaN latents.  Give every parameter of the whole model a seeded
    value from one generator, in named_parameters order:
    2+-dim weights ~ N(0, 1/fan_in) with fan_in = numel / shape[0]; 1-dim *.weight (norm scales) = 1; other
    1-dim parameters (biases) = 0 (the same rule as tools/setup_webui_hosts.sh's Forge checkpoint)."""
    if os.environ.get("FD_PROBE_REINIT") == "1":
        g = torch.Generator().manual_seed(0)
        n = 0
        with torch.no_grad():
            for name, p in sd_model.named_parameters():
                if p.dim() > 1:
                    v = torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5)
                elif name.endswith("weight"):
                    v = torch.ones(p.shape)
                else:
                    v = torch.zeros(p.shape)
                p.copy_(v.to(p.dtype))
                n += p.numel()
                assert torch.isfinite(p).all(), name
        STATE["reinitialised"] = n
        print(f"fd probe: all {n} parameters of the model re-initialised with seeded random weights")
    STATE["ready"] = True        # the last extension's callback (fd_probe sorts after fasterdiffusion)

class Probe(scripts.Script):
    def title(self):
        return "fd probe"
    def show(self, is_img2img):
        return scripts.AlwaysVisible
    def post_sample(self, p, ps, *args):
        t = ps.samples if isinstance(ps.samples, torch.Tensor) else torch.stack(list(ps.samples))   # hires: decoded
        t = t.detach().float().cpu()
        LATENTS.append({"shape": list(t.shape), "sha": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
                        "finite": bool(torch.isfinite(t).all()), "values": t.flatten().tolist()})

def routes(_demo, app):
    from modules import sd_models
    def latents():
        out = list(LATENTS)
        LATENTS.clear()
        return out
    def ready():
        # load_model publishes the model before it runs the callbacks and computes the empty prompt's cond
        # after them: ready once both are done
        model = sd_models.model_data.sd_model
        done = STATE["ready"] and getattr(model, "cond_stage_model_empty_prompt", None) is not None
        return {"ready": bool(done), "reinitialised": STATE["reinitialised"]}
    app.add_api_route("/fd_probe/latents", latents, methods=["POST"])
    app.add_api_route("/fd_probe/ready", ready, methods=["GET"])

script_callbacks.on_model_loaded(reinit)
script_callbacks.on_app_started(routes)
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=HOSTS or ["none"])
def a1111(request, tmp_path_factory):
    host = request.param
    root = Path(A1111 if host == "a1111" else FORGE)
    python = os.environ.get("A1111_PYTHON" if host == "a1111" else "FORGE_PYTHON", str(root / "venv" / "bin" / "python"))
    data = tmp_path_factory.mktemp("a1111_data")
    ext = data / "extensions"
    ext.mkdir()
    # the extension as "Install from URL" leaves it: a clean copy of this checkout's committed files
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True).stdout
    (ext / "fasterdiffusion").mkdir()
    subprocess.run(["tar", "-x", "-C", str(ext / "fasterdiffusion")], input=archive, check=True)
    (ext / "fd_probe" / "scripts").mkdir(parents=True)
    (ext / "fd_probe" / "scripts" / "fd_probe.py").write_text(PROBE)
    port = free_port()
    log = open(data / "a1111.log", "w")
    common = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--api-server-stop", "--skip-version-check",
              "--no-download-sd-model", "--data-dir", str(data), "--port", str(port)]
    if host == "a1111":    # A1111's own CI mode; its all-zero checkpoint gets a seeded random UNet from the probe
        cmd = [python, "launch.py", *common, "--test-server", "--do-not-download-clip", "--no-half",
               "--disable-opt-split-attention", "--use-cpu", "all", "--ckpt", str(root / "test" / "test_files" / "empty.pt")]
    else:                  # Forge detects the model family from the checkpoint's keys: it needs a real-layout one
        cmd = [python, "launch.py", *common, "--api", "--always-cpu", "--skip-python-version-check",
               "--ckpt", os.environ["FORGE_CKPT"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               FD_PROBE_REINIT="1" if host == "a1111" else "0")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, (data / "a1111.log").read_text()[-4000:]
            try:      # up, the scripts listed, and the model loaded with every on_model_loaded callback run
                r = requests.get(url + "/sdapi/v1/scripts", timeout=5)
                if r.ok and "txt2img" in r.json():
                    ready = requests.get(url + "/fd_probe/ready", timeout=5)
                    if ready.ok and ready.json()["ready"]:
                        break
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(2)
        else:
            pytest.fail(f"{host} did not start or load its model:\n" + (data / "a1111.log").read_text()[-4000:])
        reinitialised = ready.json()["reinitialised"]
        if host == "a1111":   # the whole model (UNet 860 M, CLIP-L 123 M, VAE 84 M parameters), not just the UNet
            assert 1.0e9 < reinitialised < 1.1e9, reinitialised
        yield url, data, host
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if (REPO / "out").is_dir():
            shutil.copy(data / "a1111.log", REPO / "out" / f"{host}_real.log")


BASE = {"prompt": "a digit", "negative_prompt": "", "steps": 6, "width": 64, "height": 64, "seed": 1,
        "cfg_scale": 5, "sampler_name": "Euler", "scheduler": "Karras", "batch_size": 1}


def txt2img(url, fd=None, path="txt2img", **over):
    body = dict(BASE, **over)
    if fd is not None:
        body["alwayson_scripts"] = {"fasterdiffusion": {"args": fd}}
    r = requests.post(f"{url}/sdapi/v1/{path}", json=body, timeout=900)
    assert r.ok, r.text[-2000:]
    latents = requests.post(f"{url}/fd_probe/latents", timeout=60).json()
    assert latents and all(l["finite"] for l in latents), [l["shape"] for l in latents]   # no NaN/inf latents
    info = r.json()["info"]
    return json.loads(info), latents, r.json()["images"]


# The exact "FD stats" infotext per host (counts are UNet model calls; strategy "0,2": key steps 0 and 2).
# A1111 evaluates every step as one batched [cond, uncond] call: 6 steps -> 2 key calls + 4 served from cache;
# the hires pass (4 steps of its own) and img2img (denoise 0.5 of 6 steps: t_enc + 1 = 4 evaluations) likewise.
# Forge Classic runs each run's first step on the cond rows alone ("Ignore negative prompt during early steps"
# tests step / total <= 0 at its default 0), so its call slots are: step 0 [cond] (key), step 1 [cond, uncond]:
# a slot with no cached features yet, so it runs the encoder in full, step 2 [cond, uncond] (key), then cached:
# 6 steps -> encoder 3x (0, 1, 2), skipped 3x (3, 4, 5).  The hires pass (CFG 5 as well) and img2img are runs of
# 4 evaluations with the same cond-only first step -> encoder 3x (0, 1, 2), skipped 1x (3).
STATS = {
    "a1111": {"txt2img": "6 steps: encoder 2x, skipped 4x",
              "hires": "6 steps: encoder 2x, skipped 4x; 4 steps: encoder 2x, skipped 2x",
              "img2img": "4 steps: encoder 2x, skipped 2x"},
    "forge": {"txt2img": "6 steps: encoder 3x, skipped 3x",
              "hires": "6 steps: encoder 3x, skipped 3x; 4 steps: encoder 3x, skipped 1x",
              "img2img": "4 steps: encoder 3x, skipped 1x"},
}


def stats(text, host, case):
    """The exact stats the host must report for ``case``, nothing looser."""
    return f'FD stats: "{STATS[host][case]}"' in text


def test_scripts_are_listed(a1111):
    url, data, host = a1111
    scripts = requests.get(url + "/sdapi/v1/scripts", timeout=60).json()
    assert "fasterdiffusion" in scripts["txt2img"] and "fasterdiffusion" in scripts["img2img"]
    errors = [line for line in (data / "a1111.log").read_text().splitlines() if "Error" in line and "fasterdiffusion" in line]
    assert not errors, errors          # the UI, the tab, the XYZ axes and the route all registered cleanly


def test_txt2img_with_and_without_fasterdiffusion(a1111):
    url, _, host = a1111
    base_info, base, _ = txt2img(url)
    all_info, allk, _ = txt2img(url, [True, "all"])
    assert [l["sha"] for l in base] == [l["sha"] for l in allk]            # `all`: bit-identical latents
    info, fd, images = txt2img(url, [True, "0,2"])
    text = info["infotexts"][0]
    assert 'FasterDiffusion: "0,2"' in text and stats(text, host, "txt2img"), text
    diff = max(abs(a - b) for a, b in zip(base[0]["values"], fd[0]["values"]))
    assert 0 < diff < 1e3
    # infotext round trip: A1111's own parser reads the keys back from the PNG
    png = requests.post(url + "/sdapi/v1/png-info", json={"image": "data:image/png;base64," + images[0]}, timeout=60).json()
    assert png["parameters"].get("FasterDiffusion") == "0,2", png


def test_parallel_equals_sequential_and_batch_of_two(a1111):
    url, _, host = a1111
    _, par, _ = txt2img(url, [True, "0,2"], batch_size=2)
    _, seq, _ = txt2img(url, [True, "0,2", False], batch_size=2)
    assert par[0]["shape"][0] == 2
    assert max(abs(a - b) for a, b in zip(par[0]["values"], seq[0]["values"])) < 1e-3


def test_hires_fix_and_img2img(a1111):
    url, _, host = a1111
    info, lat, images = txt2img(url, [True, "0,2"], enable_hr=True, hr_scale=2, hr_second_pass_steps=4,
                                denoising_strength=0.5, hr_upscaler="Latent")
    text = info["infotexts"][0]
    # two runs: the first pass, then the hires pass (its own 4 steps, step 0 a key step again), at 128 px
    assert stats(text, host, "hires"), text
    assert len(lat) == 1 and lat[0]["shape"][-1] == 128
    body = {"init_images": ["data:image/png;base64," + images[0]], "denoising_strength": 0.5}
    info, lat, _ = txt2img(url, [True, "0,2"], path="img2img", **body)
    text = info["infotexts"][0]
    assert stats(text, host, "img2img") and 'FasterDiffusion: "0,2"' in text, text  # t_enc + 1


def test_a_bad_strategy_generates_without_fasterdiffusion_and_says_so(a1111):
    url, data, host = a1111
    info, lat, _ = txt2img(url, [True, "1,2,3"])
    assert "FasterDiffusion" not in info["infotexts"][0] and "FD stats" not in info["infotexts"][0]
    assert "FasterDiffusion is off for this generation" in (data / "a1111.log").read_text()


def test_accordion_and_tab_render_in_chromium(a1111):
    """The accordion (its step editor filled by the extension's script with web/js/strategy.js's rules) and the
    tab, in headless Chromium; clicking a cell toggles a key step in the strategy box.  Screenshots go to
    out/<host>_accordion.png and out/<host>_tab.png."""
    asked = os.environ.get("FD_CHROMIUM", "")
    required = bool(asked or os.environ.get("CI"))             # asked for: a missing browser fails, never skips
    chromium = asked if asked not in ("", "1", "true", "yes") else (shutil.which("chromium") or shutil.which("chromium-browser"))
    missing = None
    if not chromium or not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        missing = f"no chromium ({asked or 'none on PATH'})"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as e:
            missing = f"no playwright ({e}): tools/setup_test_host.sh --browser installs it"
    if missing:
        (pytest.fail if required else pytest.skip)(missing + ("; FD_CHROMIUM or CI asked for the browser test" if required else ""))
    url, _, host = a1111
    (REPO / "out").mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, timeout=120_000)
        acc = page.locator("#script_txt2img_fasterdiffusion_fd_enable")
        acc.wait_for(timeout=120_000)
        acc.locator(".label-wrap").first.click()
        cells = page.locator("#script_txt2img_fasterdiffusion_fd_editor .fd-cell")
        cells.first.wait_for(timeout=60_000)
        steps = int(page.locator("#txt2img_steps input[type=number]").input_value())
        assert cells.count() == steps
        box = page.locator("#script_txt2img_fasterdiffusion_fd_strategy textarea, #script_txt2img_fasterdiffusion_fd_strategy input").first
        assert box.input_value() == "paper"
        cells.nth(steps - 1).click()                  # the last step becomes a key step too
        page.wait_for_function("document.querySelector('#script_txt2img_fasterdiffusion_fd_strategy textarea, #script_txt2img_fasterdiffusion_fd_strategy input').value !== 'paper'")
        assert box.input_value().endswith(f",{steps - 1}")
        info = page.locator("#script_txt2img_fasterdiffusion_fd_editor .fd-info").inner_text()
        assert "steps run the encoder" in info
        acc.screenshot(path=str(REPO / "out" / f"{host}_accordion.png"))
        page.locator("#tabs button", has_text="FasterDiffusion").first.click()
        page.locator("#fd_tab_editor .fd-cell").first.wait_for(timeout=60_000)
        page.locator("#fd_tab_export").click()
        page.wait_for_function("document.querySelector('#fd_tab_json textarea').value.includes('key_steps')")
        page.locator("#tab_fasterdiffusion").screenshot(path=str(REPO / "out" / f"{host}_tab.png"))
        browser.close()
