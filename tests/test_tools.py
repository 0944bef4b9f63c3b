"""The README's tools, run as a newcomer runs them (small settings): the demo's labelled image, the
benchmark's progress lines, the quality plot's point labels and its redraw from the saved table."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.util import module_from_spec, spec_from_file_location

import numpy as np
import pytest

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
    assert len(lines) == 2 * 4, stdout                      # warm-up + 1 repeat, four variants each
    assert "digits: warm-up, baseline" in lines[0] and "repeat 1 of 1, forecast" in lines[-1]
    assert "PEP+forecast" in stdout and "forecast keeps one more key step's features" in stdout


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(TOOLS))
    spec = spec_from_file_location("quality_benchmark", TOOLS / "quality_benchmark.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_plot_redraws_from_the_saved_table_with_every_point_labelled(quality, tmp_path):
    shutil.copy(tm.REPO / "docs" / "quality" / "quality.md", tmp_path)
    stdout = run_tool(TOOLS / "quality_benchmark.py", "--replot", "--out", tmp_path, timeout=120)
    assert (tmp_path / "quality_vs_cost.png").stat().st_size > 10_000, stdout
    rows = quality.read_rows(tmp_path / "quality.md")
    assert len(rows) >= 25 and rows[0]["name"] == "baseline 50 steps" and rows[0]["psnr"] == float("inf")
    assert {r["family"] for r in rows} == {"baseline", "FD", "FD+inj", "FD fewer steps", "EasyCache", "FD forecast",
                                           "FD forecast fewer steps"}
    assert all(r["gpu"] is not None and r["measured"] is not None for r in rows), "the two time columns"
    fig = quality.plot(rows, tmp_path / "again.png")
    assert len(fig.axes) == 6, "FD and PSNR against FLOPs, composed GPU time and measured time"
    fd_axis, psnr_axis = fig.axes[0], fig.axes[3]
    assert sorted(t.get_text() for t in fd_axis.texts) == sorted(quality.point_label(r["name"]) for r in rows)
    assert len(psnr_axis.texts) == len(rows) - 1, "every point but the reference itself (PSNR infinite)"
    assert {"u:3", "fc u:3", "fc cal 9", "fc 25 steps + u:2"} <= {t.get_text() for t in psnr_axis.texts}
    assert len({quality.point_label(r["name"]) for r in rows}) == len(rows), "labels tell the points apart"


def test_quality_table_of_the_first_version_still_reads(quality, tmp_path):
    """A table without the time columns (the first version's) gives gpu = measured = None and a FLOPs-only plot."""
    table = tmp_path / "old.md"
    table.write_text("| configuration | UNet FLOPs | wall s | FD-digits ↓ | accuracy | PSNR to 50-step run |\n|---|---|---|---|---|---|\n"
                     "| baseline 50 steps | 1.000 | 112.8 | 96.61 | 100% | ∞ |\n| FD uniform:3 | 0.820 | 80.1 | 97.75 | 100% | 33.89 |\n")
    rows = quality.read_rows(table)
    assert [r["name"] for r in rows] == ["baseline 50 steps", "FD uniform:3"] and rows[1]["gpu"] is None
    assert len(quality.plot(rows, tmp_path / "old.png").axes) == 2


def test_ci_runs_exactly_the_readme_test_command():
    readme = (tm.REPO / "README.md").read_text()
    block = readme[readme.index("## Development"):].split("```bash\n", 1)[1].split("```", 1)[0]
    (test_command,) = [line.split("#")[0].strip() for line in block.splitlines() if "# 2. the tests" in line]
    ci = [line.strip() for line in (tm.REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [test_command] == ["bash tools/run.sh test"]
