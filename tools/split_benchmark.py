"""The decoder split's scaling shape on this machine's CPU: seconds per group at N = 1, 2, 3 processes.

    bash tools/run.sh split [--worlds 1 2 3] [--width 64] [--latent 32] [--steps 20] [--strategy 0,10]

Each N runs ``examples/diffusers_torchrun.py --tiny`` under torchrun (N = 1: one plain process, no group) on an
SD1.5-layout UNet of base width ``--width`` with random weights, one thread per process, the same generation on every
rank; the seconds per group are the fastest of ``--repeats`` pipeline calls over the groups of the strategy (a group:
its key step's encoder, its share of the decoders, the all-gather).  Every rank's latents must agree with N = 1's.
Read the figures as a shape, not a GPU claim: the ranks share this machine's cores and memory bandwidth (a process per
core at most scales), and ``gloo`` moves the outputs through the loopback.  Writes docs/quality/split_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "diffusers_torchrun.py"


def run(world: int, args) -> list[dict]:
    cmd = [str(EXAMPLE), "--tiny", "--width", str(args.width), "--latent", str(args.latent), "--steps",
           str(args.steps), "--strategy", args.strategy, "--repeats", str(args.repeats), "--prompt", "a red cat"]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or len(lines) != world:
        raise SystemExit(f"N = {world} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return sorted(lines, key=lambda d: d["rank"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strategy", default="0,10", help="key steps: 0,10 at 20 steps makes two groups of 10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality" / "split_cpu.md"))
    args = ap.parse_args()
    rows, base, ref = [], None, None
    for world in args.worlds:
        ranks = run(world, args)
        per_group = max(r["per_group"] for r in ranks)       # the group ends when its slowest rank does
        base = base or per_group
        ref = ref if ref is not None else ranks[0]["latents_sum"]
        same = all(abs(r["latents_sum"] - ref) <= 1e-6 * max(1.0, abs(ref)) for r in ranks)
        batches = " / ".join(str(r["report"]["decoder_batches"]) for r in ranks)
        rows.append(f"| {world} | {per_group:.3f} | {base / per_group:.2f}x | {batches} | {'yes' if same else 'NO'} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# The decoder split on this machine's CPU (a scaling shape, not a GPU claim)", "",
        f"`bash tools/run.sh split --worlds {' '.join(map(str, args.worlds))} --width {args.width} --latent "
        f"{args.latent} --steps {args.steps} --strategy {args.strategy} --repeats {args.repeats}` "
        f"({os.cpu_count()} CPU cores; one thread per process; tiny SD1.5-layout UNet, random weights, CFG 7.5).", "",
        "| processes N | seconds per group | speed-up vs N = 1 | decoder batches per rank (steps) | latents agree with N = 1 |",
        "|---|---|---|---|---|", *rows, "",
        "Each rank runs the key step's encoder itself and its share of the group's decoders; the outputs are "
        "all-gathered (gloo). More processes than cores share cores, so past the core count the time per group "
        "cannot fall. The GPU picture is in docs/scaling.md.", ""])
    Path(args.out).write_text(text)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
