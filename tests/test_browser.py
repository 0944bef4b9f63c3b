"""End to end in a real browser: headless Chromium (Debian package) driven by Playwright, against the real
ComfyUI server and frontend.  Add the nodes, edit the strategy in the editor, save, reload, queue."""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import testmodel as tm
from testmodel import fashion as fm

CHROMIUM = os.environ.get("FD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="no chromium (tools/setup_test_host.sh --browser installs it)")


def pinned_frontend() -> str:
    """The comfyui-frontend-package version the host's requirements.txt pins (1.32.9 on 0.3.75, 1.49.6 on 0.33)."""
    text = (tm.comfy_dir() / "requirements.txt").read_text()
    match = re.search(r"^comfyui-frontend-package==([\w.]+)", text, re.MULTILINE)
    assert match, "the host's requirements.txt pins no comfyui-frontend-package"
    return match.group(1)


NEWEST_FRONTEND = "1.58.1"   # tools/setup_test_host.sh --browser

BUILD_GRAPH = """() => {
    const g = app.graph;
    g.clear();
    const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; g.add(n); return n; };
    const w = (n, name) => n.widgets.find((x) => x.name === name);
    const model = add("FDTestDigitsModel", [20, 40]);
    const fd = add("FasterDiffusionApply", [260, 40]);
    const cond = add("FDTestDigitsCond", [20, 420]);
    const latent = add("EmptyLatentImage", [260, 420]);
    const ks = add("KSampler", [720, 40]);
    const save = add("SaveLatent", [1080, 40]);
    model.connect(0, fd, 0); fd.connect(0, ks, 0); cond.connect(0, ks, 1); cond.connect(1, ks, 2);
    latent.connect(0, ks, 3); ks.connect(0, save, 0);
    w(latent, "width").value = 64; w(latent, "height").value = 64;
    w(ks, "steps").value = 10; w(ks, "cfg").value = 3.0;
    w(ks, "control_after_generate").value = "fixed";
    w(save, "filename_prefix").value = "fd_browser";
    fd.size = [420, Math.max(fd.size[1], 300)];
    app.canvas.ds.offset = [40, 160];
    g.setDirtyCanvas(true, true);
    return fd.id;
}"""


@pytest.fixture(params=[("pinned", "classic"), ("pinned", "vue"), ("newest", "classic"), ("newest", "vue")],
                ids=lambda p: "-".join(p))
def page(request):
    """The ComfyUI page on the frontend ComfyUI pins or the newest one, in the classic LiteGraph canvas or
    with the Vue node renderer ("Nodes 2.0")."""
    from playwright.sync_api import sync_playwright
    frontend, renderer = request.param
    url, base = request.getfixturevalue("server" if frontend == "pinned" else "server_newest_frontend")
    requests.post(url + "/settings/Comfy.TutorialCompleted", json=True, timeout=10)   # no Templates dialog
    requests.post(url + "/settings/Comfy.VueNodes.Enabled", json=renderer == "vue", timeout=10)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1500, "height": 900})
        pg.goto(url)
        pg.wait_for_function("window.app?.graph && window.__fasterDiffusionEditor === true", timeout=90_000)
        pg.keyboard.press("Escape")
        yield pg, url, base, f"{frontend}_{renderer}"
        browser.close()


def strategy_of(page, node_id):
    return page.evaluate("(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'strategy').value", node_id)


