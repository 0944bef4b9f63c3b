"""What the Compare node reports: PSNR, the equal-time plain step count, and an honest recommendation.

Host-free: the node (nodes/compare.py) measures times and images, this turns them into the text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def psnr(reference: torch.Tensor, image: torch.Tensor) -> float:
    """PSNR in dB of ``image`` against ``reference`` (both in [0, 1]); inf when they are identical."""
    mse = torch.mean((reference.double() - image.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def equal_time_steps(steps: int, full_seconds: float, faster_seconds: float) -> int:
    """How many plain steps take as long as the FasterDiffusion run: round(steps x measured time ratio)."""
    return max(1, round(steps * faster_seconds / full_seconds)) if full_seconds > 0 else steps


@dataclass
class Comparison:
    strategy: str
    steps: int
    full_seconds: float
    faster_seconds: float
    faster_psnr: float
    fewer_steps: int                      # equal_time_steps(...)
    encoder_skips: int                    # encoder calls FasterDiffusion skipped (0: the same computation)
    fewer_seconds: float | None = None    # None: the fewer-steps run was not made
    fewer_psnr: float | None = None
    propagation: str = "reuse"            # what the non-key decoders got (the run's stats)

    @property
    def ratio(self) -> float:
        return self.faster_seconds / self.full_seconds if self.full_seconds > 0 else 1.0


def db(value: float) -> str:
    return "inf (identical)" if math.isinf(value) else f"{value:.2f} dB"


def recommendation(c: Comparison) -> str:
    if c.encoder_skips == 0:   # timing noise must not make the same computation look better or worse
        return ("FasterDiffusion skipped no encoder call (strategy 'all', or a model or sampler it passes "
                "through), so both runs are the same computation: use the plain sampler")
    if c.fewer_steps >= c.steps:
        same = " and identical" if math.isinf(c.faster_psnr) else ""
        return (f"FasterDiffusion was not faster here ({c.ratio:.2f}x the full time{same}): "
                f"use the plain sampler, or a strategy with fewer key steps")
    if c.fewer_psnr is None:
        return (f"at this cost, {c.fewer_steps} plain steps would be as fast (not run: turn on "
                f"compare_fewer_steps to see whether FasterDiffusion beats them)")
    if c.faster_psnr > c.fewer_psnr:
        return (f"FasterDiffusion wins: at this cost {c.fewer_steps} plain steps would be as fast, and they "
                f"reach {db(c.fewer_psnr)} against its {db(c.faster_psnr)}")
    return (f"use {c.fewer_steps} plain steps instead: as fast, and as close or closer to the full run "
            f"({db(c.fewer_psnr)} against FasterDiffusion's {db(c.faster_psnr)})")


def report(c: Comparison) -> str:
    """The node's text: times, speed ratio, PSNR against the full run, the recommendation."""
    speed = c.full_seconds / c.faster_seconds if c.faster_seconds > 0 else math.inf
    lines = [f"FasterDiffusion Compare [{c.strategy}, {c.propagation}], {c.steps} steps",
             f"time: full {c.full_seconds:.3f} s, FasterDiffusion {c.faster_seconds:.3f} s "
             f"(ratio {c.ratio:.3f}, {speed:.2f}x speed)",
             f"PSNR vs full: FasterDiffusion {db(c.faster_psnr)}"]
    if c.fewer_psnr is not None:
        lines[1] += f", {c.fewer_steps} plain steps {c.fewer_seconds:.3f} s"
        lines[2] += f", {c.fewer_steps} plain steps {db(c.fewer_psnr)}"
    lines.append("recommendation: " + recommendation(c))
    return "\n".join(lines)
