"""The method, once for every host: one sampling run's state and the decision for each UNet call.

A host hooks its UNet call, finds which schedule step the call belongs to, and hands the call to
``Run.forward`` together with an adapter for its UNet class (``UNetAdapter``) and a thunk that runs the
host's unchanged forward.  The run decides (``Outcome``) and returns the UNet output:

  FULL         the host's forward, untouched (a key step alone in its group that no forecast needs, a
               bypassed run)
  OFF_SCHEDULE an evaluation between schedule points (DPM2, SDE midpoints): the host's forward
  KEY          a key step: one encoder pass; its features serve the whole group, and with ``parallel``
               the decoders of every step of the group run now, as one batch (split under the cap)
  SERVED       a non-key step whose output was precomputed in its key step's batch
  DECODE       a non-key step: the decoder alone on the group's cached features
  NO_FEATURES  a non-key step with no features of its own call slot in this group: the host's forward

Features are cached per *call slot*: what the host says distinguishes calls with different features
(cond chunks, order, shape, per-call patches) plus the call's occurrence within one sampler evaluation,
so an extra guidance call (PAG's perturbed pass, SAG's degraded pass) never shares the regular call's
features.  What a non-key step's decoder gets is the run's ``propagation``: the group key step's features
(``reuse``, the paper's), or their extrapolation from the slot's last key steps (``forecast``, see
``forecast.py``); either way only key-step features, so a group's decoders still batch.  Nothing here
imports a host.
"""
from __future__ import annotations

import copy
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

import torch

from .distributed import split_decode, world_of
from .forecast import REUSE, extrapolate_steps
from .schedule import match_step
from .settings import Settings
from .strategy import Plan, make_plan

log = logging.getLogger("FasterDiffusion")


class Outcome(enum.Enum):
    FULL = "full"
    OFF_SCHEDULE = "off_schedule"
    KEY = "key"
    SERVED = "served"
    DECODE = "decode"
    NO_FEATURES = "no_features"


@dataclass
class Features:
    """One key step's encoder output: the skip tensors (in encoder order) and the bottleneck output.
    ``meta`` is the adapter's own (e.g. ComfyUI's transformer_index)."""
    skips: list
    mid: torch.Tensor
    meta: Any = None

    def tile(self, n: int) -> "Features":
        """The same features for ``n`` steps' rows stacked step-major on the batch dim."""
        if n == 1:
            return self
        return Features([repeat_rows(t, n) for t in self.skips], repeat_rows(self.mid, n), self.meta)


def repeat_rows(t, n: int):
    """``n`` copies of a per-call tensor stacked step-major on the batch dim (None stays None): what every
    adapter's ``tile`` does to the call's conditioning."""
    if t is None or n == 1:
        return t
    return torch.cat([t] * n)


@dataclass
class ModelCall:
    """One UNet evaluation as the runtime sees it.  ``timesteps``/``sigmas`` are per row; ``sigmas`` may
    be None for hosts that do not track them; ``host`` is the adapter's own payload (conditioning extras,
    options, ControlNet residuals)."""
    x: torch.Tensor | None
    timesteps: torch.Tensor
    context: torch.Tensor | None
    sigmas: torch.Tensor | None
    dtype: torch.dtype
    slot: Hashable = ()
    host: Any = None

    @property
    def rows(self) -> int:
        return int(self.timesteps.shape[0])


class UNetAdapter(Protocol):
    """What the runtime needs from a UNet family.  ``decode`` must never read ``call.x``."""

    def embed(self, call: ModelCall) -> torch.Tensor:
        """The timestep embedding (+ class/ADM/added conditioning) every decoder step needs anew."""

    def encode(self, call: ModelCall, emb: torch.Tensor) -> Features:
        """conv_in + down blocks + middle block on ``call.x``."""

    def decode(self, call: ModelCall, features: Features, emb: torch.Tensor) -> torch.Tensor:
        """Up blocks + output head on ``features`` (with this call's own decoder-side control)."""

    def tile(self, call: ModelCall, n: int, timesteps: torch.Tensor, sigmas: torch.Tensor | None) -> ModelCall:
        """A decoder-only call for ``n`` steps' rows stacked step-major: conditioning repeated ``n`` times,
        per-row ``timesteps``/``sigmas`` as given, ``x`` None, no ControlNet residuals."""

    def own_step_reason(self, call: ModelCall) -> str | None:
        """Why this call's decoder must run on the step's own call, never batched with other steps (it carries
        residuals of its own step for the decoder side, ControlNet middle/output; or a patch there reads the
        latent), or None."""


