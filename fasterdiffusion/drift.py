"""Calibration measurements: how far the encoder features move between steps of one full run, and what
that staleness does to the decoder's output.

A host runs every on-schedule call through its adapter's split (identical to its forward), hands the
features to ``DriftRecorder.record``, and ``drift()`` gives the matrix ``fasterdiffusion.calibrate``
chooses key steps from.  With ``stale_outputs`` the recorder also keeps every step's full features and, at
step j, runs the decoder of step j once more on the features of each earlier step a: ``output_error()``
is then the measured error a key step a would cause at step j (decoder calls only, in the same pass).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .runtime import Features

POOL = 16   # features are average-pooled to at most 16x16 per channel: enough to see drift, small to keep


def pool(t: torch.Tensor) -> torch.Tensor:
    h, w = t.shape[-2:]
    if h > POOL or w > POOL:
        t = F.adaptive_avg_pool2d(t, (min(h, POOL), min(w, POOL)))
    return t.detach().float().cpu()


def feature_drift(per_step: list[list[torch.Tensor]]) -> list[list[float]]:
    """drift[a][j] (a < j): mean over feature tensors of |f_j - f_a|^2 / |f_j|^2; 0 on and below the
    diagonal.  ``per_step[i]`` is the list of (pooled) feature tensors of step i."""
    n = len(per_step)
    out = [[0.0] * n for _ in range(n)]
    for j in range(n):
        norms = [float((t ** 2).sum()) + 1e-12 for t in per_step[j]]
        for a in range(j):
            out[a][j] = sum(float(((fj - fa) ** 2).sum()) / nj
                            for fj, fa, nj in zip(per_step[j], per_step[a], norms)) / len(norms)
    return out


class DriftRecorder:
    """Pooled encoder features per step and cond chunk of one full run."""

    def __init__(self, num_steps: int, stale_outputs: bool = False, step_weights=None):
        self.num_steps = num_steps
        self.steps: dict[int, dict[tuple, list[torch.Tensor]]] = {}
        self.encoder_share = None     # encoder+middle share of the UNet's FLOPs, set by measure_share
        self.stale_outputs = stale_outputs
        self.max_decoder_batch = 64            # most rows in one batched stale decoder call
        self.step_weights = step_weights or [1.0] * num_steps   # output error -> latent error, per step
        self.kept: dict[int, dict[tuple, Features]] = {}        # full features, only with stale_outputs
        self.errors: dict[int, dict[tuple, dict[int, float]]] = {}   # step j -> chunk -> {a: |w_j (out_a - out_j)|^2}
        self.coherent: dict[int, dict[tuple, dict[int, float]]] = {}  # the same, as growth of the group's sum
        self.sums: dict[tuple, dict[int, torch.Tensor]] = {}         # chunk -> key a -> sum_j w_j (out_a - out_j)
        self.last: dict[tuple, tuple] = {}                           # chunk -> (step, its changes) to undo
        self.changes: dict[tuple, dict[tuple, torch.Tensor]] = {}    # chunk -> (a, j) -> w_j (out_a - out_j)

    def record(self, step: int, chunk: tuple, feats: Features):
        # cond and uncond may come in separate calls; a second call of the same chunk at the same step (a
        # Heun-type corrector lands on the next step first) is replaced by the later one
        self.steps.setdefault(step, {})[chunk] = [pool(t) for t in feats.skips + [feats.mid]]

    def pooled_steps(self) -> list[list[torch.Tensor]]:
        """Per step, its pooled feature tensors (cond chunks concatenated)."""
        missing = [i for i in range(self.num_steps) if i not in self.steps]
        if missing:
            raise RuntimeError(f"calibration saw no model call at steps {missing}: the sampler skipped them")
        return [[torch.cat(parts) for parts in zip(*(self.steps[i][c] for c in sorted(self.steps[i])))]
                for i in range(self.num_steps)]

    def drift(self, forecast: bool = False):
        """drift[a][j]; with ``forecast`` the cost table of order-1 forecast propagation
        (``calibrate.forecast_drift_costs``)."""
        if forecast:
            from .calibrate import forecast_drift_costs
            return forecast_drift_costs(self.pooled_steps(), self.num_steps)
        return feature_drift(self.pooled_steps())

    def forecast_output_error(self):
        """The output error of order-1 forecast propagation, as ``calibrate.forecast_costs``' table."""
        if not self.stale_outputs:
            raise RuntimeError("output_error needs a recorder made with stale_outputs=True")
        self.drift()     # the same check that every step was seen
        from .calibrate import forecast_costs
        return forecast_costs(self.changes, self.num_steps)

    def output_error(self, coherent: bool = True) -> list[list[float]]:
        """err[a][j] (a < j): what keying step a costs at step j, from the decoder of step j run on step a's
        features, summed over cond chunks; 0 on and below the diagonal.  Coherent (the default): the same
        stale features push every step of a group the same way, so err[a][j] is the growth of the squared
        norm of the group's summed step-weighted output change when the group is extended to j; summed over
        j it is that squared norm, the group's latent error.  Not coherent: each step's squared change alone."""
        if not self.stale_outputs:
            raise RuntimeError("output_error needs a recorder made with stale_outputs=True")
        self.drift()     # the same check that every step was seen
        table = self.coherent if coherent else self.errors
        n = self.num_steps
        out = [[0.0] * n for _ in range(n)]
        for j, chunks in table.items():
            for errs in chunks.values():
                for a, e in errs.items():
                    out[a][j] += e
        return out

    def forward(self, adapter, call, step: int, chunk: tuple, again=None):
        """The split UNet's output for an on-schedule call, recording its features (and, on the first
        call, the encoder's FLOP share).  ``again()`` gives an equivalent call for one more decoder run
        (a host whose decoder consumes per-call state, e.g. ControlNet residuals, makes a fresh one)."""
        emb = adapter.embed(call)
        measure = self.encoder_share is None
        with FlopCounterMode(display=False) if measure else nullcontext() as enc:
            feats = adapter.encode(call, emb)
        self.record(step, chunk, feats)
        with FlopCounterMode(display=False) if measure else nullcontext() as dec:
            out = adapter.decode(call, feats, emb)
        if measure:
            total = enc.get_total_flops() + dec.get_total_flops()
            self.encoder_share = enc.get_total_flops() / total if total else 0.31
        if self.stale_outputs:
            self.measure_stale(adapter, again or (lambda: call), step, chunk, feats, out)
        return out

    def measure_stale(self, adapter, again, step, chunk, feats, out):
        """Decode this step on each earlier step's kept features of the same chunk; keep this step's."""
        earlier = [a for a in sorted(self.kept) if a < step and chunk in self.kept[a]]
        w = self.step_weights[step] ** 0.5
        errs, grown, sums = {}, {}, self.sums.setdefault(chunk, {})
        last_step, last = self.last.get(chunk, (None, {}))
        if last_step == step:       # a second call of this step (Heun-type corrector first): replace the first
            for a, change in last.items():
                sums[a] = sums[a] - change
        changes = {}
        for a, stale in zip(earlier, self.stale_decodes(adapter, again, [self.kept[a][chunk] for a in earlier])):
            changes[a] = change = (stale - out).float().cpu() * w
            errs[a] = float((change ** 2).sum())
            before = float((sums[a] ** 2).sum()) if a in sums else 0.0
            sums[a] = sums[a] + change if a in sums else change
            grown[a] = float((sums[a] ** 2).sum()) - before
        self.last[chunk] = (step, changes)
        kept_changes = self.changes.setdefault(chunk, {})
        for a, change in changes.items():
            kept_changes[(a, step)] = change
        self.errors.setdefault(step, {})[chunk] = errs
        self.coherent.setdefault(step, {})[chunk] = grown
        self.kept.setdefault(step, {})[chunk] = feats

    def stale_decodes(self, adapter, again, old: list[Features]):
        """The decoder of this call on each of ``old``: batched like parallel decoders, one at a time when the
        call carries decoder-side control (each run needs its own residuals)."""
        call = again()
        if adapter.own_step_reason(call):
            return [adapter.decode(again(), f, adapter.embed(call)) for f in old]
        per_call = max(1, self.max_decoder_batch // call.rows)
        outs = []
        for i in range(0, len(old), per_call):
            part = old[i:i + per_call]
            m = len(part)
            sig = None if call.sigmas is None else call.sigmas.repeat(m)
            big = adapter.tile(call, m, call.timesteps.repeat(m), sig)
            stacked = Features([torch.cat(ts) for ts in zip(*(f.skips for f in part))],
                               torch.cat([f.mid for f in part]), part[0].meta)
            outs.extend(adapter.decode(big, stacked, adapter.embed(big)).chunk(m))
        return outs