def test_strategy_editor_end_to_end(page):
    page, url, base, variant = page
    fd = page.evaluate(BUILD_GRAPH)
    editor = page.locator(f'.fd-editor[data-node-id="{fd}"]')
    cells = editor.locator(".fd-cell")
    cells.first.wait_for(state="visible", timeout=20_000)
    # the step count comes from the connected KSampler; paper at 10 steps = keys 0,1,2,3,5
    assert cells.count() == 10 and editor.locator(".fd-cell.fd-key").count() == 5
    assert "5 of 10 steps run the encoder" in editor.locator(".fd-info").inner_text()
    assert "features forecast from the last two key steps" in editor.locator(".fd-info").inner_text()
    page.evaluate("""(id) => { const w = app.graph.getNodeById(id).widgets.find((w) => w.name === "propagation");
                                w.value = "reuse"; w.callback?.("reuse"); }""", fd)
    page.wait_for_function("""(id) => document.querySelector(`.fd-editor[data-node-id='${id}'] .fd-info`)
                              .textContent.includes("the last key step's features reused")""", arg=fd, timeout=5_000)
    page.evaluate("""(id) => { const w = app.graph.getNodeById(id).widgets.find((w) => w.name === "propagation");
                                w.value = "forecast"; w.callback?.("forecast"); }""", fd)

    cells.nth(4).click()                                         # make step 4 a key step
    assert strategy_of(page, fd) == "0,1,2,3,4,5"
    editor.get_by_role("button", name="uniform").click()         # preset uniform:K, K = 4
    assert strategy_of(page, fd) == "uniform:4"
    assert editor.locator(".fd-cell.fd-key").count() == 3
    cells.nth(0).click()                                         # step 0 cannot be toggled
    assert "Step 0 is always a key step" in editor.locator(".fd-msg").inner_text()
    editor.get_by_role("button", name="paper").click()
    cells.nth(7).click()
    assert strategy_of(page, fd) == "0,1,2,3,5,7"

    # copy/paste of the node keeps its strategy, and the copy gets its own editor
    copy_id = page.evaluate("""(id) => {
        const before = new Set(app.graph.nodes.map((n) => String(n.id)));
        app.canvas.selectNode(app.graph.getNodeById(id));
        app.canvas.copyToClipboard();
        app.canvas.pasteFromClipboard();
        return app.graph.nodes.find((n) => !before.has(String(n.id)))?.id;
    }""", fd)
    assert copy_id is not None and str(copy_id) != str(fd)
    assert strategy_of(page, copy_id) == "0,1,2,3,5,7"
    page.wait_for_function("(id) => document.querySelector(`.fd-editor[data-node-id='${id}']`)", arg=copy_id, timeout=10_000)
    page.evaluate("(id) => app.graph.remove(app.graph.getNodeById(id))", copy_id)
    assert page.locator(f'.fd-editor[data-node-id="{copy_id}"]').count() == 0 or \
        not page.locator(f'.fd-editor[data-node-id="{copy_id}"]').is_visible()

    # a malformed shared document leaves the node unchanged, with a message
    editor.get_by_role("button", name="Paste…").click()
    editor.locator("textarea").fill('{"key_steps": [1, 2]}')
    editor.get_by_role("button", name="Use").click()
    assert "Not a FasterDiffusion strategy: step 0 must be a key step" in editor.locator(".fd-msg").inner_text()
    assert strategy_of(page, fd) == "0,1,2,3,5,7"
    editor.locator("textarea").fill(json.dumps({"name": "mine", "steps": 10, "key_steps": [0, 1, 2, 6]}))
    editor.get_by_role("button", name="Use").click()
    assert strategy_of(page, fd) == "0,1,2,6"

    # saved in the workflow (no extra widget value), in the API prompt, and restored on load
    workflow = page.evaluate("() => (window.__fdSaved = JSON.parse(JSON.stringify(app.graph.serialize())))")
    node = next(n for n in workflow["nodes"] if str(n["id"]) == str(fd))   # ids are strings on newer frontends
    # controlnet_reuse, propagation, encoder_blocks
    assert node["widgets_values"] == ["0,1,2,6", True, 32, True, "forecast", 0]
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert prompt[str(fd)]["inputs"]["strategy"] == "0,1,2,6"
    page.evaluate("() => app.graph.clear()")
    page.evaluate("() => app.loadGraphData(window.__fdSaved)")
    page.wait_for_function("(id) => app.graph.getNodeById(id)?.widgets?.find((w) => w.name === 'strategy')?.value === '0,1,2,6'",
                           arg=fd, timeout=20_000)
    editor = page.locator(f'.fd-editor[data-node-id="{fd}"]')
    editor.locator(".fd-cell").first.wait_for(state="visible", timeout=20_000)
    assert editor.locator(".fd-cell.fd-key").count() == 4

    # queue it and wait for the run
    before = set(requests.get(url + "/history", timeout=10).json())
    page.evaluate("() => app.queuePrompt(0, 1)")
    deadline, done = time.time() + 120, None
    while time.time() < deadline and done is None:
        new = {k: v for k, v in requests.get(url + "/history", timeout=10).json().items() if k not in before}
        done = next((v for v in new.values() if v.get("status", {}).get("completed")), None)
        time.sleep(0.5)
    assert done is not None and done["status"]["status_str"] == "success", done
    assert list((base / "output").glob("fd_browser_*.latent"))
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    assert version == {"pinned": pinned_frontend(), "newest": NEWEST_FRONTEND}[variant.split("_")[0]]
    shots = tm.REPO / "out"
    shots.mkdir(exist_ok=True)
    box = editor.bounding_box()
    page.screenshot(path=str(shots / f"browser_editor_{variant}.png"),
                    clip={"x": max(0, box["x"] - 20), "y": max(0, box["y"] - 140), "width": box["width"] + 40,
                          "height": box["height"] + 230})


