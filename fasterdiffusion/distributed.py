"""A group's decoders past one device: its steps split across the ranks of a ``torch.distributed`` process group.

A non-key step's decoder reads only its key step's features and its own timestep, so the K decoder passes of a group
are independent (the paper's Table 2 runs them on several GPUs).  Every rank runs the whole sampler on the same inputs:
the key step's encoder on its own copy (no feature transfer), then its share of the group's steps (``shares``: a
contiguous slice, the first ``n % world`` ranks one step more, so the split is exact and the same on every rank), then
one ``all_gather`` of the decoder outputs, after which every rank holds every step's output, bit for bit the same, and
the sampler's updates stay sequential and identical on every rank.

Every gather is preceded by a small one (``_status``) that carries each rank's health and a checksum of the call it
decoded for: a rank whose decoders raised makes every rank raise ``SplitError`` naming it (instead of the others
waiting on it), and ranks that sample different inputs (data-parallel serving: another prompt or seed per rank) are
refused, since their outputs are not each other's.  A rank that dies or stops answering fails the collective after the
process group's ``timeout`` (``init_process_group(timeout=...)``), which is reported the same way.
"""
from __future__ import annotations

from typing import Callable

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SHAPE = 8                   # most dims of one step's output the status carries


class SplitError(RuntimeError):
    """A decoder split could not complete on every rank (a rank failed, stopped answering, or sampled other inputs)."""


def shares(n: int, world: int) -> list[tuple[int, int]]:
    """(start, count) of each rank's steps among ``n``: contiguous, in rank order, the first ``n % world`` ranks one
    more (a rank past ``n`` gets none)."""
    base, extra = divmod(n, world)
    out, start = [], 0
    for r in range(world):
        count = base + (r < extra)
        out.append((start, count))
        start += count
    return out


def world_of(group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group`` (a ProcessGroup; None: one process)."""
    if group is None:
        return 0, 1
    import torch.distributed as dist
    return dist.get_rank(group), dist.get_world_size(group)


def check_group(group) -> None:
    """Raise ValueError naming the fix where ``group`` cannot carry a split (torch.distributed not started)."""
    if group is None:
        return
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("FasterDiffusion: process_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group() first (run under torchrun), or pass "
                         "process_group=None for one process")


def checksum(call_tensors) -> torch.Tensor:
    """Two float64 sums of the call's inputs (x, context, timesteps), on the CPU: equal on ranks that sample the same
    thing (one host sync per key step; the health exchange needs one anyway)."""
    sums = [torch.stack([t.detach().double().sum(), t.detach().double().abs().sum()])
            for t in call_tensors if t is not None]
    return torch.stack(sums).sum(0).cpu() if sums else torch.zeros(2, dtype=torch.float64)


def split_decode(decode: Callable[[int, int], tuple[list, list]], n: int, group, inputs) -> tuple[list, list]:
    """Outputs of all ``n`` steps of a group on every rank of ``group``: this rank runs ``decode(start, count)`` on
    its share (returning (per-step outputs, widths of its decoder calls)), then every rank's outputs are gathered.
    ``inputs``: the call's tensors, whose checksum must agree across ranks.  Returns (n outputs, this rank's widths)."""
    rank, world = world_of(group)
    table = shares(n, world)
    start, count = table[rank]
    outs, widths, error = [], [], None
    try:
        if count:
            outs, widths = decode(start, count)
    except Exception as e:               # told to the other ranks, then raised here with its own traceback
        error = e
    status = _status(outs, error, inputs)
    everyone = _gather(group, status, world)
    failed = [r for r in range(world) if everyone[r][0] != 0]
    if failed:
        raise SplitError(f"FasterDiffusion: the decoders of rank(s) {failed} of {world} failed"
                         + (f" (this rank: {type(error).__name__}: {error})" if error else "")
                         + "; every rank stops at this step") from error
    sums = {(float(s[1]), float(s[2])) for s in everyone}
    if len(sums) > 1:
        raise SplitError(f"FasterDiffusion: the {world} ranks of the process group sample different inputs (another "
                         "prompt, seed, size or setting per rank), so their decoder outputs are not each other's: the "
                         "split needs every rank to run the same generation; for data-parallel serving pass "
                         "process_group=None")
    ref = next(s for s in everyone if s[3] > 0)
    shape = [int(d) for d in ref[5:5 + int(ref[4])]]
    dtype = _DTYPES[int(ref[3]) - 1]
    device = outs[0].device if outs else next(t.device for t in inputs if t is not None)   # where the call runs
    most = table[0][1]
    mine = torch.zeros([most] + shape, dtype=dtype, device=device)
    if count:
        mine[:count] = torch.stack(outs)
    gathered = _gather(group, mine, world)
    every = [gathered[r][i] for r, (_, c) in enumerate(table) for i in range(c)]
    return every, widths


def _status(outs, error, inputs) -> torch.Tensor:
    """[failed, checksum, |checksum|, dtype code (0: none), ndim, *shape] of one rank's share, float64."""
    s = torch.zeros(5 + _SHAPE, dtype=torch.float64)
    s[0] = error is not None
    s[1:3] = checksum(inputs)
    if outs and error is None:
        shape = list(outs[0].shape)
        if outs[0].dtype in _DTYPES and len(shape) <= _SHAPE:
            s[3] = _DTYPES.index(outs[0].dtype) + 1
            s[4] = len(shape)
            s[5:5 + len(shape)] = torch.tensor(shape, dtype=torch.float64)
        else:
            s[0] = 1
    return s


def _gather(group, tensor: torch.Tensor, world: int) -> list:
    """``all_gather`` of one tensor per rank, through the device the backend moves (gloo: the CPU; NCCL: this rank's
    CUDA device), returned where ``tensor`` was; a collective that fails (a rank died, or passed the group's timeout)
    raises SplitError."""
    import torch.distributed as dist
    device = tensor.device
    if dist.get_backend(group) == "gloo":
        transport = torch.device("cpu")
    else:
        transport = device if device.type != "cpu" else torch.device("cuda", torch.cuda.current_device())
    tensor = tensor.to(transport)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    try:
        dist.all_gather(parts, tensor.contiguous(), group=group)
    except Exception as e:
        raise SplitError(f"FasterDiffusion: the decoder split's all-gather across {world} ranks failed (a rank stopped "
                         f"or passed the process group's timeout): {e}") from e
    return [p.to(device) for p in parts]
