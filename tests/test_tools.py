"""The README's tools, run as a newcomer runs them (small settings): the demo's labelled image, the
benchmark's progress lines."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

import testmodel as tm

TOOLS = tm.REPO / "tools"


def run_tool(*args, timeout=300):
    run = subprocess.run([sys.executable, *map(str, args)], cwd=tm.REPO, capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_demo_image_is_labelled_and_uses_the_recommended_strategy(tmp_path):
    from PIL import Image
    out = tmp_path / "demo.png"
    stdout = run_tool(TOOLS / "demo.py", "--steps", 6, "--repeats", 1, "--out", out)
    assert "strategy 'uniform:3'" in stdout, "the strategy the README recommends for this model"
    img = np.asarray(Image.open(out).convert("L"))
    grid_w, grid_h = 20 * 17 * 4 + 4, 3 * 17 * 4 + 4          # three rows of 20 digits, as tm.save_grid draws them
    assert img.shape[1] > grid_w + 200 and img.shape[0] > grid_h + 60, "room for labels, a title and a footer"
    labels, footer = img[60:grid_h, :250], img[-40:, :]
    assert (labels < 128).sum() > 500, "row labels are written left of the rows"
    assert (footer < 128).sum() > 500, "speed and fidelity are written under the rows"


def test_benchmark_shows_progress(tmp_path):
    stdout = run_tool(TOOLS / "benchmark.py", "--models", "digits", "--steps", 3, "--repeats", 1, "--no-injection")
    lines = [line for line in stdout.splitlines() if line.lstrip().startswith("[")]
    assert len(lines) == 2 * 3, stdout                      # warm-up + 1 repeat, three variants each
    assert "digits: warm-up, baseline" in lines[0] and "repeat 1 of 1, EP+parallel" in lines[-1]
