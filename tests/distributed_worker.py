"""One process of the decoder-split tests (tests/test_distributed.py): a rank of a ``gloo`` process group, or the
single-process reference (world 1, no group), running the tiny SD1.5-shaped diffusers pipeline through ``apply``.

    python tests/distributed_worker.py SPEC_JSON RANK

SPEC: {"store": a file for the group's FileStore, "world": N, "out": a folder, "timeout": seconds,
       "cases": [{"name", "strategy", "propagation", "cap", "steps", "seed", "seed_per_rank" (added times the rank),
                  "fail": "raise" | "exit" (what the rank ``fail_rank`` does at its first split decoder call)}]}
Writes OUT/rank<R>.pt: {case name: {"latents", "report"} or {"error", "seconds"}}.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import diffusers_tiny as dt  # noqa: E402
from fasterdiffusion.diffusers import apply  # noqa: E402
from fasterdiffusion.distributed import SplitError  # noqa: E402


def inject(handle, how: str):
    """Make this rank fail at its first batched (several-step) decoder call: raise, or leave the process."""
    decode = handle.adapter.decode

    def failing(call, features, emb):
        if call.x is None:                  # a tiled decoder-only call: inside the split
            if how == "exit":
                os._exit(3)
            raise RuntimeError("injected decoder failure")
        return decode(call, features, emb)
    handle.adapter.decode = failing


def main():
    spec, rank = json.loads(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    group = None
    if spec["world"] > 1:
        dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=spec["world"],
                                timeout=datetime.timedelta(seconds=spec.get("timeout", 60)))
        group = dist.group.WORLD
    pipe = dt.sd15()
    results = {}
    for case in spec["cases"]:
        handle = apply(pipe, strategy=case["strategy"], propagation=case.get("propagation", "reuse"),
                       max_decoder_batch=case.get("cap", 32), process_group=group)
        if case.get("fail") and case.get("fail_rank") == rank:
            inject(handle, case["fail"])
        t0 = time.perf_counter()
        try:
            latents = dt.run(pipe, steps=case.get("steps", 10),
                             seed=case.get("seed", 0) + case.get("seed_per_rank", 0) * rank)
            results[case["name"]] = {"latents": latents, "report": handle.reports[-1]}
        except SplitError as e:
            results[case["name"]] = {"error": str(e), "seconds": time.perf_counter() - t0}
        handle.remove()
    torch.save(results, Path(spec["out"]) / f"rank{rank}.pt")
    if group is not None and not any("error" in r for r in results.values()):
        dist.barrier()              # every rank done before any tears the group down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
