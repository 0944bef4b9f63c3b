"""A group's decoders split across the ranks of a torch.distributed process group (fasterdiffusion/distributed.py):
real ``gloo`` groups of 2 and 3 processes on the CPU (tests/distributed_worker.py), each running the tiny SD1.5-shaped
diffusers pipeline through ``apply(pipe, process_group=...)``, against the single-process run."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from fasterdiffusion.distributed import shares  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
# keys 0, 4, 8 of 10 steps: groups of 4, 4 and 2 steps (3 ranks: shares 2+1+1 and 1+1+0, one rank idle)
STRATEGY = "0,4,8"
CASES = [dict(name="reuse", strategy=STRATEGY, propagation="reuse"),
         dict(name="forecast", strategy=STRATEGY, propagation="forecast"),
         dict(name="cap", strategy=STRATEGY, propagation="forecast", cap=2),      # CFG's 2 rows: one step per call
         dict(name="uniform", strategy="uniform:3", propagation="forecast", steps=12, seed=5)]


def launch(tmp: Path, world: int, cases: list, timeout: float = 60, deadline: float = 240) -> list:
    """Run ``world`` worker processes (world 1: the single-process reference, no group); their results, by rank."""
    out = tmp / f"world{world}_{len(list(tmp.iterdir()))}"
    out.mkdir()
    spec = json.dumps(dict(store=str(out / "store"), world=world, out=str(out), timeout=timeout, cases=cases))
    procs = [subprocess.Popen([sys.executable, str(WORKER), spec, str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=deadline)[0] for p in procs]
    results = []
    for r, p in enumerate(procs):
        path = out / f"rank{r}.pt"
        results.append(torch.load(path) if path.is_file() else {"exit": p.returncode, "log": logs[r]})
    return results


@functools.lru_cache(maxsize=None)
def reference() -> dict:
    import tempfile
    return launch(Path(tempfile.mkdtemp()), 1, CASES)[0]


def test_shares_are_an_exact_contiguous_split_in_rank_order():
    for n in range(0, 12):
        for world in range(1, 5):
            table = shares(n, world)
            assert [c for _, c in table] == sorted((c for _, c in table), reverse=True)    # the first ranks more
            assert max(c for _, c in table) - min(c for _, c in table) <= 1
            assert [i for s, c in table for i in range(s, s + c)] == list(range(n))
    assert shares(4, 3) == [(0, 2), (2, 1), (3, 1)] and shares(2, 3) == [(0, 1), (1, 1), (2, 0)]


@pytest.mark.parametrize("world", [2, 3])
def test_split_runs_equal_the_single_process_run(world, tmp_path):
    """Every rank ends with the single-process latents, with reuse and forecast propagation and under the memory cap:
    bit for bit where both run one step per decoder call (the cap), else to float tolerance (batched matmuls of other
    widths round differently); every rank holds the same bits; each rank ran its own share of each group's decoder
    steps, the shares adding up to the single run's."""
    ref = reference()
    ranks = launch(tmp_path, world, CASES)
    for case in CASES:
        name, single = case["name"], ref[case["name"]]
        for r, res in enumerate(ranks):
            assert name in res, res.get("log", res)[-3000:]
            got, want = res[name]["latents"], single["latents"]
            if name == "cap":      # one step per decoder call either way: the same arithmetic, the same bits
                assert torch.equal(got, want), (name, r, (got - want).abs().max())
            else:                  # other batch widths: float rounding of batched matmuls
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max()), (name, r, (got - want).abs().max())
            assert torch.equal(got, ranks[0][name]["latents"])     # the same bits on every rank
            assert res[name]["report"]["split"] == f"rank {r} of {world}"
            assert res[name]["report"]["encoder_calls"] == single["report"]["encoder_calls"]     # every rank encodes
        steps_per_rank = [sum(res[name]["report"]["decoder_batches"]) for res in ranks]
        assert sum(steps_per_rank) == sum(single["report"]["decoder_batches"]), (name, steps_per_rank)
        if name == "reuse":           # groups of 4, 4, 2 steps
            assert steps_per_rank == [sum(shares(g, world)[r][1] for g in (4, 4, 2)) for r in range(world)]
        if name == "cap":
            assert all(set(res[name]["report"]["decoder_batches"]) == {1} for res in ranks)


def test_a_rank_whose_decoders_fail_is_named_on_every_rank_without_waiting(tmp_path):
    """Rank 1's decoders raise: both ranks stop with SplitError naming rank 1, long before the group's timeout."""
    case = dict(name="fail", strategy=STRATEGY, fail="raise", fail_rank=1)
    ranks = launch(tmp_path, 2, [case], timeout=120)
    for r, res in enumerate(ranks):
        err = res["fail"]["error"]
        assert "the decoders of rank(s) [1] of 2 failed" in err and "every rank stops at this step" in err, err
        assert res["fail"]["seconds"] < 60
    assert "injected decoder failure" in ranks[1]["fail"]["error"]


def test_a_rank_that_dies_is_reported_not_hung(tmp_path):
    """Rank 1 leaves mid-split (os._exit): rank 0 raises SplitError (the all-gather failed) within the timeout."""
    case = dict(name="die", strategy=STRATEGY, fail="exit", fail_rank=1)
    t0 = time.perf_counter()
    ranks = launch(tmp_path, 2, [case], timeout=20, deadline=120)
    assert ranks[1]["exit"] == 3
    err = ranks[0]["die"]["error"]
    assert "all-gather across 2 ranks failed" in err, err
    assert time.perf_counter() - t0 < 100


def test_ranks_that_sample_different_inputs_are_refused(tmp_path):
    """Another seed per rank (data-parallel serving): the outputs are not each other's, so every rank refuses."""
    ranks = launch(tmp_path, 2, [dict(name="seeds", strategy=STRATEGY, seed_per_rank=1)])
    for res in ranks:
        assert "sample different inputs" in res["seeds"]["error"] and "process_group=None" in res["seeds"]["error"]


def test_a_process_group_without_torch_distributed_is_refused_naming_the_fix():
    import diffusers_tiny as dt
    from fasterdiffusion.diffusers import apply
    with pytest.raises(ValueError, match="init_process_group"):
        apply(dt.sd15(), process_group=object())


def test_the_torchrun_example_runs_and_every_rank_agrees(tmp_path):
    """examples/diffusers_torchrun.py under torchrun (2 processes, gloo on the CPU, --tiny): every rank prints the same
    latents and its own share of the decoders."""
    example = HERE.parent / "examples" / "diffusers_torchrun.py"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(example), "--tiny",
                          "--steps", "6", "--strategy", "0,3", "--width", "32", "--latent", "8", "--timeout", "60",
                          "--json-dir", str(tmp_path)], capture_output=True, text=True, timeout=240)
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert out.returncode == 0 and len(ranks) == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert ranks[0]["latents_sum"] == ranks[1]["latents_sum"]
    assert [r["report"]["split"] for r in ranks] == ["rank 0 of 2", "rank 1 of 2"]
    assert [r["report"]["decoder_batches"] for r in ranks] == [[2, 2], [1, 1]]     # groups of 3: shares 2 + 1
