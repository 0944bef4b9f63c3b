"""Which forecast? Image PSNR to the full run of the same sampler and step count, for reuse and forecast variants
(order, variable, damping, forecast parts), on the test models, through ComfyUI's own sampling.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/forecast_study.py --model digits --samples 40
    ... --only "euler 50"        (substring filter on the case names)

Writes docs/quality/forecast_<model>.md (one table: a row per sampler/steps/strategy case, a column per
variant, and equal-GPU-time plain steps).  The defaults of the engine (fasterdiffusion/forecast.py) and the
samplers where forecast runs as reuse (fasterdiffusion/samplers.py) are chosen from these tables.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402  (tools/, next to this script)

require("forecast study")
import testmodel as tm  # noqa: E402

# (sampler, steps, strategy)
CASES = [("euler", 50, "uniform:3"), ("euler", 50, "uniform:4"), ("euler", 50, "uniform:6"), ("euler", 50, "paper"),
         ("dpmpp_2m", 20, "uniform:2"), ("dpmpp_2m", 20, "uniform:3"), ("ddim", 50, "uniform:4"),
         ("ddim", 20, "uniform:2"), ("euler", 20, "uniform:2"), ("euler", 20, "uniform:3"),
         ("dpmpp_2m", 50, "uniform:4"), ("euler_ancestral", 30, "uniform:3"), ("euler_ancestral", 50, "uniform:3"),
         ("euler", 10, "uniform:2")]


def variants(forecast_module):
    REUSE, Forecast = forecast_module.REUSE, forecast_module.Forecast
    return {"reuse": REUSE, "o1 step": Forecast(1), "o2 step": Forecast(2), "o1 timestep": Forecast(1, "timestep"),
            "o1 log-sigma": Forecast(1, "log_sigma"), "o1 damp 0.5": Forecast(1, damping=0.5),
            "o1 damp 0.8": Forecast(1, damping=0.8), "o1 skips only": Forecast(1, parts="skips"),
            "o1 mid only": Forecast(1, parts="mid"), "o2 damp 0.5": Forecast(2, damping=0.5),
            "o1 clamp 1": Forecast(1, clamp=1.0), "o1 clamp 0.5": Forecast(1, clamp=0.5)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("digits", "fashion"), default="digits")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--only", default="", help="comma-separated substrings of case names")
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--cases", default="", help="space-separated sampler:steps:strategy cases instead of the "
                    "built-in list, e.g. 'euler:10:uniform:2 dpmpp_2m:12:uniform:3'")
    ap.add_argument("--name", default="", help="table name suffix: docs/quality/forecast_<model><name>.md")
    ap.add_argument("--out", default=str(tm.REPO / "docs" / "quality"))
    args = ap.parse_args()
    _, cu = tm.tool_session()
    import torch
    import comfy.sample
    import comfy.samplers
    from importlib import import_module
    engine = import_module(cu.__name__.rsplit(".", 3)[0] + ".fasterdiffusion")
    # measure forecast where the pack would fall back to reuse too (ancestral samplers): that policy comes from here
    cu.forecast_off_reason = lambda name, steps: None
    if args.model == "digits":
        model, tokens = tm.load_test_model()
        cond, size, decode = (lambda c: tm.digit_conditioning(tokens, c)), tm.LATENT_SIZE, tm.decode
    else:
        from testmodel import fashion as fm
        model, tokens = fm.load_fashion_model()
        cond, size, decode = (lambda c: fm.conditioning(tokens, c)), 16, fm.decode
    classes = [c % 10 for c in range(args.samples)]
    sampling = model.get_model_object("model_sampling")
    vs = variants(import_module(engine.__name__ + ".forecast"))
    if args.variants:
        vs = {k: v for k, v in vs.items() if k in args.variants.split(",")}

    def sample(m, sampler, steps):
        pos, neg = cond(classes)
        latent = torch.zeros(len(classes), 4, size, size)
        noise = comfy.sample.prepare_noise(latent, 1)
        sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps)
        return decode(comfy.sample.sample_custom(m, noise, 3.0, comfy.samplers.sampler_object(sampler), sigmas,
                                                 pos, neg, latent, seed=1, disable_pbar=True).float())

    def psnr(a, b):
        mse = float(((a - b) ** 2).mean())
        return math.inf if mse == 0 else 10 * math.log10(1 / mse)

    def patched(strategy, forecast):
        m, config = cu.apply_faster_diffusion(model, cu.Settings.of(strategy, True, 0, forecast))
        return m, config

    if args.cases:
        CASES[:] = [(c.split(":")[0], int(c.split(":")[1]), c.split(":", 2)[2]) for c in args.cases.split()]
    cases = [c for c in CASES if not args.only or any(w.strip() in f"{c[0]} {c[1]} {c[2]}" for w in args.only.split(","))]
    out = Path(args.out)
    table = out / f"forecast_{args.model}{args.name}.md"
    header = ["| sampler, steps, strategy | GPU time (composed) | " + " | ".join(vs) + " | plain steps at equal GPU time |",
              "|---|---|" + "---|" * len(vs) + "---|"]
    lines = []
    refs = {}
    for sampler, steps, strategy in cases:
        t0 = time.perf_counter()
        key = (sampler, steps)
        if key not in refs:
            refs[key] = sample(model, sampler, steps)
        ref = refs[key]
        gpu = engine.predicted_gpu_fraction(engine.make_plan(strategy, steps))
        cells = []
        for name, f in vs.items():
            m, config = patched(strategy, f)
            cells.append(psnr(sample(m, sampler, steps), ref))
        n = max(1, round(steps * gpu))
        plain = psnr(sample(model, sampler, n), ref)
        lines.append(f"| {sampler} {steps}, `{strategy}` | {gpu:.3f} | " + " | ".join(f"{c:.1f}" for c in cells)
                     + f" | {n} steps: {plain:.1f} |")
        print(lines[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        table.write_text("\n".join([f"# Forecast variants: {args.model} test model, {args.samples} samples, CFG 3, image "
                                    "PSNR (dB) to the full run of the same sampler and step count", "",
                                    f"Command: `OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/forecast_study.py "
                                    f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}`", "",
                                    "Variants: order (o1, o2), variable (step index, model timestep, log sigma), "
                                    "damping of the extrapolated change, forecast parts (skips only, middle only). "
                                    "GPU time: the plan's composed SD1.5 H100 time with parallel decoders, relative "
                                    "to the full run; the last column is the plain sampler at that many steps.", ""]
                                   + header + lines) + "\n")
    print(f"wrote {table}")


if __name__ == "__main__":
    main()
