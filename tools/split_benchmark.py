"""The decoder split's scaling shape on this machine's CPU: seconds per group at N = 1, 2, 3 processes.

    bash tools/run.sh split [--worlds 1 2 3] [--width 64] [--latent 32] [--steps 20] [--strategy 0,10]

Each N runs ``examples/diffusers_torchrun.py --tiny`` under torchrun (N = 1: one plain process, no group) on an
SD1.5-layout UNet of base width ``--width`` with random weights, one thread per process, the same generation on every
rank; the seconds per group are the fastest of ``--repeats`` pipeline calls over the groups of the strategy (a group:
its key step's encoder, its share of the decoders, the all-gather).  Every rank's latents must agree with N = 1's.
Read the figures as a shape, not a GPU claim: the ranks share this machine's cores and memory bandwidth (a process per
core at most scales), and ``gloo`` moves the outputs through the loopback.  Writes docs/quality/split_cpu.md.

``--gpu-table`` prints instead what docs/scaling.md shows for GPUs: the UNet time of 50 steps with the decoder split
over N devices, composed from the H100 curve measured in ../shared/docs/gpu.md (``GPU_MS``), and the bytes each group
moves for SD1.5, SDXL and SVD.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLE = ROOT / "examples" / "diffusers_torchrun.py"

from fasterdiffusion.strategy import SD15_GPU_MS, decoder_ms, make_plan, parse_strategy  # noqa: E402


def run(world: int, args) -> list[dict]:
    import tempfile
    figures = Path(tempfile.mkdtemp())
    cmd = [str(EXAMPLE), "--tiny", "--json-dir", str(figures), "--width", str(args.width), "--latent", str(args.latent), "--steps",
           str(args.steps), "--strategy", args.strategy, "--repeats", str(args.repeats), "--prompt", "a red cat"]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [json.loads(p.read_text()) for p in sorted(figures.glob("rank*.json"))]
    if out.returncode or len(lines) != world:
        raise SystemExit(f"N = {world} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return sorted(lines, key=lambda d: d["rank"])


# ms per UNet call on one H100, fp16, ComfyUI 0.3.75's UNetModel, one image with CFG (../shared/docs/gpu.md): the full
# forward, encoder + middle, and (width, ms) of one decoder batch of w steps; SD1.5 eager is the planner's own
WIDTHS = (1, 2, 4, 5, 8, 10, 15)
GPU_MS = {
    "SD1.5 512², eager": (SD15_GPU_MS["full"], SD15_GPU_MS["encoder"], SD15_GPU_MS["decoder"]),
    "SD1.5 512², CUDA graphs": (11.9, 4.6, tuple(zip(WIDTHS, (7.5, 10.7, 17.4, 21.5, 31.1, 39.5, 56.2)))),
    "SDXL 1024², eager": (76.8, 36.1, tuple(zip(WIDTHS, (29.8, 45.3, 79.8, 99.0, 149.0, 187.8, 275.0)))),
    "SDXL 1024², CUDA graphs": (41.9, 17.9, tuple(zip(WIDTHS, (24.1, 42.0, 78.1, 97.3, 147.9, 186.9, 274.4)))),
}
# (latent channels, latent side h x w, rows per step with CFG, UNet channels per level, res blocks per level)
LAYOUTS = {"SD1.5 512²": (4, (64, 64), 2, (320, 640, 1280, 1280), 2),
           "SDXL 1024²": (4, (128, 128), 2, (320, 640, 1280), 2),
           "SVD 14 frames 576x1024": (4, (72, 128), 2 * 14, (320, 640, 1280, 1280), 2)}


def composed_ms(model: str, groups: list, devices: int) -> float:
    """UNet ms of a run: a lone key step in full, a group one encoder pass plus its widest rank's decoder batch."""
    full, enc, curve = GPU_MS[model]
    return sum(full if g == 1 else enc + decoder_ms(-(-g // devices), curve) for g in groups)


def gpu_table() -> str:
    worlds = (1, 2, 4, 8)
    lines = ["| model | keys (50 steps) | " + " | ".join(f"N = {n}" for n in worlds) + " |",
             "|---|---|" + "---|" * len(worlds)]
    for model, (full, _, _) in GPU_MS.items():
        for strategy in ("paper", "uniform:5"):
            groups = [len(g) for g in make_plan(parse_strategy(strategy), 50).groups]
            base = 50 * full
            cells = [f"{composed_ms(model, groups, n) / base:.3f}" for n in worlds]
            lines.append(f"| {model} | {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "| model | one step's decoder output (fp16) | a group of 10 steps on N = 2 / 4 / 8: what each rank "
              "receives (shares padded to the largest) | the key step's encoder features (fp16), were they sent instead |", "|---|---|---|---|"]
    for name, (c, (h, w), rows, chans, blocks) in LAYOUTS.items():
        step = c * h * w * rows * 2
        feats, side = chans[0] * h * w, (h, w)                      # conv_in
        for level, ch in enumerate(chans):
            feats += blocks * ch * side[0] * side[1]
            if level < len(chans) - 1:
                side = (side[0] // 2, side[1] // 2)
                feats += ch * side[0] * side[1]                     # the downsample's output
        feats += chans[-1] * side[0] * side[1]                      # the middle block
        recv = [f"{(n - 1) * -(-10 // n) * step / 2**20:.2f}" for n in (2, 4, 8)]     # padded to the largest share
        lines.append(f"| {name} | {step / 2**10:.0f} KiB | {' / '.join(recv)} MiB | {feats * rows * 2 / 2**20:.0f} MiB |")
    return "\n".join(lines)


def main():
    if "--gpu-table" in sys.argv:
        print(gpu_table())
        return
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
