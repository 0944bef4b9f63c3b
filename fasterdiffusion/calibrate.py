"""Choose key steps from measured encoder-feature drift (the paper left this as future work, App. G).

``drift[a][j]`` (a < j) is how far the encoder features of step j are from those of step a — what the
decoder of step j sees wrong if a is its key step.  A plan's total drift is the sum over non-key steps of
the drift from their group's key step.  ``choose_keys`` finds the plan with the least total drift for a
given number of key steps, exactly, by dynamic programming over group boundaries (O(K N^2)).

With forecast propagation a group's error also depends on the key before its own (the decoder sees
features extrapolated from both), so its cost is a table ``cost[p + 1][a][b]`` (previous key p, -1 for
none; the group keyed at a covers a..b-1; ``forecast_costs`` builds it) and the programme runs over pairs of
consecutive keys (O(K N^3), vectorised).  Every function here takes either kind of cost.
"""
from __future__ import annotations

from typing import Sequence

from .forecast import DEFAULT_CLAMP
from .strategy import SD15_GPU_MS, make_plan, predicted_gpu_fraction


def is_forecast_cost(cost) -> bool:
    return getattr(cost, "ndim", 2) == 3


def plan_drift(drift, keys: Sequence[int], n: int) -> float:
    """Total drift (or any cost ``choose_keys`` takes) of the plan with these key steps over ``n`` steps."""
    bounds = sorted(set(keys)) + [n]
    if is_forecast_cost(drift):
        prev = [-1] + bounds[:-2]
        return float(sum(drift[p + 1][a][b] for p, a, b in zip(prev, bounds, bounds[1:])))
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
    if is_forecast_cost(drift):
        return _plans_by_count_pairs(drift, n, k_max)
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


def _plans_by_count_pairs(cost, n: int, k_max: int) -> dict[int, list[int]]:
    """``plans_by_count`` for a forecast cost ``cost[p + 1][a][b]``: the state is the last two keys."""
    import numpy as np
    c = np.asarray(cost, dtype=np.float64)
    # f[p + 1, a]: least cost of the groups before a, a being the k-th key and p the one before it
    f = np.full((n + 1, n), np.inf)
    f[0, 0] = 0.0
    backs, plans = [], {}
    for k in range(1, k_max + 1):
        total = f + c[:, :, n]                          # close the plan: the last group a..n-1
        p1, a = (int(i) for i in np.unravel_index(np.argmin(total), total.shape))
        if np.isfinite(total[p1, a]):
            keys = [a]
            for back in reversed(backs):
                p1, a = int(back[p1, a]), p1 - 1
                keys.append(a)
            plans[k] = sorted(keys)
        if k == k_max:
            break
        g = np.full((n + 1, n), np.inf)                 # g[a + 1, b] = min_p f[p + 1, a] + cost[p + 1][a][b]
        back = np.full((n + 1, n), -1, dtype=np.int64)
        for a in range(n - 1):
            if not np.isfinite(f[:, a]).any():
                continue
            m = f[:, a][:, None] + c[:, a, a + 1:n]    # (p + 1, b)
            best = np.argmin(m, axis=0)
            g[a + 1, a + 1:n] = m[best, np.arange(m.shape[1])]
            back[a + 1, a + 1:n] = best
        f = g
        backs.append(back)
    for k in range(2, k_max + 1):
        plans.setdefault(k, plans[k - 1])
    return plans


def _key_pairs(n: int):
    """(p, a): every key a with the key p before it (-1 for key 0, which has none) that a plan of n steps can have."""
    for a in range(n):
        for p in ([-1] if a == 0 else range(a)):
            yield p, a


def _ratio(j: int, a: int, p: int, clamp) -> float:
    """How many key spacings (a - p) step j lies past key a, held at ``clamp`` (forecast.Forecast.clamp)."""
    r = (j - a) / (a - p)
    return r if clamp is None else min(r, clamp)


def forecast_costs(changes: dict, n: int, clamp=DEFAULT_CLAMP):
    """``cost[p + 1][a][b]`` for forecast propagation (order 1, in the step index, held at ``clamp`` key
    spacings past the key as the runtime holds it) from the measured output
    changes ``changes[chunk][(a, j)]`` = step-weighted (decoder of step j on step a's features) - (its own
    output).  The decoder is taken as linear over the short extrapolation, so the change on forecast features
    f_a + r (f_a - f_p), r = (j - a) / (a - p), is (1 + r) c_aj - r c_pj: the group's cost is the squared norm
    of its summed change, summed over chunks (coherent, as ``DriftRecorder.output_error``).  The first group
    (key 0, p = -1) reuses; pairs that cannot follow each other cost infinity."""
    import numpy as np
    cost = np.full((n + 1, n, n + 1), np.inf)
    for p, a in _key_pairs(n):
        cost[p + 1, a, a + 1:] = 0.0
    for chunk in changes.values():
        for p, a in _key_pairs(n):
            acc = 0.0
            for j in range(a + 1, n):
                c = chunk[(a, j)]
                if p >= 0:
                    r = _ratio(j, a, p, clamp)
                    c = (1 + r) * c - r * chunk[(p, j)]
                acc = acc + c
                cost[p + 1, a, j + 1] += float((acc ** 2).sum())
    return cost


def forecast_drift_costs(per_step: list, n: int, clamp=DEFAULT_CLAMP):
    """``cost[p + 1][a][b]`` like ``forecast_costs`` for the drift criterion: the relative distance of the
    order-1 forecast features from each step's own, ``feature_drift``'s measure, from Gram matrices of the
    (pooled) features ``per_step[i]`` = [tensor per feature]."""
    import numpy as np
    flat = [np.stack([per_step[i][t].double().flatten().numpy() for i in range(n)]) for t in range(len(per_step[0]))]
    grams = [f @ f.T for f in flat]
    cost = np.full((n + 1, n, n + 1), np.inf)
    for p, a in _key_pairs(n):
        acc = 0.0
        cost[p + 1, a, a + 1] = 0.0
        for j in range(a + 1, n):
            r = 0.0 if p < 0 else _ratio(j, a, p, clamp)
            q = p if p >= 0 else a
            err = sum(((1 + r) ** 2 * G[a, a] + r * r * G[q, q] + G[j, j] - 2 * r * (1 + r) * G[a, q]
                       - 2 * (1 + r) * G[a, j] + 2 * r * G[q, j]) / (G[j, j] + 1e-12) for G in grams) / len(grams)
            acc += max(err, 0.0)
            cost[p + 1, a, j + 1] = acc
    return cost
