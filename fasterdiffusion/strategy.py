"""Key-step strategies: parse a user string, place key steps on an N-step schedule, group the steps.

A *key* step runs the whole UNet and refreshes the encoder cache; the non-key steps after it, up to
the next key step, form its *group* and run only the decoder on the cached features.
Indices are 0-based positions in the sampler's schedule; step 0 is always a key step.
"""
from __future__ import annotations

from dataclasses import dataclass

# The paper's default (utils_sd.py "50ls"): paper notation {50,49,48,47,45,40,35,25,15}.
PAPER_KEYS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)

GRAMMAR = """strategy grammar:
  paper        the paper's key steps 0,1,2,3,5,10,15,25,35 for 50 steps; for fewer steps the list is
               cut at the step count (the paper's own 20-step set), for more it is stretched by N/50
               with steps 0-3 kept
  uniform:K    every K-th step is a key step (0, K, 2K, ...); K >= 1; uniform:4 suits community models
  all          every step is a key step: exactly the unpatched model
  0,1,2,3,5,10 an explicit list of 0-based key steps; must contain 0; steps past the run's end are ignored"""


class StrategyError(ValueError):
    """A strategy string that cannot be parsed; the message names the problem and shows the grammar."""

    def __init__(self, text: str, problem: str):
        super().__init__(f"invalid FasterDiffusion strategy {text!r}: {problem}\n{GRAMMAR}")
        self.problem = problem


@dataclass(frozen=True)
class Strategy:
    kind: str                      # "paper" | "uniform" | "all" | "list"
    every: int = 1                 # uniform:K
    steps: tuple[int, ...] = ()    # explicit list

    def __str__(self) -> str:
        if self.kind == "uniform":
            return f"uniform:{self.every}"
        if self.kind == "list":
            return ",".join(map(str, self.steps))
        return self.kind


def parse_strategy(text: str) -> Strategy:
    if not isinstance(text, str):
        raise StrategyError(repr(text), "expected a string")
    s = text.strip().lower()
    if s in ("paper", "all"):
        return Strategy(s)
    if s.startswith("uniform"):
        _, sep, arg = s.partition(":")
        if not sep or not arg.strip().isdigit():
            raise StrategyError(text, "uniform needs a whole number, e.g. uniform:4")
        k = int(arg)
        if k < 1:
            raise StrategyError(text, "uniform:K needs K >= 1")
        return Strategy("uniform", every=k)
    parts = [p.strip() for p in s.replace(";", ",").split(",")]
    if not s or not all(p.isdigit() for p in parts):
        bad = next((p for p in parts if not p.isdigit()), s)
        raise StrategyError(text, f"{bad!r} is neither a known name nor a step index")
    steps = sorted(set(int(p) for p in parts))
    if steps[0] != 0:
        raise StrategyError(text, "step 0 must be a key step: nothing is cached before it")
    return Strategy("list", steps=tuple(steps))


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
    bounds = keys + [num_steps]
    groups = tuple(tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]))
    ignored = tuple(k for k in strategy.steps if k >= num_steps)
    return Plan(str(strategy), num_steps, tuple(keys), groups, ignored)


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
