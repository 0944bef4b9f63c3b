"""The pack's main job on the trained test model, inside the provisioned ComfyUI.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/demo.py [--steps 50] [--strategy paper]

Loads the pack with ComfyUI's own loader, samples the same seeds with the plain model and through the
"FasterDiffusion Apply" node (parallel and sequential decoders), prints sampling time, speed ratio and
the difference, and writes out/demo.png: rows of baseline / FasterDiffusion / 4x |difference|.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402  (tools/, next to this script)

require("demo")         # says which interpreter to use when this one has no torch
import testmodel as tm  # noqa: E402


def psnr(a, b):
    import torch
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10 * __import__("math").log10(1.0 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strategy", default="paper")
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(tm.REPO / "out" / "demo.png"))
    args = ap.parse_args()

    tm.boot_comfy()
    import torch
    torch.set_num_threads(1)
    Apply, _ = tm.load_pack(tempfile.mkdtemp())
    model, tokens = tm.load_test_model()
    digits = [d for d in range(10) for _ in range(2)]
    runs = {"baseline": model}
    configs = {}
    for name, parallel in (("FD parallel", True), ("FD sequential", False)):
        (runs[name],) = Apply().apply(model, args.strategy, parallel, 0)   # no cap: 20 digits x CFG x 15 steps is small
        configs[name] = runs[name].model_options["transformer_options"]["faster_diffusion"]

    times = {k: [] for k in runs}
    latents = {}
    for _ in range(args.repeats):                     # interleaved, same seeds every time
        for name, m in runs.items():
            t0 = time.perf_counter()
            latents[name] = tm.sample_digits(m, tokens, digits, seed=7, steps=args.steps, cfg=args.cfg,
                                             sampler=args.sampler)
            times[name].append(time.perf_counter() - t0)

    images = {k: tm.decode(v) for k, v in latents.items()}
    base_t = statistics.median(times["baseline"])
    print(f"\n{len(digits)} digits, {args.steps} steps {args.sampler}, cfg {args.cfg}, strategy {args.strategy!r}, "
          f"median of {args.repeats} interleaved runs, {torch.get_num_threads()} thread")
    print(f"{'':15s} {'time s':>7s} {'ratio':>6s} {'PSNR dB':>8s} {'max|d|':>7s} {'digit acc':>9s}")
    for name, img in images.items():
        t = statistics.median(times[name])
        acc = float((tm.classify(img) == torch.tensor(digits).numpy()).mean())
        p = psnr(img, images["baseline"])
        print(f"{name:15s} {t:7.3f} {t / base_t:6.3f} {p:8.2f} {(img - images['baseline']).abs().max().item():7.4f} {acc:9.0%}")
    for name, c in configs.items():
        print(f"  {name}: decoder batches {c.reports[-1]['decoder_batches']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    diff = ((images["FD parallel"] - images["baseline"]).abs() * 4).clamp(0, 1)
    tm.save_grid(torch.cat([images["baseline"], images["FD parallel"], diff]), out, cols=len(digits))
    print(f"wrote {out} (rows: baseline, FasterDiffusion, 4x |difference|)")


if __name__ == "__main__":
    main()
