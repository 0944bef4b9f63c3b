"""A1111's ControlNet extension (Mikubill/sd-webui-controlnet) at non-key steps: ``controlnet_reuse``.

The extension replaces the UNet's ``forward`` (scripts/hook.py ``UnetHook.hook``: ``model.forward =
forward_webui``, whose closure holds the ``UnetHook`` with the generation's ``control_params``).  At every UNet
call its forward runs each active ControlNet unit's control model, ``param.control_model(x=, hint=, timesteps=,
context=, y=, control_type=)``, which returns the raw residuals (one per skip and one for the middle block: 13 for
SD1/SD2, 10 for SDXL); it then weights them itself (``param.weight``, soft injection, advanced weighting,
``cond_mark`` under CFG injection, the effective-region mask), sums them over the units and runs the UNet's
encoder and decoder with them.  A unit outside its ``[guidance_start, guidance_end]`` at this step
(``param.guidance_stopped``, set by the extension's ``on_cfg_denoiser`` callback before the model call) or off for
this pass (``disabled_by_hr_option``) is skipped.  FasterDiffusion runs under that forward in "shared" mode
(compvis.py): sequential propagation, the extension's own decoder loop at every step.

With ``controlnet_reuse`` (ComfyUI's semantics, patches/comfy/controlnet.py), for one sampling run, each served
unit's control model gets an instance ``forward`` wrapper:
  * a key step (the UNet's encoder runs, hook state "capture"): the model runs; its raw output is kept, per call
    slot (as the Run keys features: the call's shapes and its occurrence in the sampler evaluation), with the
    call's other inputs;
  * a non-key step served from the group's features (hook state "encoder"): the model does not run; it returns
    the raw output kept at the group's key step for this call slot whose inputs other than ``x`` and ``timesteps``
    (hint, context, y, control type ...) are equal by value.  The extension then weights it as it weights *this*
    step, and a unit that has ended is skipped by the extension itself: the decoder gets the key step's residuals
    of the units active at this step, at this step's weights;
  * anything else (a full call, no kept output, changed inputs: a new hint or prompt): the model runs, as with
    reuse off.
Late keys: before the first call of a non-key step, a served unit active now whose model was not active at the
group's key step (it starts inside the group) makes this step a key step (``Run.add_keys``), so that no step
gets residuals of a unit that did not run at its key.  Served: the unit types the extension treats as ControlNets
(``control_model_type.is_controlnet``: ControlNet, ControlLoRA, InstantID, ControlNetUnion); others (T2I-Adapters,
which cache their own output, style adapters, reference, IP-Adapter) run as the extension runs them.  Parallel
decoders stay off: the extension's forward decodes each call.  Nothing of the extension is imported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("FasterDiffusion")

PER_STEP = ("x", "timesteps")      # what a served call may differ in from its key step's


def extension_hook(unet):
    """The ControlNet extension's ``UnetHook`` behind ``unet``'s replaced forward (an object with a
    ``control_params`` list in the forward's closure, one level of nested closures searched), or None."""
    forward = unet.__dict__.get("forward")
    func = getattr(forward, "__func__", forward)
    seen, todo = set(), [func]
    for _ in range(2):
        nxt = []
        for f in todo:
            for cell in getattr(f, "__closure__", None) or ():
                try:
                    v = cell.cell_contents
                except ValueError:          # an empty cell
                    continue
                if id(v) in seen:
                    continue
                seen.add(id(v))
                if isinstance(getattr(v, "control_params", None), list):
                    return v
                if callable(v) and getattr(v, "__closure__", None):
                    nxt.append(v)
        todo = nxt
    return None


def served(param) -> bool:
    kind = getattr(param, "control_model_type", None)
    return bool(getattr(kind, "is_controlnet", False)) and isinstance(getattr(param, "control_model", None),
                                                                      torch.nn.Module)


def same(a, b) -> bool:
    """Equal inputs: tensors by shape, dtype and value; lists, tuples and dicts element-wise; the rest by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:          # an object without a plain equality: the same object only
        return a is b


@dataclass
class Kept:
    """One control model's raw output at a key step, with the call's inputs (held) but ``x`` and ``timesteps``."""
    key: int
    x_shape: tuple
    inputs: dict
    out: list

    def serves(self, kwargs) -> bool:
        x = kwargs.get("x")
        return (isinstance(x, torch.Tensor) and tuple(x.shape) == self.x_shape
                and kwargs.keys() - set(PER_STEP) == self.inputs.keys()
                and all(same(kwargs[k], v) for k, v in self.inputs.items()))


@dataclass
class Counts:
    key: int = 0          # control model forwards at key steps
    reused: int = 0       # non-key calls served the kept output (no forward)
    fresh: int = 0        # forwards at other calls (full calls, changed inputs, nothing kept)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Current:
    step: int | None
    slot: tuple
    used: set = field(default_factory=set)     # ids of the Kept entries served in this UNet call


class ControlReuse:
    """One sampling run's ControlNet reuse on one hooked UNet (``compvis.UNetHook`` in shared mode).

    ``units``: the extension's ``control_params``; ``evaluation_of()``: a number that changes with every sampler
    evaluation (the call slots' occurrences count within one evaluation, as ``Run.slot_of`` counts them)."""

    def __init__(self, run, hook, units: list, evaluation_of=None):
        self.run, self.hook = run, hook
        self.units = [u for u in units if served(u)]
        self.evaluation_of = evaluation_of or (lambda: None)
        self.kept: dict = {}             # (call slot, id(model)) -> [Kept] of the slot's newest key step
        self.active_at_key: dict = {}    # key step -> ids of the units active there
        self.counts = Counts()
        self.current: _Current | None = None
        self._evaluation = object()
        self._seen: dict = {}
        self._checked: set = set()       # non-key steps tested for late keys
        self._wrapped: list = []         # (module, wrapper, previous instance forward or None)

    # ------------------------------------------------------------------ install / remove
    def install(self):
        done = set()
        for u in self.units:
            m = u.control_model
            if id(m) not in done:            # the extension's model cache shares one model between units
                done.add(id(m))
                self._wrap(m)
        return self

    def _wrap(self, module):
        previous = module.__dict__.get("forward")
        inner = module.forward

        def forward(*args, **kwargs):
            return self.control_call(module, inner, args, kwargs)

        forward._fd_controlnet = self
        module.forward = forward
        self._wrapped.append((module, forward, previous))

    def remove(self):
        for module, wrapper, previous in reversed(self._wrapped):
            if module.__dict__.get("forward") is wrapper:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous
            else:
                log.warning("FasterDiffusion: a ControlNet model's forward was replaced after FasterDiffusion's; "
                            "leaving it")
        self._wrapped = []
        self.kept.clear()
        self.current = None

    # ------------------------------------------------------------------ the UNet call (from compvis.UNetHook)
    @staticmethod
    def active(unit) -> bool:
        """Whether a unit's [start, end] holds at this step (the extension's ``guidance_stopped``, set before the
        model call).  Its other test, ``disabled_by_hr_option``, is the same at every step of one pass: a unit it
        turns off never runs, at key steps or others, and never needs a late key."""
        return not getattr(unit, "guidance_stopped", False)

    def before(self, call, step):
        """The UNet's pre-hook, before ``Run.forward``: this call's slot, and late keys at a non-key step."""
        evaluation = self.evaluation_of()
        if evaluation != self._evaluation:
            self._evaluation, self._seen = evaluation, {}
        n = self._seen.get(call.slot, 0)
        self._seen[call.slot] = n + 1
        self.current = _Current(step, (call.slot, n))
        run = self.run
        if step is None or run.bypass or step in self._checked or run.plan.is_key(step):
            return
        self._checked.add(step)
        at_key = self.active_at_key.get(run.plan.group_of(step)[0])
        if at_key is None:              # the key step encoded nothing for this run: nothing is reused
            return
        late = [u for u in self.units if self.active(u) and id(u) not in at_key]
        if late and run.add_keys([step]):
            log.info("FasterDiffusion: a ControlNet unit starts inside a group (its guidance start); step %d runs "
                     "as a key step, so that every step gets residuals of its own units", step)

    def after(self):
        """The UNet's forward hook: a key step's active units are known once the extension's forward has run."""
        cur, self.current = self.current, None
        if cur is not None and cur.step is not None and self.run.plan.is_key(cur.step):
            self.active_at_key.setdefault(cur.step, set()).update(id(u) for u in self.units if self.active(u))

    def _mode(self) -> str | None:
        state = self.hook.state
        return None if state is None else state.mode

    # ------------------------------------------------------------------ a control model's call
    def control_call(self, module, original, args, kwargs):
        cur = self.current
        mode = self._mode() if cur is not None else None
        if cur is None or args or mode not in ("capture", "encoder") or cur.step is None:
            if cur is not None:       # a full call: a key step alone in its group counts as a key step's run
                key = cur.step is not None and not self.run.bypass and self.run.plan.is_key(cur.step)
                self.counts.key += key
                self.counts.fresh += not key
            return original(*args, **kwargs)
        slot = (cur.slot, id(module))
        if mode == "capture":                      # a key step: run and keep
            out = original(*args, **kwargs)
            entries = self.kept.get(slot)
            if entries is None or entries[0].key != cur.step:
                entries = self.kept[slot] = []
            if isinstance(out, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in out):
                x = kwargs.get("x")
                entries.append(Kept(cur.step, tuple(x.shape) if isinstance(x, torch.Tensor) else (),
                                    {k: v for k, v in kwargs.items() if k not in PER_STEP}, list(out)))
            self.counts.key += 1
            return out
        key = self.run.plan.group_of(cur.step)[0]     # a non-key step on its group's features
        for k in self.kept.get(slot, ()):
            if k.key == key and id(k) not in cur.used and k.serves(kwargs):
                cur.used.add(id(k))
                self.counts.reused += 1
                return list(k.out)
        self.counts.fresh += 1
        return original(*args, **kwargs)

    def summary(self) -> str:
        c = self.counts
        text = (f"FasterDiffusion: ControlNet ({len(self.units)} unit{'s' if len(self.units) != 1 else ''}) ran "
                f"{c.key + c.fresh}x and was reused {c.reused}x (controlnet_reuse)")
        if c.fresh:
            text += f"; {c.fresh} of its runs were outside key steps (full calls or changed inputs)"
        return text
