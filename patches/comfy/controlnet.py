"""ControlNet at non-key steps: reuse the key step's residuals instead of running the ControlNet again.

ComfyUI computes a cond batch's ControlNet residuals in ``_calc_cond_batch`` (``control.get_control``)
just before the model call.  With ``controlnet_reuse`` a CALC_COND_BATCH wrapper (in one run's options
only) gives ``_calc_cond_batch`` shallow copies of the conds in which each ControlNet chain is replaced
by a per-run ``ReusedControl``.  Its ``get_control`` runs nothing: it returns a ``DeferredControl`` (the
arguments), and the DIFFUSION_MODEL wrapper lets the Run decide what the call needs:
  * a call run in full, or a key step: the residuals, computed now (every active ControlNet of the
    chain on its own per-run copy, summed in ComfyUI's order: equal to the host's);
  * a key step also keeps each ControlNet's own residuals with its encoder features;
  * a non-key step: its decoder gets the sum of the key step's residuals of the ControlNets active at
    *this* step; no ControlNet runs, and the group's decoders batch again.

Exactness.  ``control_merge`` scales what it returns by the control's ``strength``, a constant of a
ComfyUI control object, so the kept residuals carry the right strength at every step of the group.
start/end percent are applied per step: a ControlNet that has ended drops out of the sum.  One that
starts inside a group has no residuals at the group's key step: the step where it starts is made a
key step (one log line).  Chains with control classes other than ComfyUI's ControlNet, ControlLora and
T2IAdapter (packs with per-step keyframes or masks subclass them) are not reused: their residuals are
computed fresh every step, as with reuse off.  Nothing shared is changed: the conds and the control
objects of the host are only read.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

import comfy.controlnet

log = logging.getLogger("FasterDiffusion")

CONTROL_KEY = "faster_diffusion_controlnet"    # transformer_options key of one run's ControlReuse
SERVED = (comfy.controlnet.ControlNet, comfy.controlnet.ControlLora, comfy.controlnet.T2IAdapter)
PARTS = ("input", "middle", "output")


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    reuse = model_options.get("transformer_options", {}).get(CONTROL_KEY)
    if reuse is not None:
        conds = reuse.swap(conds)
    return executor(model, conds, x_in, timestep, model_options)


class ControlReuse:
    """One run's stand-ins: one ``ReusedControl`` per ControlNet chain the run's conds carry."""

    def __init__(self, run):
        self.run = run
        self.stand_ins: dict = {}     # id(chain head) -> (head, ReusedControl or None = not served)

    def swap(self, conds):
        """``conds`` with each served chain replaced by its stand-in (new lists and dicts where changed)."""
        out = []
        for cond in conds:
            if cond is not None:
                cond = [self._swap_one(c) for c in cond]
            out.append(cond)
        return out

    def _swap_one(self, c):
        head = c.get("control")
        stand_in = None if head is None or isinstance(head, ReusedControl) else self.stand_in(head)
        return c if stand_in is None else dict(c, control=stand_in)

    def stand_in(self, head):
        entry = self.stand_ins.get(id(head))
        if entry is None:
            entry = self.stand_ins[id(head)] = (head, self._make(head))
        return entry[1]

    def _make(self, head):
        chain = []
        while head is not None:
            chain.append(head)
            head = head.previous_controlnet
        odd = sorted({type(m).__name__ for m in chain if type(m) not in SERVED})
        if odd:
            log.warning("FasterDiffusion: ControlNet reuse does not serve %s; this chain's residuals are computed "
                        "at every step and its groups' decoders run one step at a time", ", ".join(odd))
            return None
        members = [own_copy(m) for m in reversed(chain)]     # the tail first: ComfyUI sums in that order
        self._keys_where_controls_start(members)
        return ReusedControl(chain[0], members)

    def _keys_where_controls_start(self, members):
        """A ControlNet off at a group's key step but on at a later step of the group: that step becomes a key."""
        run = self.run
        if run.bypass:
            return
        late, on_at_key = [], set()
        for s in range(run.plan.num_steps):
            on = {i for i, m in enumerate(members) if is_active(m, schedule_t(run, s))}
            if run.plan.is_key(s):
                on_at_key = on
            elif not on <= on_at_key:
                late.append(s)
                on_at_key = on
        if run.add_keys(late):
            log.info("FasterDiffusion: a ControlNet starts inside a group (its start_percent); steps %s run as key "
                     "steps, so that every step gets residuals of its own ControlNets", late)


def schedule_t(run, step) -> torch.Tensor:
    """The ``t`` ComfyUI passes to get_control at ``step`` (its sigma, float32) for the activity test."""
    return torch.tensor([run.sigmas[step]], dtype=torch.float32)


