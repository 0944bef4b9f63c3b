"""Test fixtures: ComfyUI booted as a library, the pack loaded by ComfyUI's own loader, test models.

Engine tests (test_strategy.py) need none of this; the fixtures boot ComfyUI only when asked for.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(REPO / "tools"))
from host_python import wrong_interpreter  # noqa: E402

if message := wrong_interpreter("test"):      # before any import the test host provides
    pytest.exit(message, returncode=4)

import requests  # noqa: E402

pytest_plugins = ["diffusers_checks"]          # the diffusers tests' fixtures (one_thread, patch)

import testmodel as tm  # noqa: E402

@pytest.fixture(scope="session")
def comfy():
    tm.boot_comfy()
    import torch
    torch.set_num_threads(1)
    return tm.comfy_dir()


@pytest.fixture(scope="session")
def pack(comfy, tmp_path_factory):
    """The pack as ComfyUI loads it: custom_nodes/<pack> -> this checkout, via nodes.load_custom_node."""
    import nodes
    from importlib import import_module
    apply_cls, comfy_unet = tm.load_pack(tmp_path_factory.mktemp("custom_nodes"))
    package = comfy_unet.__name__.rsplit(".", 3)[0]
    return SimpleNamespace(Apply=apply_cls, cu=comfy_unet, ldm=import_module(package + ".patches.comfy.ldm"),
                           split=import_module(package + ".fasterdiffusion.ldm"),
                           runtime=import_module(package + ".fasterdiffusion.runtime"),
                           display=nodes.NODE_DISPLAY_NAME_MAPPINGS["FasterDiffusionApply"])


@pytest.fixture(scope="session")
def digits(comfy):
    """(ModelPatcher, class tokens) of the committed trained test model."""
    return tm.load_test_model()


def apply(pack, model, strategy="paper", parallel=True, max_decoder_batch=32, **optional):
    """Run the Apply node as ComfyUI would; returns (patched model, its config for reading stats)."""
    (patched,) = pack.Apply.execute(model, strategy, parallel, max_decoder_batch, **optional)
    return patched, patched.model_options["transformer_options"].get(pack.cu.KEY)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NEWEST_FRONTEND = REPO / ".testhost" / "frontend-newest"   # tools/setup_test_host.sh --browser puts it here


def run_server(base, extra_args=()):
    """Start a real ComfyUI server on ``base`` (its --base-directory); yields its URL; stops it after."""
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / tm.PACK_DIR_NAME).symlink_to(tm.REPO, target_is_directory=True)
    (base / "custom_nodes" / "fd_test_nodes").symlink_to(REPO / "tests" / "host_nodes" / "fd_test_nodes")
    port = free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--use-pytorch-cross-attention", "--listen", "127.0.0.1",
         "--port", str(port), "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
         "--disable-api-nodes", "--disable-auto-launch", *extra_args],
        cwd=tm.comfy_dir(), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (base / "server.log").read_text()[-3000:]
            try:
                if requests.get(url + "/system_stats", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not start:\n" + (base / "server.log").read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real ComfyUI server (subprocess, the frontend it pins) with this pack and the test nodes."""
    base = tmp_path_factory.mktemp("comfy_base")
    for url in run_server(base):
        yield url, base


@pytest.fixture(scope="session")
def server_newest_frontend(tmp_path_factory):
    """The same, serving the newest comfyui-frontend-package (--front-end-root)."""
    static = NEWEST_FRONTEND / "comfyui_frontend_package" / "static"
    if not static.is_dir():
        pytest.skip("no newest frontend: run tools/setup_test_host.sh --browser")
    base = tmp_path_factory.mktemp("comfy_base_newest")
    for url in run_server(base, ["--front-end-root", str(static)]):
        yield url, base
