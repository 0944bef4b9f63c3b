"""Which calibration criterion picks better key steps?  Drift vs output error vs uniform vs paper, both test models.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/calibration_compare.py [--budgets 5,7,9,13] [--fashion-samples 4]
    (~6 min of CPU time with the defaults)

Each model is calibrated once (euler, 50 steps, CFG 3, on seeds other than the scored ones); the output-error
pass also gives the drift matrix, so both criteria come from the same measurement.  Every plan then samples
the scored seeds with FasterDiffusion (parallel decoders, no noise injection: the key steps alone decide) and
is scored by the PSNR of its final images to the full 50-step run on the same seeds (higher is better).
Criteria: drift (encoder-feature drift), output error (the Calibrate node's output_error: each group's summed
step-weighted output change, squared), per-step output (the same without summing over the group: a
diagnostic), uniform (uniform:K with that many keys), paper (its 9 keys).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from importlib import import_module
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402  (tools/, next to this script)

require("calibration_compare")
import testmodel as tm  # noqa: E402

STEPS = 50
CFG = 3.0


def models(fashion_samples, digit_samples):
    """name -> (model, conditioning(classes), decode, latent size, calibration classes, scored classes)."""
    from testmodel import fashion
    digits, dtok = tm.load_test_model()
    fmodel, ftok = fashion.load_fashion_model()
    return {
        "digits": (digits, lambda c: tm.digit_conditioning(dtok, c), tm.decode, tm.LATENT_SIZE,
                   list(range(10)), [i % 10 for i in range(digit_samples)]),
        "fashion": (fmodel, lambda c: fashion.conditioning(ftok, c), fashion.decode, fashion.LATENT_SIZE,
                    [0, 7], [(3 * i + 1) % 10 for i in range(fashion_samples)]),
    }


def psnr(images, reference) -> float:
    """Mean over images of the PSNR (images in [0,1]) to the reference images."""
    mse = ((images - reference) ** 2).flatten(1).mean(1)
    return float(sum(99.0 if m == 0 else 10 * math.log10(1 / float(m)) for m in mse) / len(mse))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="5,7,9,13", help="key-step counts to compare, at 50 steps")
    ap.add_argument("--digit-samples", type=int, default=20)
    ap.add_argument("--fashion-samples", type=int, default=4)
    ap.add_argument("--models", default="digits,fashion")
    args = ap.parse_args()
    _, cu = tm.tool_session()
    import torch
    import comfy.samplers
    import nodes
    package = cu.__name__.rsplit(".", 3)[0]
    calibration = import_module(package + ".patches.comfy.calibrate")
    engine = import_module(package + ".fasterdiffusion")
    ks = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]
    budgets = [int(b) for b in args.budgets.split(",")]
    chosen = {name: m for name, m in models(args.fashion_samples, args.digit_samples).items()
              if name in args.models.split(",")}

    rows = []
    for name, (model, cond, decode, size, cal_classes, classes) in chosen.items():
        t0 = time.perf_counter()
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
        rec_model, rec = calibration.recording_model(model, sigmas.tolist(), stale_outputs=True)
        pos, neg = cond(cal_classes)
        latent = torch.zeros(len(cal_classes), 4, size, size)
        noise = comfy.sample.prepare_noise(latent, 1000)
        comfy.sample.sample(rec_model, noise, STEPS, CFG, "euler", "normal", pos, neg, latent, seed=1000,
                            disable_pbar=True)
        matrices = {"drift": rec.drift(), "output error": rec.output_error(),
                    "per-step output": rec.output_error(coherent=False)}
        print(f"{name}: calibrated in {time.perf_counter() - t0:.0f} s", flush=True)

        pos, neg = cond(classes)
        latent = {"samples": torch.zeros(len(classes), 4, size, size)}

        def run(strategy):
            # reuse: the criteria compared here are the paper's propagation's (forecast: the Calibrate node's
            # propagation input, tests/test_forecast.py)
            return decode(ks.execute(model, 1, STEPS, CFG, "euler", "normal", pos, neg, latent, 1.0, strategy,
                                     True, 0, 0.0, 500.0, propagation="reuse")[0]["samples"])
        reference = run("all")
        for k in budgets:
            plans = {c: engine.choose_keys(m, STEPS, k) for c, m in matrices.items()}
            uniform = engine.make_plan(f"uniform:{-(-STEPS // k)}", STEPS).keys
            if len(uniform) == k:
                plans["uniform"] = list(uniform)
            if k == len(engine.PAPER_KEYS_50):
                plans["paper"] = list(engine.PAPER_KEYS_50)
            for criterion, keys in plans.items():
                score = psnr(run(",".join(map(str, keys))), reference)
                rows.append((name, k, criterion, score, keys))
                print(f"{name:8s} {k:3d} keys  {criterion:13s} PSNR {score:6.2f}  keys {keys}", flush=True)

    print("\n| model | keys | " + " | ".join(CRITERIA) + " |\n|---|---|" + "---|" * len(CRITERIA))
    for name in chosen:
        for k in budgets:
            got = {c: s for n, b, c, s, _ in rows if n == name and b == k}
            print(f"| {name} | {k} | " + " | ".join(f"{got[c]:.2f}" if c in got else "–" for c in CRITERIA) + " |")


CRITERIA = ("drift", "output error", "per-step output", "uniform", "paper")

if __name__ == "__main__":
    main()
