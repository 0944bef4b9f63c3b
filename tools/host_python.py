"""Before a tool imports ComfyUI: stop with the command to use when this interpreter cannot run it."""
import sys

VENV_PYTHON = ".testhost/venv/bin/python"


def wrong_interpreter(command: str) -> str | None:
    """None if this interpreter has torch, else the message saying what to run instead."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return (f"wrong interpreter, use `bash tools/run.sh {command}`: {sys.executable} cannot run ComfyUI "
                f"({e}); tools/run.sh provisions the test host on first use and runs {VENV_PYTHON}.")
    return None


def require(command: str):
    if message := wrong_interpreter(command):
        sys.exit(message)
