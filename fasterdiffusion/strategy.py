"""Key-step strategies: parse a user string, place key steps on an N-step schedule, group the steps.

A *key* step runs the whole UNet and refreshes the encoder cache; the non-key steps after it, up to
the next key step, form its *group* and run only the decoder on the cached features.
Indices are 0-based positions in the sampler's schedule; step 0 is always a key step.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, replace

# The paper's default (utils_sd.py "50ls"): paper notation {50,49,48,47,45,40,35,25,15}.
PAPER_KEYS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)

# DeepFloyd-IF's per-stage rules in the official code (utils_if.py), as (native step count, key list there).
# Where paper and code disagree (stage II: the paper keeps all 50 steps) the code's rule is taken.
IF_PRESETS = {
    # stage I, 100 DDPM steps ("100ls"): the first 10 and the last 14 steps and every 5th one between
    "if1": (100, tuple(i for i in range(100) if i < 10 or i > 85 or i % 5 == 0)),
    # stage II, 50 steps (register_if2): the first 20 and the last 9 steps and the even ones between
    "if2": (50, tuple(i for i in range(50) if i < 20 or i > 40 or i % 2 == 0)),
    # stage III, the x4 upscaler at 75 steps ("pro"): the i with 9 + 8i a perfect square; the paper's own set
    "if3": (75, (0, 2, 5, 9, 14, 20, 27, 35, 44, 54, 65)),
}

GRAMMAR = """strategy grammar:
  paper        the paper's key steps 0,1,2,3,5,10,15,25,35 for 50 steps; for fewer steps the list is
               cut at the step count (the paper's own 20-step set), for more it is stretched by N/50
               with steps 0-3 kept
  uniform:K    every K-th step is a key step (0, K, 2K, ...); K >= 1; uniform:4 suits community models
  if1          DeepFloyd-IF stage I, the official code's rule at 100 steps: steps 0-9, 86-99 and every 5th
  if2          IF stage II, the official code's rule at 50 steps: steps 0-19, 41-49 and the even ones
  if3          IF stage III (x4 upscaler) at 75 steps: 0,2,5,9,14,20,27,35,44,54,65
               (the IF presets at other step counts: each key k of the native count M moves to
               round(k*N/M), the same place in the run, so keys that meet merge)
  all          every step is a key step: exactly the unpatched model
  0,1,2,3,5,10 an explicit list of 0-based key steps; must contain 0; steps past the run's end are ignored
numbers are written with the digits 0-9 and go up to 100000"""


MAX_STEP = 100_000     # no sampler runs this many steps: a larger index or K is a typo, refused
ECHO_CHARS = 60        # error messages quote at most this much of the input
_SPACE = " \t\n\r\f\v"  # ASCII whitespace only: the editor's JavaScript must read every string the same way
_UNIFORM = re.compile(r"uniform[ \t\n\r\f\v]*:[ \t\n\r\f\v]*([0-9]+)")
_INDEX = re.compile(r"[0-9]+")
_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def shorten(text: str) -> str:
    """``text`` cut to ECHO_CHARS characters (with an ellipsis), for quoting in a message."""
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"


class StrategyError(ValueError):
    """A strategy string that cannot be parsed; the message names the problem and shows the grammar."""

    def __init__(self, text: str, problem: str):
        super().__init__(f"invalid FasterDiffusion strategy {shorten(text)!r}: {problem}\n{GRAMMAR}")
        self.problem = problem


@dataclass(frozen=True)
class Strategy:
    kind: str                      # "paper" | "uniform" | "all" | "list" | an IF_PRESETS name
    every: int = 1                 # uniform:K
    steps: tuple[int, ...] = ()    # explicit list

    def __str__(self) -> str:
        if self.kind == "uniform":
            return f"uniform:{self.every}"
        if self.kind == "list":
            return ",".join(map(str, self.steps))
        return self.kind


def parse_strategy(text: str) -> Strategy:
    """The Strategy a user string names (ASCII only: names, digits and whitespace); StrategyError if none."""
    if not isinstance(text, str):
        raise StrategyError(repr(text), "expected a string")
    s = text.strip(_SPACE).translate(_LOWER)
    if s in ("paper", "all", *IF_PRESETS):
        return Strategy(s)
    if s.startswith("uniform"):
        m = _UNIFORM.fullmatch(s)
        if not m:
            raise StrategyError(text, "uniform needs a whole number, e.g. uniform:4")
        k = _index(text, m.group(1), f"uniform:K needs K <= {MAX_STEP}")
        if k < 1:
            raise StrategyError(text, "uniform:K needs K >= 1")
        return Strategy("uniform", every=k)
    steps = set()
    for part in s.replace(";", ",").split(","):
        part = part.strip(_SPACE)
        if not _INDEX.fullmatch(part):
            raise StrategyError(text, f"'{shorten(part)}' is neither a known name nor a step index")
        steps.add(_index(text, part, f"step '{shorten(part)}' is beyond any real step count (at most {MAX_STEP})"))
    steps = sorted(steps)
    if steps[0] != 0:
        raise StrategyError(text, "step 0 must be a key step: nothing is cached before it")
    return Strategy("list", steps=tuple(steps))


def _index(text: str, digits: str, too_big: str) -> int:
    """ASCII ``digits`` as an int up to MAX_STEP; the length is checked before int() (no integer-string limit)."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(MAX_STEP)) or int(significant) > MAX_STEP:
        raise StrategyError(text, too_big)
    return int(significant)


def key_steps(strategy: Strategy, num_steps: int) -> list[int]:
    """The key steps of ``strategy`` on a schedule of ``num_steps`` model steps (sorted, starts at 0)."""
    if num_steps < 1:
        return []
    n = num_steps
    if strategy.kind == "all":
        keys = range(n)
    elif strategy.kind == "uniform":
        keys = range(0, n, strategy.every)
    elif strategy.kind == "list":
        keys = strategy.steps
    elif strategy.kind in IF_PRESETS:
        # Moved, not cut: a key sits where the features change fast, a place in the noise schedule, not a step
        # number (at twice the steps the dense runs become every other step and the count stays).
        native, native_keys = IF_PRESETS[strategy.kind]
        keys = {round(k * n / native) for k in native_keys}
    elif n <= 50:
        # The authors ran DPM-Solver 20 steps with the 50-step list cut at 20 ([0,1,2,3,5,10,15]).
        keys = PAPER_KEYS_50
    else:
        # Stretch to keep the same *fractions* of the schedule, and keep the dense start.
        keys = {round(k * n / 50) for k in PAPER_KEYS_50} | {0, 1, 2, 3}
    return sorted(k for k in set(keys) if k < n)


@dataclass(frozen=True)
class Plan:
    """Key steps and groups for one sampling run of ``num_steps`` steps."""
    strategy: str
    num_steps: int
    keys: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]   # each: (key, following non-key steps...)
    ignored: tuple[int, ...] = ()         # explicit steps past the end of this run

    def group_of(self, step: int) -> tuple[int, ...]:
        """The group (key step first) that contains ``step``."""
        for g in self.groups:
            if g[0] <= step <= g[-1]:
                return g
        raise IndexError(f"step {step} is outside a {self.num_steps}-step plan")

    def with_keys(self, extra) -> "Plan":
        """This plan with the steps ``extra`` (within the run) made key steps too."""
        keys = sorted(set(self.keys) | {k for k in extra if 0 <= k < self.num_steps})
        return replace(self, keys=tuple(keys), groups=_groups(keys, self.num_steps))

    def is_key(self, step: int) -> bool:
        return step in self.keys

    @property
    def group_sizes(self) -> list[int]:
        return [len(g) for g in self.groups]

    def describe(self) -> str:
        return (f"{self.strategy}: {len(self.keys)} of {self.num_steps} steps run the encoder "
                f"(keys {list(self.keys)}), groups {self.group_sizes}")


