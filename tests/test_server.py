"""The pack inside a real ComfyUI server: queue an API-format prompt over HTTP, follow the websocket."""
from __future__ import annotations

import json
import time
import uuid

import requests
import websocket


def graph(strategy="paper", fd_ksampler=True):
    ksampler = lambda steps, seed: {"class_type": "KSampler", "inputs": {
        "model": ["2", 0], "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0], "denoise": 1.0}}
    g = {
        "1": {"class_type": "FDTestDigitsModel", "inputs": {}},
        "2": {"class_type": "FasterDiffusionApply", "inputs": {"model": ["1", 0], "strategy": strategy,
                                                               "parallel": True, "max_decoder_batch": 32}},
        "3": {"class_type": "FDTestDigitsCond", "inputs": {"digit": 7}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": ksampler(10, 1),
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "fd_a"}},
        "7": ksampler(12, 2),       # a second sampler on the same patched model
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "fd_b"}},
        "9": {"class_type": "FasterDiffusionKSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 8, "cfg": 3.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0], "denoise": 1.0,
            "strategy": "uniform:2", "parallel": True, "max_decoder_batch": 32, "injection_alpha": 0.003,
            "injection_threshold": 500.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "fd_c"}},
    }
    if not fd_ksampler:
        del g["9"], g["10"]
    return g


def queue_and_follow(url, prompt):
    """Queue ``prompt``; follow the websocket to its end: (prompt_id, end message, {node: progress max},
    [(node, text shown on it)])."""
    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(f"{url.replace('http', 'ws')}/ws?clientId={client_id}", timeout=120)
    r = requests.post(url + "/prompt", json={"prompt": prompt, "client_id": client_id}, timeout=10)
    assert r.status_code == 200, r.text
    prompt_id = r.json()["prompt_id"]
    progress, texts, done = {}, [], None
    deadline = time.time() + 180
    while done is None and time.time() < deadline:
        msg = ws.recv()
        if isinstance(msg, bytes):
            if int.from_bytes(msg[:4], "big") == 3:          # BinaryEventTypes.TEXT: text shown on a node
                n = int.from_bytes(msg[4:8], "big")
                texts.append((msg[8:8 + n].decode(), msg[8 + n:].decode()))
            continue
        m = json.loads(msg)
        if m["type"] == "progress" and m["data"].get("prompt_id") == prompt_id:
            progress[m["data"]["node"]] = m["data"]["max"]
        elif m["type"] in ("execution_success", "execution_error", "execution_interrupted") \
                and m["data"].get("prompt_id") == prompt_id:
            done = m
    ws.close()
    return prompt_id, done, progress, texts


def test_node_is_listed(server):
    url, _ = server
    info = requests.get(url + "/object_info/FasterDiffusionApply", timeout=10).json()["FasterDiffusionApply"]
    assert info["display_name"] == "FasterDiffusion Apply"
    assert info["input"]["required"]["strategy"][1]["default"] == "paper"


def test_prompt_over_http_with_progress_and_stats(server):
    url, base = server
    prompt_id, done, progress, texts = queue_and_follow(url, graph())
    assert done is not None and done["type"] == "execution_success", done
    assert progress == {"5": 10, "7": 12, "9": 8}           # per-step progress from every sampler node
    stats = sorted(t for node, t in texts if node == "2" and t.startswith("FasterDiffusion [paper]"))
    assert len(stats) == 2, texts                            # one line per sampler run, on the Apply node
    assert "10 steps, encoder ran 5x and was skipped 5x" in stats[0] and "decoder batches [1, 1, 1, 2, 5]" in stats[0]
    assert "12 steps, encoder ran 6x and was skipped 6x" in stats[1] and "decoder batches [1, 1, 1, 2, 5, 2]" in stats[1]
    assert all("forecast (order 1)" in s for s in stats)
    own = [t for node, t in texts if node == "9"]
    assert len(own) == 1 and own[0].startswith("FasterDiffusion [uniform:2]: 8 steps, encoder ran 4x and was skipped 4x")
    for _ in range(50):                                     # /history can lag behind execution_success
        h = requests.get(f"{url}/history/{prompt_id}", timeout=10).json()
        if prompt_id in h:
            break
        time.sleep(0.2)
    assert h[prompt_id]["status"]["status_str"] == "success"
    assert sorted(p.name for p in (base / "output").glob("fd_[abc]_*.latent")) == ["fd_a_00001_.latent", "fd_b_00001_.latent", "fd_c_00001_.latent"]


def test_bad_strategy_fails_validation(server):
    url, _ = server
    # (ComfyUI queues a prompt when any output validates, so every output here depends on the bad node)
    r = requests.post(url + "/prompt", json={"prompt": graph("every other", fd_ksampler=False), "client_id": "x"},
                      timeout=10)
    assert r.status_code == 400
    err = json.dumps(r.json())
    assert "'every other' is neither a known name nor a step index" in err and "uniform:K" in err


def compare_graph(strategy):
    return {
        "1": {"class_type": "FDTestCheckpoint", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "FDTestDigitsCond", "inputs": {"digit": 4}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "FasterDiffusionCompare", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0], "vae": ["1", 2],
            "seed": 9, "steps": 8, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "strategy": strategy,
            "parallel": True, "max_decoder_batch": 32, "compare_fewer_steps": True}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "fd_compare"}},
    }


def test_compare_node_over_http(server):
    """The Compare node in the server: listed, run, its report shown on the node, its image saved."""
    url, base = server
    info = requests.get(url + "/object_info/FasterDiffusionCompare", timeout=10).json()["FasterDiffusionCompare"]
    assert info["display_name"] == "FasterDiffusion Compare"
    assert info["output_name"] == ["comparison", "full", "faster", "report"]
    apply = requests.get(url + "/object_info/FasterDiffusionApply", timeout=10).json()["FasterDiffusionApply"]
    assert info["input"]["required"]["strategy"] == apply["input"]["required"]["strategy"]
    prompt_id, done, progress, texts = queue_and_follow(url, compare_graph("uniform:2"))
    assert done is not None and done["type"] == "execution_success", done
    shown = [t for node, t in texts if node == "4"]
    assert shown[-1].startswith("FasterDiffusion Compare [uniform:2, forecast (order 1)], 8 steps\ntime: full ")
    assert "PSNR vs full: FasterDiffusion " in shown[-1] and "\nrecommendation: " in shown[-1]
    assert list((base / "output").glob("fd_compare_*.png"))


def test_compare_bad_strategy_fails_validation(server):
    url, _ = server
    r = requests.post(url + "/prompt", json={"prompt": compare_graph("every other"), "client_id": "x"}, timeout=10)
    assert r.status_code == 400
    assert "'every other' is neither a known name nor a step index" in json.dumps(r.json())
