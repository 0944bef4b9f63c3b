"""FasterDiffusion in diffusers: an SD1.5-shaped random-weight StableDiffusionPipeline, unpatched vs patched.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/diffusers_demo.py              # CPU, about 1 min
    python tools/diffusers_demo.py --device cuda --width 320 --latent 64 --steps 50  # the real SD1.5 UNet, fp16

The UNet has SD1.5's layout (2 res blocks per level, cross-attention on the first three levels, 8 heads,
768-wide context); ``--width`` is its base width (SD1.5: 320; the CPU default 64 keeps a run short) and
``--latent`` the latent size (SD1.5 at 512 px: 64).  Text encoder and VAE are tiny (the VAE is not run:
output_type="latent").  Random weights: time does not depend on them, fidelity does, so the PSNR here only
shows that the patched pipeline follows the unpatched one; judge quality on a real checkpoint.

Per device it prints, for the unpatched pipeline, strategy ``all`` (must be bit-identical), and the strategy
sequential and parallel: encoder passes run / skipped, decoder batches, the pipeline time (the fastest of
--repeats calls, interleaved, after a warm-up round: on a shared CPU the fastest is the least disturbed;
CUDA synchronised), the time ratio to the unpatched pipeline, and
the latent PSNR against the unpatched latent (peak = the unpatched latent's range).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def psnr(a, b, peak):
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def run_device(device, args):
    import torch
    import diffusers_tiny as dt
    from fasterdiffusion.diffusers import apply

    dtype = torch.float16 if device == "cuda" and args.dtype == "fp16" else torch.float32
    t0 = time.perf_counter()
    pipe = dt.sd15(sched=args.scheduler, unet_overrides=dt.sd15_layout(args.width, args.latent), max_length=77)
    if device != "cpu" or dtype != torch.float32:
        pipe.to(device, dtype)
    print(f"\n[{device}, {str(dtype).removeprefix('torch.')}] SD1.5-layout UNet, width {args.width}, latent "
          f"{args.latent}x{args.latent}, {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M parameters, "
          f"{args.scheduler} {args.steps} steps, CFG {args.cfg}, batch {args.batch} "
          f"(built in {time.perf_counter() - t0:.0f}s)", flush=True)

    def call():
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = pipe(prompt=["a photograph of an astronaut riding a horse"] * args.batch, num_inference_steps=args.steps,
                   guidance_scale=args.cfg, height=args.latent * dt.VAE_FACTOR, width=args.latent * dt.VAE_FACTOR,
                   output_type="latent", generator=torch.Generator(device).manual_seed(0)).images
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    variants = [("unpatched", None), ("all", ("all", True)), (f"{args.strategy} sequential", (args.strategy, False)),
                (f"{args.strategy} parallel", (args.strategy, True))]
    times = {name: [] for name, _ in variants}
    latents, reports = {}, {}
    for rep in range(args.repeats + 1):                  # repetition 0 is the warm-up
        for name, settings in variants:
            handle = apply(pipe, settings[0], parallel=settings[1], max_decoder_batch=args.max_decoder_batch) if settings else None
            try:
                out, seconds = call()
            finally:
                if handle is not None:
                    handle.remove()
            if rep:
                times[name].append(seconds)
            latents[name] = out
            if handle is not None:
                reports[name] = handle.reports[-1]
        print(f"  {'warm-up' if rep == 0 else f'repeat {rep}/{args.repeats}'} done", flush=True)

    base = latents["unpatched"]
    peak = float(base.max() - base.min())
    t_base = min(times["unpatched"])
    print(f"  {'variant':<22} {'encoder run/skipped':>19}  {'decoder batches':<20} {'time':>8} {'ratio':>6} {'PSNR':>9}")
    for name, _ in variants:
        t = min(times[name])
        r = reports.get(name)
        passes = f"{r['encoder_calls'] + r['full_calls']}/{r['cached_calls']}" if r else f"{args.steps}/0"
        batches = str(r["decoder_batches"]) if r else "-"
        p = psnr(latents[name], base, peak)
        print(f"  {name:<22} {passes:>19}  {batches:<20} {t:7.2f}s {t / t_base:5.2f}x "
              f"{'identical' if p == math.inf else f'{p:6.1f} dB':>9}")
    if not torch.equal(latents["all"], base):
        print("  WARNING: strategy 'all' is not bit-identical to the unpatched pipeline")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (CPU, and CUDA too when there is one)")
    ap.add_argument("--width", type=int, default=64, help="UNet base width (SD1.5: 320)")
    ap.add_argument("--latent", type=int, default=16, help="latent size (SD1.5 at 512 px: 64)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strategy", default="paper")
    ap.add_argument("--scheduler", default="DPMSolverMultistepScheduler")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-decoder-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp16", help="fp16 or fp32 on CUDA (CPU always runs fp32)")
    ap.add_argument("--cuda-width", type=int, default=320, help="UNet base width for the CUDA run of --device auto")
    ap.add_argument("--cuda-latent", type=int, default=64, help="latent size for the CUDA run of --device auto")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("\n[cuda] not available: skipped")
            continue
        if device == "cuda" and args.device == "auto":
            args = argparse.Namespace(**{**vars(args), "width": args.cuda_width, "latent": args.cuda_latent})
        run_device(device, args)


if __name__ == "__main__":
    main()
