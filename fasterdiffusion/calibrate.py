"""Choose key steps from measured encoder-feature drift (the paper left this as future work, App. G).

``drift[a][j]`` (a < j) is how far the encoder features of step j are from those of step a — what the
decoder of step j sees wrong if a is its key step.  A plan's total drift is the sum over non-key steps of
the drift from their group's key step.  ``choose_keys`` finds the plan with the least total drift for a
given number of key steps, exactly, by dynamic programming over group boundaries (O(K N^2)).
"""
from __future__ import annotations

from typing import Sequence

from .strategy import SD15_GPU_MS, make_plan, predicted_gpu_fraction


def plan_drift(drift: Sequence[Sequence[float]], keys: Sequence[int], n: int) -> float:
    """Total drift of the plan with these key steps over ``n`` steps."""
    bounds = sorted(set(keys)) + [n]
    return sum(drift[a][j] for a, b in zip(bounds, bounds[1:]) for j in range(a + 1, b))


def choose_keys(drift: Sequence[Sequence[float]], n: int, num_keys: int) -> list[int]:
    """The ``num_keys`` key steps (step 0 among them) with the least total drift; ties go to the earlier
    key, so the result is deterministic."""
    if n < 1:
        return []
    return plans_by_count(drift, n, num_keys)[max(1, min(num_keys, n))]


def plans_by_count(drift: Sequence[Sequence[float]], n: int, k_max: int) -> dict[int, list[int]]:
    """For every key count 1..k_max (at most n), its least-drift key steps, from one dynamic programme.
    ``drift`` may be any additive cost (encoder drift, output error); entries may be negative."""
    k_max = max(1, min(k_max, n))
    # group_cost[a][b]: drift of a group keyed at a that covers steps a..b-1
    group_cost = [[0.0] * (n + 1) for _ in range(n)]
    for a in range(n):
        acc = 0.0
        for b in range(a + 1, n + 1):
            if b - 1 > a:
                acc += drift[a][b - 1]
            group_cost[a][b] = acc
    inf = float("inf")
    # best[k][b]: least drift covering steps 0..b-1 with k groups, the first keyed at 0; back[k][b]: last key
    best = [[inf] * (n + 1) for _ in range(k_max + 1)]
    back = [[-1] * (n + 1) for _ in range(k_max + 1)]
    for b in range(1, n + 1):
        best[1][b] = group_cost[0][b]
        back[1][b] = 0
    for k in range(2, k_max + 1):
        for b in range(k, n + 1):
            for a in range(k - 1, b):           # the last group is a..b-1
                c = best[k - 1][a] + group_cost[a][b]
                if c < best[k][b] - 1e-15:
                    best[k][b], back[k][b] = c, a
    plans = {}
    for k_total in range(1, k_max + 1):
        keys, b = [], n
        for k in range(k_total, 0, -1):
            a = back[k][b]
            keys.append(a)
            b = a
        plans[k_total] = sorted(keys)
    return plans


def keys_for_cost(drift: Sequence[Sequence[float]], n: int, cost_fraction: float, encoder_share: float) -> list[int]:
    """The least-drift plan whose predicted UNet FLOP fraction is at most ``cost_fraction``."""
    # cost = (K + (n - K) * (1 - share)) / n  <=  f   <=>   K <= n (f - 1 + share) / share
    k = int(n * (cost_fraction - 1 + encoder_share) / encoder_share + 1e-9)
    return choose_keys(drift, n, max(1, min(n, k)))


def keys_for_gpu_time(drift: Sequence[Sequence[float]], n: int, gpu_fraction: float) -> list[int]:
    """The least-drift plan with the most key steps whose predicted GPU time with parallel decoders
    (``strategy.predicted_gpu_fraction``) is at most ``gpu_fraction``; the one-key plan when none is."""
    if n < 1:
        return []
    # every group costs at least encoder + one-wide decoder: more keys than this cannot fit
    floor_ms = SD15_GPU_MS["encoder"] + SD15_GPU_MS["decoder"][0][1]
    k_max = min(n, int(gpu_fraction * n * SD15_GPU_MS["full"] / floor_ms) + 1)
    plans = plans_by_count(drift, n, k_max)
    for k in range(len(plans), 0, -1):
        if predicted_gpu_fraction(make_plan(",".join(map(str, plans[k])), n)) <= gpu_fraction + 1e-12:
            return plans[k]
    return plans[1]