def make_plan(strategy: Strategy | str, num_steps: int) -> Plan:
    if isinstance(strategy, str):
        strategy = parse_strategy(strategy)
    keys = key_steps(strategy, num_steps)
    ignored = tuple(k for k in strategy.steps if k >= num_steps)
    return Plan(str(strategy), num_steps, tuple(keys), _groups(keys, num_steps), ignored)


def _groups(keys: list, num_steps: int) -> tuple:
    bounds = list(keys) + [num_steps]
    return tuple(tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]))


def predicted_cost_fraction(plan: Plan, encoder_share: float, parallel: bool = False,
                            batch_cost=None) -> float:
    """Expected UNet cost relative to running every step in full.

    ``encoder_share`` is the encoder+bottleneck fraction of one full forward (FLOPs or time).
    Sequential: key steps cost 1, non-key steps cost 1 - encoder_share.  Parallel: each group costs
    one encoder pass plus one decoder batch of its width, priced by ``batch_cost(width)`` (relative to
    one decoder call; default linear in width, i.e. the FLOP count: batching saves FLOPs on no device).
    """
    if plan.num_steps == 0:
        return 1.0
    dec = 1.0 - encoder_share
    if not parallel:
        k = len(plan.keys)
        return (k + (plan.num_steps - k) * dec) / plan.num_steps
    batch_cost = batch_cost or (lambda width: float(width))
    total = 0.0
    for g in plan.groups:
        total += 1.0 if len(g) == 1 else encoder_share + dec * batch_cost(len(g))
    return total / plan.num_steps


# GPU time of ComfyUI's SD1.5 UNet, eager fp16, 512x512, CFG, on an H100 (shared/docs/gpu.md): ms per call of
# the full UNet, of encoder+middle, and of one decoder batch holding w steps.  The editor's web/js/strategy.js
# holds the same numbers (GPU_MS; a test compares the two predictions).
SD15_GPU_MS = {"full": 34.6, "encoder": 14.5,
               "decoder": ((1, 19.3), (2, 20.0), (4, 23.6), (5, 26.1), (8, 34.6), (10, 41.1), (15, 58.1))}


def decoder_ms(width: int, pts=SD15_GPU_MS["decoder"]) -> float:
    """ms of one decoder batch of ``width`` steps from measured (width, ms) points (SD1.5's above by default):
    piecewise-linear between them, extended linearly past the widest."""
    for (w0, t0), (w1, t1) in zip(pts, pts[1:]):
        if width <= w1:
            return t0 + (t1 - t0) * (width - w0) / (w1 - w0)
    (wa, ta), (wb, tb) = pts[-2], pts[-1]
    return tb + (tb - ta) * (width - wb) / (wb - wa)


def predicted_gpu_fraction(plan: Plan) -> float:
    """GPU time of the plan with parallel decoders relative to every step in full, on the SD1.5 model above
    (a key step alone in its group runs in full; a group costs one encoder pass and one decoder batch)."""
    if plan.num_steps == 0:
        return 1.0
    ms = SD15_GPU_MS
    total = sum(ms["full"] if len(g) == 1 else ms["encoder"] + decoder_ms(len(g)) for g in plan.groups)
    return total / (plan.num_steps * ms["full"])
