"""FasterDiffusion on every diffusers model family it serves: unpatched vs patched, CPU time ratio and fidelity.

    bash tools/run.sh models                        # every family, CPU, one thread (a few minutes)
    bash tools/run.sh models --models svd,if1 --repeats 3
    bash tools/run.sh models --models dit_xl2_w288  # one family (the case names: an unknown one lists them)

Each family is a *small real-shaped* random-weight pipeline: the real model's block and attention layout, its
base width reduced so one unpatched CPU call takes seconds (built by ``bench_cases()`` of the test builders in
``tests/diffusers_tiny*.py``; the denoiser is the pipeline's UNet, or DiT's transformer).  Per family it runs the
unpatched pipeline, strategy ``all`` (must be bit-identical), and the family's strategy with sequential and parallel
decoders (forecast propagation, the default), interleaved, the fastest of ``--repeats`` calls after a warm-up (on a
shared CPU the fastest is the least disturbed).  It prints encoder passes run / skipped, decoder batches, the time
ratio to the unpatched call and the latent PSNR against the unpatched latent (peak = that latent's range).  Random
weights: time does not depend on them, fidelity does, so the PSNR only shows that the patched pipeline follows the
unpatched one.
``--out FILE`` also writes the table as Markdown.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# the test builders (tests/) whose bench_cases() give name -> (build, call kwargs[, strategy: default "paper"[,
# latent_of_call(pipe, kwargs): the call's latent, for a pipeline without a latent output (DiT)]])
BUILDERS = ("diffusers_tiny_if", "diffusers_tiny_video", "diffusers_tiny_motion", "diffusers_tiny_controlnet",
            "diffusers_tiny_dit")


def psnr(a, b, peak):
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def cases() -> dict:
    """name -> (build, call kwargs, strategy, latent_of_call) of every builder module that is present."""
    out = {}
    for name in BUILDERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        for case, entry in module.bench_cases().items():
            build, kwargs, *rest = entry
            out[case] = (build, kwargs, rest[0] if rest else "paper", rest[1] if len(rest) > 1 else output_latent)
    return out


def latent_of(output):
    for key in ("images", "frames"):
        if hasattr(output, key):
            return getattr(output, key)
    return output[0]


def output_latent(pipe, kwargs):
    """The latent a pipeline call returns (output_type "latent", or IF's "pt": its pixels are its latent)."""
    return latent_of(pipe(**kwargs))


def run_case(name, build, kwargs, strategy, latent_of_call, args):
    import torch
    from fasterdiffusion.diffusers import apply, denoiser_of
    t0 = time.perf_counter()
    pipe = build()
    denoiser = denoiser_of(pipe)
    params = sum(p.numel() for p in denoiser.parameters()) / 1e6
    print(f"\n[{name}] {type(pipe).__name__}, {type(denoiser).__name__} {params:.1f}M parameters, "
          f"{type(pipe.scheduler).__name__}, strategy {strategy} (built in {time.perf_counter() - t0:.0f}s)", flush=True)

    def call():
        t = time.perf_counter()
        kw = dict(kwargs)
        kw["generator"] = torch.Generator().manual_seed(0)
        out = latent_of_call(pipe, kw)
        return out, time.perf_counter() - t

    variants = [("unpatched", None), ("all", ("all", True)), (f"{strategy} sequential", (strategy, False)),
                (f"{strategy} parallel", (strategy, True))]
    times = {v: [] for v, _ in variants}
    latents, reports = {}, {}
    for rep in range(args.repeats + 1):                  # repetition 0 is the warm-up
        for v, settings in variants:
            handle = apply(pipe, settings[0], parallel=settings[1]) if settings else None
            try:
                out, seconds = call()
            finally:
                if handle is not None:
                    handle.remove()
            if rep:
                times[v].append(seconds)
            latents[v] = out
            if handle is not None:
                reports[v] = handle.reports[-1]
    base = latents["unpatched"]
    peak = float(base.max() - base.min())
    t_base = min(times["unpatched"])
    rows = []
    for v, _ in variants:
        r = reports.get(v)
        passes = f"{r['encoder_calls'] + r['full_calls']}/{r['cached_calls']}" if r else "-"
        p = psnr(latents[v], base, peak)
        rows.append((name, v, passes, str(r["decoder_batches"]) if r else "-", min(times[v]), min(times[v]) / t_base,
                     "identical" if p == math.inf else f"{p:.1f} dB", (r or {}).get("bypassed")))
    for row in rows:
        print(f"  {row[1]:<24} encoder {row[2]:>7}  batches {row[3]:<16} {row[4]:6.2f}s {row[5]:5.2f}x {row[6]:>10}"
              + (f"  BYPASSED: {row[7]}" if row[7] else ""), flush=True)
    if not torch.equal(latents["all"], base):
        print("  WARNING: strategy 'all' is not bit-identical to the unpatched pipeline")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated case names (default: every case)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", help="also write the table as Markdown to this file")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    available = cases()
    wanted = [m for m in args.models.split(",") if m] or list(available)
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(available)}")
    rows = []
    with torch.no_grad():
        for name in wanted:
            rows += run_case(name, *available[name], args)
    if args.out:
        lines = ["# FasterDiffusion in diffusers: every model family, unpatched vs patched", "",
                 f"`{' '.join(['python', 'tools/diffusers_models_benchmark.py'] + sys.argv[1:])}` (CPU, "
                 f"{torch.get_num_threads()} thread(s), fastest of {args.repeats} calls after a warm-up; small "
                 "real-shaped random-weight pipelines from the test builders' `bench_cases()`: time does not depend "
                 "on the weights, fidelity does, so the PSNR only shows that the patched pipeline follows the "
                 "unpatched one).", "",
                 "| case | variant | encoder run/skipped | decoder batches | CPU time | ratio | latent PSNR |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} s | {r[5]:.2f}x | {r[6]} |" for r in rows]
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