def is_active(member, t) -> bool:
    """ComfyUI's own start/end test in get_control (``timestep_range`` is set by pre_run)."""
    r = member.timestep_range
    return r is None or not bool(t[0] > r[0] or t[0] < r[1])


def own_copy(member):
    """A per-run copy of one link of a chain, cut from the rest: its get_control returns its own residuals.
    A shallow copy: it shares the weights and the pre_run state, and caches its hint image on itself."""
    c = copy.copy(member)
    c.previous_controlnet = None
    return c


class ReusedControl:
    """What ``_calc_cond_batch`` sees as the cond's control during one run: it defers the work."""

    def __init__(self, head, members):
        self.head, self.members = head, members

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):
        return DeferredControl(self.members, x_noisy, t, cond, batched_number, transformer_options)

    def __getattr__(self, name):      # anything else a host or pack reads is the original chain's
        if name in ("head", "members"):
            raise AttributeError(name)
        return getattr(self.head, name)


@dataclass
class DeferredControl:
    """The arguments of one get_control call; the residuals are computed only if the Run needs them."""
    members: list
    x: torch.Tensor
    t: torch.Tensor
    cond: dict
    batched_number: int
    transformer_options: dict | None

    def own_residuals(self) -> list:
        """[(member, its own residuals)] of the members active at this call, the tail first."""
        out = []
        for m in self.members:
            r = m.get_control(self.x, self.t, self.cond, self.batched_number, self.transformer_options)
            if r is not None:
                out.append((m, r))
        return out

    def fresh(self):
        """The residuals ComfyUI's chain would return for this call."""
        return merge_chain([r for _, r in self.own_residuals()])


@dataclass
class StepsControl:
    """The control of a decoder call batched over several steps: each step's ``t``, step-major, and the
    rows of one step (a residual of one row, e.g. a T2I-Adapter's, broadcasts over them as in the host)."""
    deferred: DeferredControl
    step_ts: list
    rows: int


def fresh(control):
    """A real control dict for the host's forward (computing deferred residuals now)."""
    return control.fresh() if isinstance(control, DeferredControl) else control


def is_reused(control) -> bool:
    return isinstance(control, (DeferredControl, StepsControl))


def reused_decoder_control(control, kept: list | None):
    """The decoder-side residuals of a non-key (or key) call from the key step's ``kept`` residuals."""
    kept = kept or []
    if isinstance(control, DeferredControl):
        return _at(control, control.t, kept)
    per_step = [_at(control.deferred, t, kept) for t in control.step_ts]
    return stack_steps(per_step, control.rows)


def _at(deferred: DeferredControl, t, kept):
    kept_members = [m for m, _ in kept]
    missing = [m for m in deferred.members if is_active(m, t) and not any(m is k for k in kept_members)]
    if missing:   # prevented by the late keys; never serve a step without its own ControlNets
        raise RuntimeError(f"FasterDiffusion: a ControlNet ({type(missing[0]).__name__}) is active at sigma "
                           f"{float(t[0]):.4g} but was not at its group's key step; set controlnet_reuse off and "
                           f"report this")
    return merge_chain([decoder_side(r) for m, r in kept if is_active(m, t)])


def decoder_side(r: dict) -> dict:
    return {"input": [], "middle": list(r.get("middle", [])), "output": list(r.get("output", []))}


def merge_chain(residuals: list):
    """Sum the own residuals of a chain's links (tail first) exactly as ``ControlBase.control_merge``
    adds ``control_prev``; None if no link contributes."""
    acc = None
    for r in residuals:
        acc = {k: list(r.get(k, [])) for k in PARTS} if acc is None else _add_prev(r, acc)
    return acc


def _add_prev(own: dict, prev: dict) -> dict:
    out = {k: list(own.get(k, [])) for k in PARTS}
    for k in PARTS:
        o = out[k]
        for i, p in enumerate(prev[k]):
            if i >= len(o):
                o.append(p)
            elif p is not None:
                o[i] = p if o[i] is None else p + o[i]
    return out


def stack_steps(per_step: list, rows: int):
    """Per-step decoder residuals (``rows`` each, after broadcasting) stacked step-major on the batch dim,
    zeros where a step has none."""
    if all(d is None for d in per_step):
        return None
    out = {"input": [], "middle": [], "output": []}
    for k in ("middle", "output"):
        for i in range(max(len(d[k]) if d else 0 for d in per_step)):
            ts = [d[k][i] if d and i < len(d[k]) else None for d in per_step]
            ref = next((x for x in ts if x is not None), None)
            if ref is None:
                out[k].append(None)
                continue
            shape = (rows, *ref.shape[1:])
            out[k].append(torch.cat([ref.new_zeros(shape) if x is None else x.expand(shape) for x in ts]))
    return out
