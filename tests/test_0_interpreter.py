"""Collected first: with an interpreter that cannot run ComfyUI, stop the whole run saying which one to use
(rather than a hundred errors about a missing torch).  Engine-only files (test_strategy.py, test_fuzz.py)
still run on any Python with pytest when named on their own."""
import os
import subprocess
import sys

import pytest

import testmodel as tm

sys.path.insert(0, str(tm.REPO / "tools"))
from host_python import wrong_interpreter  # noqa: E402

if message := wrong_interpreter("test"):   # reported as this module's collection error, which stops the run
    pytest.exit(message, returncode=4)


def without_torch(tmp_path, *args):
    """Run this interpreter with a torch that cannot be imported (a stand-in first on the path)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch (stand-in)')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return subprocess.run([sys.executable, *args], cwd=tm.REPO, env=env, capture_output=True, text=True, timeout=120)


def test_tests_under_a_wrong_interpreter_say_which_to_use(tmp_path):
    run = without_torch(tmp_path, "-m", "pytest", "tests/test_0_interpreter.py", "-q")
    assert run.returncode != 0 and "no tests ran" not in run.stdout, run.stdout + run.stderr
    said = run.stdout + run.stderr     # the stop comes from conftest.py (before this module) or from here
    assert "wrong interpreter, use `bash tools/run.sh test`" in said and ".testhost/venv/bin/python" in said


@pytest.mark.parametrize("tool,command", [("demo.py", "demo"), ("benchmark.py", "benchmark"),
                                          ("quality_benchmark.py", "quality"), ("onepass_benchmark.py", "onepass"),
                                          ("train_tiue.py", "tiue")])
def test_tools_under_a_wrong_interpreter_say_which_to_use(tmp_path, tool, command):
    run = without_torch(tmp_path, f"tools/{tool}")
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"bash tools/run.sh {command}" in run.stderr and ".testhost/venv/bin/python" in run.stderr