WORKFLOWS = sorted((tm.REPO / "workflows").glob("*.json"))
# examples as the V1 nodes saved them (commit 9e1217e), before the move to V3 and the optional controlnet_reuse
# widget: they must load and run unchanged
SAVED_BEFORE_V3 = sorted((tm.REPO / "tests" / "data" / "saved_workflows").glob("*.json"))
# the stand-ins (tests/host_nodes/fd_test_nodes) pick their tiny model by the saved file names: UNETLoader a Flux or
# Wan 2.1 T2V for a flux / wan file, a Fashion-MNIST file the Fashion-MNIST student, else the digits TiUE student
SUBSTITUTE = {"CheckpointLoaderSimple": "FDTestCheckpoint", "CLIPTextEncode": "FDTestTextEncode",
              "VAEDecode": "FDTestVAEDecode", "UNETLoader": "FDTestUNetLoader",
              "ImageOnlyCheckpointLoader": "FDTestImageOnlyCheckpoint", "DualCLIPLoader": "FDTestDualCLIPLoader",
              "CLIPLoader": "FDTestCLIPLoader", "VAELoader": "FDTestVAELoader"}
VIDEO_FRAMES = 4         # SVD_img2vid_Conditioning's video_frames in the test (14 saved)
VIDEO_LENGTH = 9         # EmptyHunyuanLatentVideo's length in the test (Wan: 3 latent frames, decoded to 9; 33 saved)
SIZES = {"EmptyLatentImage": dict(width=64, height=64),           # an 8x8 latent: the test models' size
         "EmptySD3LatentImage": dict(width=64, height=64),        # Flux: 8x8 latent, 4x4 patches
         "EmptyHunyuanLatentVideo": dict(width=64, height=64, length=VIDEO_LENGTH),
         "SVD_img2vid_Conditioning": dict(width=64, height=64, video_frames=VIDEO_FRAMES)}
DIT_MODELS = {"flux": "Flux", "wan": "WAN21"}   # UNETLoader file -> the stand-in's model class (model_base)
# The One-Pass example runs the best committed TiUE student, the Fashion-MNIST one (README, One-Pass): its file names
# are rewritten to the Fashion-MNIST teacher's and student's (the stand-ins' pick), its size to that model's, its
# prompt to a class; the student is put in the server's models folder, where the node must recognise it.
FASHION_FILES = {"ckpt_name": "fashion_unet.safetensors", "unet_name": "fashion_tiue_student.safetensors"}
FASHION_SIZE = dict(width=128, height=128)        # a 16x16 latent
FASHION_PROMPT = "a sneaker"
SERVED = re.compile(r"FasterDiffusion \[(?P<strategy>[^\]]*)\]: (?P<steps>\d+) steps, encoder ran (?P<encoder>\d+)x "
                    r"and was skipped (?P<skipped>\d+)x")


def saved_strategies(url, workflow) -> dict:
    """Node id -> the strategy the workflow saved, for each node with one: the widget value at the strategy's
    place among the node's widgets as the server defines them (tests/test_workflows.py pairs them the same way)."""
    from test_workflows import widget_inputs
    out = {}
    for n in workflow["nodes"]:
        if not n["type"].startswith("FasterDiffusion"):
            continue
        spec = requests.get(f"{url}/object_info/{n['type']}", timeout=10).json()[n["type"]]["input"]
        names = widget_inputs(spec)
        if "strategy" in names:
            out[str(n["id"])] = n["widgets_values"][names.index("strategy")]
    return out


@pytest.fixture(scope="module")
def classic_page(server):
    from playwright.sync_api import sync_playwright
    url, base = server
    requests.post(url + "/settings/Comfy.TutorialCompleted", json=True, timeout=10)
    requests.post(url + "/settings/Comfy.VueNodes.Enabled", json=False, timeout=10)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1500, "height": 900})
        pg.goto(url)
        pg.wait_for_function("window.app?.graph && window.__fasterDiffusionEditor === true", timeout=90_000)
        yield pg, url, base
        browser.close()


@pytest.mark.parametrize("path", WORKFLOWS + SAVED_BEFORE_V3,
                         ids=[p.stem for p in WORKFLOWS] + [f"saved-before-v3-{p.stem}" for p in SAVED_BEFORE_V3])
