"""The pack's main job on the trained test model, inside the provisioned ComfyUI.

    bash tools/run.sh demo [--steps 50] [--strategy uniform:3]      (about 1 minute)

Loads the pack with ComfyUI's own loader, samples the same seeds with the plain model and through the
"FasterDiffusion Apply" node (forecast propagation, the default, with parallel and sequential decoders; and
the paper's reuse propagation), then the plain sampler with as many fewer steps as cost what FasterDiffusion
cost, and prints sampling time, speed ratio and fidelity.  Writes out/demo.png: the full run, FasterDiffusion
with forecast, with reuse, the equal-cost plain run, and 4x the forecast run's difference, one labelled row
each.  The default strategy is uniform:3, the one the README recommends for this model (docs/quality/quality.md:
the paper's keys leave speckled digits here).
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
from fasterdiffusion import make_plan, predicted_gpu_fraction  # noqa: E402


def psnr(a, b):
    import torch
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10 * __import__("math").log10(1.0 / mse)


RECOMMENDED = "uniform:3"


def save_labelled(rows, labels, title, footer, path, scale=4):
    """One row of [N,16,16] images per entry of ``rows``, its label on the left; a title above, footer lines below."""
    from PIL import Image, ImageDraw, ImageFont
    font, small = ImageFont.load_default(size=18), ImageFont.load_default(size=15)
    strips = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, images in enumerate(rows):
            strips.append(Image.open(tm.save_grid(images, Path(tmp) / f"{i}.png", len(images), scale)).convert("RGB"))
    label_w, pad, line = 380, 12, 22
    width = label_w + strips[0].width + pad
    height = 2 * line + pad + sum(s.height + pad for s in strips) + line * len(footer) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill="black", font=font)
    y = 2 * line + pad
    for strip, label in zip(strips, labels):
        canvas.paste(strip, (label_w, y))
        draw.multiline_text((pad, y + 4), label, fill="black", font=small, spacing=4)
        y += strip.height + pad
    for text in footer:
        draw.text((pad, y), text, fill="black", font=small)
        y += line
    canvas.save(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strategy", default=RECOMMENDED, help=f"key steps (default {RECOMMENDED}, best on this model)")
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
    for name, parallel, propagation in (("FD forecast", True, "forecast"), ("FD forecast seq", False, "forecast"),
                                        ("FD reuse", True, "reuse")):
        # no cap: 20 digits x CFG x 15 steps is small
        (runs[name],) = Apply.execute(model, args.strategy, parallel, 0, propagation=propagation)
        configs[name] = runs[name].model_options["transformer_options"]["faster_diffusion"]

    times = {k: [] for k in runs}
    latents = {}
    for _ in range(args.repeats):                     # interleaved, same seeds every time
        for name, m in runs.items():
            t0 = time.perf_counter()
            latents[name] = tm.sample_digits(m, tokens, digits, seed=7, steps=args.steps, cfg=args.cfg,
                                             sampler=args.sampler)
            times[name].append(time.perf_counter() - t0)

    base_t = statistics.median(times["baseline"])
    # the free way to go faster: the plain sampler with fewer steps, as many as cost what FasterDiffusion cost
    gpu = predicted_gpu_fraction(make_plan(args.strategy, args.steps))
    fewer = max(1, round(args.steps * min(gpu, statistics.median(times["FD forecast"]) / base_t)))
    name_fewer = f"plain {fewer} steps"
    times[name_fewer] = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        latents[name_fewer] = tm.sample_digits(model, tokens, digits, seed=7, steps=fewer, cfg=args.cfg,
                                               sampler=args.sampler)
        times[name_fewer].append(time.perf_counter() - t0)
    images = {k: tm.decode(v) for k, v in latents.items()}
    truth = torch.tensor(digits).numpy()
    score = {name: dict(ratio=statistics.median(times[name]) / base_t, psnr=psnr(img, images["baseline"]),
                        acc=float((tm.classify(img) == truth).mean())) for name, img in images.items()}
    import comfyui_version
    print(f"\nComfyUI {comfyui_version.__version__}: {len(digits)} digits, {args.steps} steps {args.sampler}, cfg {args.cfg}, "
          f"strategy {args.strategy!r}, median of {args.repeats} interleaved runs, {torch.get_num_threads()} thread")
    print(f"{'':16s} {'time s':>7s} {'ratio':>6s} {'PSNR dB':>8s} {'max|d|':>7s} {'digit acc':>9s}")
    for name, img in images.items():
        sc = score[name]
        print(f"{name:16s} {statistics.median(times[name]):7.3f} {sc['ratio']:6.3f} {sc['psnr']:8.2f} "
              f"{(img - images['baseline']).abs().max().item():7.4f} {sc['acc']:9.0%}")
    for name, c in configs.items():
        r = c.reports[-1]
        print(f"  {name}: encoder ran {r['encoder_calls'] + r['full_calls']}x, skipped {r['cached_calls']}x; decoder "
              f"batches {r['decoder_batches']}, {r['propagation']}")
    print(f"  {name_fewer}: the plain sampler at the smaller of the measured time ratio and the SD1.5 GPU time "
          f"the plan predicts ({gpu:.2f}); on a GPU the parallel decoders cost about the latter")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, seq, base = score["FD forecast"], score["FD forecast seq"], score["baseline"]
    reuse, plain = score["FD reuse"], score[name_fewer]
    keys = len(make_plan(args.strategy, args.steps).keys)
    diff = ((images["FD forecast"] - images["baseline"]).abs() * 4).clamp(0, 1)
    save_labelled(
        [images["baseline"], images["FD forecast"], images["FD reuse"], images[name_fewer], diff],
        [f"Full run (no FasterDiffusion):\nthe whole UNet at all {args.steps} steps",
         f"FasterDiffusion, forecast, {args.strategy}:\nencoder at {keys} of {args.steps} steps: {fd['psnr']:.1f} dB",
         f"FasterDiffusion, reuse (the paper's):\nsame cost: {reuse['psnr']:.1f} dB",
         f"Plain sampler, {fewer} steps:\nabout the same cost: {plain['psnr']:.1f} dB",
         "4 x |full - forecast|\n(black = identical, white = far apart)"],
        f"FasterDiffusion on the digits test model: {len(digits)} digits, {args.steps} {args.sampler} steps, "
        f"cfg {args.cfg:g}, same seeds",
        [f"Sampling time: FasterDiffusion {fd['ratio']:.2f}x the full run's with parallel decoders, "
         f"{seq['ratio']:.2f}x sequential (CPU, {torch.get_num_threads()} thread, median of {args.repeats}); "
         f"predicted SD1.5 GPU time {gpu:.2f}x.",
         f"Fidelity to the full run (image PSNR): forecast {fd['psnr']:.1f} dB, reuse {reuse['psnr']:.1f} dB, "
         f"{fewer} plain steps {plain['psnr']:.1f} dB; digit accuracy {fd['acc']:.0%} (full run {base['acc']:.0%})."],
        out)
    print(f"wrote {out} (labelled rows: full run, FasterDiffusion {args.strategy} forecast, reuse, {fewer} plain steps, "
          f"4x |difference|)")


if __name__ == "__main__":
    main()