@dataclass
class RunStats:
    steps: int
    strategy: str
    keys: list
    parallel: bool
    full_calls: int = 0           # host forward: keys alone in their group, and every bypassed call
    encoder_calls: int = 0        # key steps whose encoder served a group
    cached_calls: int = 0         # non-key calls served from a group's features
    off_schedule_calls: int = 0   # evaluations between schedule points (counted in full_calls too)
    fallback_calls: int = 0       # non-key calls without features of their call slot (also full)
    decoder_batches: list = field(default_factory=list)   # steps per decoder call of each key step
    ignored_steps: list = field(default_factory=list)
    parallel_off: str | None = None
    bypassed: str | None = None
    injected_steps: list | None = None
    late_keys: list | None = None    # steps made key steps during the run (a ControlNet starting there)
    propagation: str = "reuse"       # "reuse", or "forecast (order N)": what non-key decoders got
    forecast_off: str | None = None  # why a forecast setting ran as reuse
    split: str | None = None         # "rank R of N": a group's decoders split across a process group's ranks
    devices: list | None = None      # the devices that each kept their own caches (ComfyUI's MultiGPU CFG split)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        return d


COUNTERS = ("full_calls", "encoder_calls", "cached_calls", "off_schedule_calls", "fallback_calls")


class Run:
    """Everything one sampling run caches: made fresh per run, dropped by ``finish``; every host's lifecycle is
    ``Run(...)`` (which warns once about strategy steps past the run's end), the sampler with ``RunModel`` and the
    UNet hook, then ``close`` (stats kept, said in one line).

    ``sigmas``: the run's schedule (steps + 1 entries, the last usually 0), used to place a call on its
    step and for per-row bookkeeping of batched calls; ``timesteps``: the model timestep of each step.
    ``bypass``: why this run must compute every call in full (an unserved sampler or model), or None.
    ``process_group``: a ``torch.distributed`` process group whose ranks all run this same generation and split each
    group's decoder steps between them (``distributed.py``); None: one process.
    """

    def __init__(self, settings: Settings, sigmas: Sequence[float], timesteps, bypass: str | None = None,
                 forecast_off: str | None = None, process_group=None):
        self.settings = settings
        self.process_group = process_group
        self.sigmas = [float(s) for s in sigmas]
        if not self.sigmas:
            raise ValueError("FasterDiffusion: a sampling run needs a schedule of at least one sigma")
        self.plan: Plan = make_plan(settings.strategy, len(self.sigmas) - 1)
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
        self.bypass = bypass
        self.stats = RunStats(self.plan.num_steps, self.plan.strategy, list(self.plan.keys), settings.parallel,
                              ignored_steps=list(self.plan.ignored), bypassed=bypass)
        if self.plan.ignored:
            log.warning("FasterDiffusion: strategy %s lists steps %s but this run has %d steps; they are ignored",
                        self.plan.strategy, list(self.plan.ignored), self.plan.num_steps)
        # ``forecast_off``: why this run's sampler or schedule is one where forecasting hurts (measured)
        self.forecast = REUSE if forecast_off else settings.forecast
        if settings.forecast.order > 0:
            self.stats.forecast_off = forecast_off
        if self.forecast.order > 0:
            self.stats.propagation = f"forecast (order {self.forecast.order})"
        rank, world = world_of(process_group)
        if world > 1:
            self.stats.split = f"rank {rank} of {world}"
        self.groups: dict = {}        # call slot -> the group its newest key features (history[slot][-1]) serve
        self.history: dict = {}       # call slot -> [(key step, Features)], oldest first: its last key steps
        self.outputs: dict = {}       # (call slot, step) -> decoder output precomputed in a group batch
        self._seen: dict = {}         # call slot -> calls so far in the current sampler evaluation
        self._devices: dict = {}      # device -> its own Run (for_device)
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def for_device(self, device) -> "Run":
        """This run's own state on one ``device`` of a host that runs one sampler evaluation's calls on several
        devices at once, in threads (ComfyUI's MultiGPU CFG split, whose cond chunks may move between devices from
        step to step): the same settings, schedule and plan, but its own caches and counters, so no device is served
        features another computed; ``begin_evaluation`` and ``add_keys`` reach every device's run, and ``finish``
        adds their stats into this run's one report."""
        with self._lock:
            run = self._devices.get(device)
            if run is None:
                run = copy.copy(self)
                run.groups, run.history, run.outputs, run._seen, run._devices = {}, {}, {}, {}, {}
                run._lock = threading.Lock()
                run.stats = copy.deepcopy(self.stats)
                for name in COUNTERS:
                    setattr(run.stats, name, 0)
                run.stats.decoder_batches = []
                self._devices[device] = run
            return run

    # ------------------------------------------------------------------------------ placing a call

    def step_of(self, sigma: float) -> int | None:
        """The schedule step of an evaluation at ``sigma``; None between schedule points."""
        if self.plan.num_steps == 0:
            return None
        return match_step(self.sigmas, sigma)

    def begin_evaluation(self):
        """The host's sampler starts a new model evaluation: calls of the same slot after this are a new
        occurrence 0 (a second call of one slot inside one evaluation is a guidance pass of its own)."""
        self._seen.clear()
        for run in list(self._devices.values()):
            run.begin_evaluation()

    def slot_of(self, call: ModelCall) -> tuple:
        n = self._seen.get(call.slot, 0)
        self._seen[call.slot] = n + 1
        return (call.slot, n)

    def add_keys(self, steps) -> list:
        """Make ``steps`` key steps as well (a host input, e.g. a ControlNet that starts there, needs the
        encoder at that step); returns those that were not keys yet.  Safe for steps not reached yet: a
        group that lost steps to a new key never serves them (the features' group no longer matches)."""
        new = sorted(set(s for s in steps if 0 <= s < self.plan.num_steps) - set(self.plan.keys))
        if new:
            self.plan = self.plan.with_keys(new)
            self.stats.keys = list(self.plan.keys)
            self.stats.late_keys = sorted(set(self.stats.late_keys or ()) | set(new))
        for run in list(self._devices.values()):
            run.add_keys(steps)
        return new

    def decide(self, step: int | None, slot) -> Outcome:
        if self.bypass:
            return Outcome.FULL
        if step is None:
            return Outcome.OFF_SCHEDULE
        group = self.plan.group_of(step)
        if step == group[0]:
            return Outcome.KEY if len(group) > 1 or self._forecast_needs(step) else Outcome.FULL
        if self.groups.get(slot) != group:
            return Outcome.NO_FEATURES
        return Outcome.SERVED if (slot, step) in self.outputs else Outcome.DECODE

    # ------------------------------------------------------------------------------ serving a call

    def forward(self, adapter: UNetAdapter, call: ModelCall, step: int | None, full: Callable[[], torch.Tensor]):
        """The UNet output for ``call`` at schedule ``step`` (None: off the schedule)."""
        if call.rows == 0:            # nothing to compute; let the host say what it thinks of that
            return full()
        slot = self.slot_of(call)
        outcome = self.decide(step, slot)
        s = self.stats
        if outcome in (Outcome.FULL, Outcome.OFF_SCHEDULE, Outcome.NO_FEATURES):
            s.full_calls += 1
            s.off_schedule_calls += outcome is Outcome.OFF_SCHEDULE
            s.fallback_calls += outcome is Outcome.NO_FEATURES
            return full()
        if outcome is Outcome.KEY:
            return self._key_step(adapter, call, step, slot)
        s.cached_calls += 1
        if outcome is Outcome.SERVED:
            reason = adapter.own_step_reason(call)
            if reason is None:
                return self.outputs[(slot, step)]
            # e.g. a ControlNet became active inside a batched group: this step needs its own residuals
            self._parallel_off(f"{reason}: its steps' decoders ran one at a time")
        return adapter.decode(call, self.features_at(slot, [step]), adapter.embed(call))

    def features_at(self, slot, steps) -> Features:
        """What the decoders of ``steps`` of the slot's current group get, stacked step-major: the group's key
        features (reuse), or their forecast (the key step's own weights are all 0: its fresh features)."""
        return extrapolate_steps(self.forecast, self.history[slot], list(steps), self.timesteps, self.sigmas)

    def _forecast_needs(self, key: int) -> bool:
        """Whether a key step alone in its group must keep its features: a later group forecasts from them.
        (Its encoder and decoder then run apart, which equals the host's forward.)"""
        return self.forecast.order > 0 and any(len(g) > 1 and g[0] > key for g in self.plan.groups)

    def _remember(self, slot, step: int, feats: Features):
        """Keep ``feats`` as ``slot``'s newest key features (a repeated evaluation of one key step, e.g.
        Heun's, replaces the older; only as many as the forecast order needs are kept)."""
        kept = [(k, f) for k, f in self.history.get(slot, ()) if k < step]
        self.history[slot] = (kept + [(step, feats)])[-(self.forecast.order + 1):]

    def _key_step(self, adapter, call, step, slot):
        group = self.plan.group_of(step)
        self.stats.encoder_calls += 1
        emb = adapter.embed(call)
        feats = adapter.encode(call, emb)
        self.groups[slot] = group
        self._remember(slot, step, feats)
        for k in [k for k in self.outputs if k[0] == slot]:
            del self.outputs[k]
        own_step = adapter.own_step_reason(call) if self.settings.parallel and len(group) > 1 else None
        if not self.settings.parallel or len(group) == 1 or own_step:
            if own_step:
                self._parallel_off(f"{own_step}: decoders ran one step at a time")
            self.stats.decoder_batches.append(1)
            return adapter.decode(call, feats, emb)
        outs, widths = decode_steps(adapter, call, lambda start, n: self.features_at(slot, group[start:start + n]),
                                    self.rows_for(call, group), self.settings.max_decoder_batch, self.process_group)
        self.stats.decoder_batches.extend(widths)
        for s, out in zip(group[1:], outs[1:]):
            self.outputs[(slot, s)] = out
        return outs[0]

    def rows_for(self, call: ModelCall, group) -> list:
        """Per-row (timesteps, sigmas) of each step of ``group``: the key step's own, then the schedule's."""
        rows = [(call.timesteps, call.sigmas)]
        for s in group[1:]:
            t = self.timesteps[s].to(call.timesteps).expand_as(call.timesteps)
            sig = None if call.sigmas is None else torch.full_like(call.sigmas, self.sigmas[s])
            rows.append((t, sig))
        return rows

    def _parallel_off(self, reason):
        if self.stats.parallel_off is None:
            self.stats.parallel_off = reason

    # ------------------------------------------------------------------------------ the end

    def drop_caches(self):
        """Forget every kept feature and precomputed output (the run's end, or a host that stops serving it)."""
        self.groups.clear()
        self.history.clear()
        self.outputs.clear()
        for run in self._devices.values():
            run.drop_caches()

    def finish(self) -> dict:
        """Drop the caches and return the run's stats (each device's run's added in)."""
        self.drop_caches()
        s = self.stats
        for _, run in sorted(self._devices.items(), key=lambda item: str(item[0])):    # device order, not thread order
            t = run.stats
            for name in COUNTERS:
                setattr(s, name, getattr(s, name) + getattr(t, name))
            s.decoder_batches.extend(t.decoder_batches)
            s.parallel_off = s.parallel_off or t.parallel_off
            s.bypassed = s.bypassed or t.bypassed
        if self._devices:
            s.devices = sorted(str(d) for d in self._devices)
        self.stats.seconds = round(time.perf_counter() - self._t0, 3)
        return self.stats.as_dict()

    def close(self, reports: list, say: Callable[[str, bool], None] | None = None) -> dict:
        """The end of a run on every host: ``finish``, the stats kept in ``reports`` and said in one line (``say(text,
        warn)``, a warning where the run was bypassed; the log by default).  Returns the stats."""
        report = self.finish()
        reports.append(report)
        (say or log_line)(format_report(report), bool(report.get("bypassed")))
        return report

    def count_full_call(self):
        """A call the host ran in full without asking (a bypassed run's, counted outside the UNet)."""
        self.stats.full_calls += 1

    def full_call(self, reason: str):
        """A call the host runs in full for ``reason``, found at the call, that rules the whole run out (the same at
        every call): counted, and the stats say why, as for a run bypassed from its start."""
        self.stats.full_calls += 1
        self.stats.bypassed = self.stats.bypassed or reason


