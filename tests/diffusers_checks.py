"""What every diffusers test module shares: one thread, ``apply()`` undone after each test (``patch``), the relative
difference, what ``remove()`` must restore, and the model output each ``scheduler.step`` receives.

The fixtures reach every test module through ``conftest.pytest_plugins``; a diffusers module asks for one thread with
``pytestmark = pytest.mark.usefixtures("one_thread")`` and imports the functions.  torch is imported where used (this
plugin loads before the interpreter check has said whether this Python has torch).
"""
from __future__ import annotations

import functools

import pytest


@pytest.fixture(scope="module")
def one_thread():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def patch():
    """apply() that is undone after the test, whatever happens in it; propagation "reuse" unless asked (most tests
    compare non-key steps with the key step's own features; each module's forecast test asks for "forecast")."""
    from fasterdiffusion import diffusers as fdd
    handles = []

    def do(pipe, *a, **k):
        handles.append(fdd.apply(pipe, *a, **{"propagation": "reuse", **k}))
        return handles[-1]
    yield do
    for h in reversed(handles):
        h.remove()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def state_of(pipe):
    """What apply() may touch and remove() must restore: the class, the instance dicts (the pipeline's own
    per-call values such as _guidance_scale aside), the components, the bound forward."""
    return (type(pipe), sorted(vars(pipe)), {k: id(v) for k, v in pipe.components.items()}, sorted(vars(pipe.unet)),
            sorted(vars(pipe.scheduler)), type(pipe).__call__, pipe.unet.forward.__func__)


def step_outputs(pipe):
    """Record the model output every scheduler.step receives (after guidance) during the next calls."""
    sched = pipe.scheduler
    original = sched.step
    outs = []

    @functools.wraps(original)
    def step(model_output, *a, **k):
        outs.append(model_output.clone())
        return original(model_output, *a, **k)
    vars(sched)["step"] = step
    return outs, lambda: vars(sched).pop("step")
