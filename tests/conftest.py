"""Test fixtures: ComfyUI booted as a library, the pack loaded by ComfyUI's own loader, test models.

Engine tests (test_strategy.py) need none of this; the fixtures boot ComfyUI only when asked for.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
    apply_cls, comfy_unet = tm.load_pack(tmp_path_factory.mktemp("custom_nodes"))
    return SimpleNamespace(Apply=apply_cls, cu=comfy_unet,
                           display=nodes.NODE_DISPLAY_NAME_MAPPINGS["FasterDiffusionApply"])


@pytest.fixture(scope="session")
def digits(comfy):
    """(ModelPatcher, class tokens) of the committed trained test model."""
    return tm.load_test_model()


def apply(pack, model, strategy="paper", parallel=True, max_decoder_batch=32):
    """Run the Apply node as ComfyUI would; returns (patched model, its config for reading stats)."""
    (patched,) = pack.Apply().apply(model, strategy, parallel, max_decoder_batch)
    return patched, patched.model_options["transformer_options"].get(pack.cu.KEY)