def log_line(text: str, warn: bool):
    (log.warning if warn else log.info)(text)


class RunModel:
    """The k-diffusion model function of one run, on every k-diffusion host (ComfyUI's sampler nodes, A1111's and
    Forge's CFGDenoiser): marks where each sampler evaluation starts, tells ``on_step`` which schedule step it is
    on (None between schedule points), and injects prior noise into the sampler's own latent after each call
    (``injector``); every other attribute (``inner_model`` and so on, which samplers read) passes through."""

    def __init__(self, model, run: Run, injector=None, on_step: Callable[[int | None], None] | None = None):
        self._model, self._run, self._injector, self._on_step = model, run, injector, on_step

    def __call__(self, x, sigma, *args, **kwargs):
        self._run.begin_evaluation()
        sigmas = sigma if isinstance(sigma, torch.Tensor) else torch.tensor([float(sigma)])
        if self._on_step is not None:
            self._on_step(self._run.step_of(float(sigmas.flatten()[0])))
        out = self._model(x, sigma, *args, **kwargs)
        return out if self._injector is None else self._injector.after_call(x, sigmas, out)

    def __getattr__(self, name):
        return getattr(self._model, name)


def decode_steps(adapter: UNetAdapter, call: ModelCall, feats, rows: list, max_decoder_batch: int, process_group=None):
    """Decoder outputs of several steps on one set of features (``Features``) or on each step's own
    (``feats(start, n)`` gives entries start..start+n-1 of ``rows`` stacked), in as few batched calls as
    ``max_decoder_batch`` (0 = no cap) allows; returns (outputs, steps per call).  Rows are independent: sub-batching
    is exact.  With a ``process_group`` of several ranks each rank decodes its share of the steps and every rank gets
    every output (``distributed.split_decode``); the widths are then this rank's calls."""
    stacked = feats if callable(feats) else (lambda start, n: feats.tile(n))
    b = call.rows
    per_call = len(rows) if max_decoder_batch <= 0 else max(1, max_decoder_batch // b)

    def decode(first: int, count: int):
        outs, widths = [], []
        for start in range(first, first + count, per_call):
            chunk = rows[start:min(start + per_call, first + count)]
            n = len(chunk)
            sig = None if chunk[0][1] is None else torch.cat([s for _, s in chunk])
            big = adapter.tile(call, n, torch.cat([t for t, _ in chunk]), sig)
            out = adapter.decode(big, stacked(start, n), adapter.embed(big))
            outs.extend(out.chunk(n))
            widths.append(n)
        return outs, widths

    if world_of(process_group)[1] == 1:
        return decode(0, len(rows))
    return split_decode(decode, len(rows), process_group, [call.x, call.context, call.timesteps])


def format_report(r: dict) -> str:
    """The one stats line a run logs and shows."""
    if r.get("bypassed"):
        return f"FasterDiffusion [{r['strategy']}]: {r['steps']} steps; {r['bypassed']}"
    batches = r["decoder_batches"]
    text = (f"FasterDiffusion [{r['strategy']}]: {r['steps']} steps, encoder ran {r['encoder_calls'] + r['full_calls']}x "
            f"and was skipped {r['cached_calls']}x (model calls); "
            f"decoder batches {batches if len(batches) <= 12 else str(batches[:12])[:-1] + ', ...]'}; {r['seconds']:.2f}s")
    if r["off_schedule_calls"]:
        text += f"; {r['off_schedule_calls']} off-schedule calls ran in full"
    if r["fallback_calls"]:
        text += f"; {r['fallback_calls']} calls without cached features ran in full"
    if r.get("late_keys"):
        text += f"; steps {r['late_keys']} made key steps (a ControlNet starts there)"
    if r.get("propagation", "reuse") != "reuse":
        text += f"; {r['propagation']}"
    if r.get("forecast_off"):
        text += f"; {r['forecast_off']}"
    if r.get("parallel_off"):
        text += f"; {r['parallel_off']}"
    if r.get("devices"):
        text += f"; MultiGPU: each of {len(r['devices'])} devices kept its own caches"
    if r.get("split"):
        text += f"; decoders split across ranks ({r['split']}; batches are this rank's)"
    return text