def test_example_workflow_loads_converts_and_runs(classic_page, path):
    """Each shipped workflow loads in the real frontend, becomes an API prompt with the strategies it saved, and
    runs on the test host with the test models in place of the checkpoint or diffusion model (CLIP, CLIP vision and
    VAE swapped likewise; the sizes cut to the test models'; an init image put in the input folder; all else as
    saved), where each FasterDiffusion strategy serves its run (the run's stats line in the server log)."""
    page, url, base = classic_page
    workflow = json.loads(path.read_text())
    page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
    page.keyboard.press("Escape")                          # a "missing models" dialog, if any
    with_strategy = page.evaluate("() => app.graph.nodes.filter((n) => n.widgets?.some((w) => w.name === 'strategy'))"
                                  ".map((n) => String(n.id))")
    for node_id in with_strategy:                          # every node with a strategy gets the editor
        page.wait_for_function("(id) => document.querySelector(`.fd-editor[data-node-id='${id}']`)", arg=node_id,
                               timeout=10_000)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    fd_nodes = {k: n for k, n in prompt.items() if n["class_type"].startswith("FasterDiffusion")}
    strategies = saved_strategies(url, workflow)                  # One-Pass has none
    assert fd_nodes and {k: n["inputs"]["strategy"] for k, n in fd_nodes.items() if "strategy" in n["inputs"]} \
        == strategies, strategies
    saves = [k for k, n in prompt.items() if n["class_type"] in ("SaveImage", "SaveAnimatedWEBP")]
    unets = [n["inputs"]["unet_name"].lower() for n in prompt.values() if n["class_type"] == "UNETLoader"]
    dits = [model for key, model in DIT_MODELS.items() if any(key in name for name in unets)]
    frames = VIDEO_LENGTH if any(n["class_type"] == "EmptyHunyuanLatentVideo" for n in prompt.values()) else VIDEO_FRAMES
    one_pass = any(n["class_type"] == "FasterDiffusionOnePass" for n in prompt.values())
    if one_pass:                                           # the Fashion-MNIST student, recognised from the models folder
        (base / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
        shutil.copy(tm.REPO / "testmodel" / FASHION_FILES["unet_name"], base / "models" / "diffusion_models")
    for node in prompt.values():
        node["class_type"] = SUBSTITUTE.get(node["class_type"], node["class_type"])
        node["inputs"].update(SIZES.get(node["class_type"], {}))
        if one_pass:
            node["inputs"].update({k: v for k, v in FASHION_FILES.items() if k in node["inputs"]})
            if node["class_type"] == "EmptyLatentImage":
                node["inputs"].update(FASHION_SIZE)
            if node["class_type"] == "FDTestTextEncode":
                node["inputs"]["text"] = FASHION_PROMPT
        if node["class_type"] == "LoadImage":             # the real node, on an image of another size and aspect
            (base / "input").mkdir(exist_ok=True)
            Image.linear_gradient("L").resize((48, 32)).convert("RGB").save(base / "input" / node["inputs"]["image"])
    log = base / "server.log"
    log_start = log.stat().st_size
    r = requests.post(url + "/prompt", json={"prompt": prompt, "client_id": "workflow-test"}, timeout=10)
    assert r.status_code == 200 and not r.json()["node_errors"], r.text
    prompt_id = r.json()["prompt_id"]
    deadline, entry = time.time() + 180, None
    while time.time() < deadline:
        entry = requests.get(f"{url}/history/{prompt_id}", timeout=10).json().get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    assert entry and entry["status"]["status_str"] == "success", entry and entry["status"]
    for node_id in saves:
        images = entry["outputs"][node_id]["images"]
        assert images and (base / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()
        if prompt[node_id]["class_type"] == "SaveAnimatedWEBP":    # one animation, every frame of the video
            with Image.open(base / "output" / images[0]["subfolder"] / images[0]["filename"]) as webp:
                assert len(images) == 1 and webp.format == "WEBP" and webp.n_frames == frames, webp.n_frames
    # the host sampled the DiT the file names (its own log line), and every strategy the workflow saved served its
    # run: the run's stats line names it, its encoder skipped steps
    with open(log, "rb") as f:
        f.seek(log_start)
        text = f.read().decode(errors="replace")
    for model in dits:
        assert f"Requested to load {model}\n" in text, (model, text[-3000:])
    if one_pass:      # the node named the student, and it drew the class the prompt asked for
        assert f"TiUE student {FASHION_FILES['unet_name']} (distilled for these timesteps)" in text, text[-3000:]
        (node_id,) = saves
        image = entry["outputs"][node_id]["images"][0]
        with Image.open(base / "output" / image["subfolder"] / image["filename"]) as png:
            pixels = torch.from_numpy(np.asarray(png.convert("L"), dtype=np.float32) / 255)
        assert pixels.shape == (28, 28) and fm.classify(pixels[None]).tolist() == [fm.CLASSES.index("Sneaker")]
    runs = [m.groupdict() for m in SERVED.finditer(text)]
    for strategy in set(strategies.values()):
        assert any(r["strategy"] == strategy and int(r["skipped"]) > 0 for r in runs), (strategy, runs)
