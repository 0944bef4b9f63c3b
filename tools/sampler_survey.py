"""Survey: which stock samplers encoder propagation can serve, on the trained digits test model.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/sampler_survey.py [--steps 20] [--strategy uniform:2]
        [--samplers a,b] [--out FILE]          (another ComfyUI: COMFYUI_PATH=... and that host's venv python)

For every ComfyUI sampler, samples 20 digits (2 per class, same seed) with the plain model and through
FasterDiffusion Apply with each propagation, and prints the digit-classifier accuracy and the image PSNR to the
plain run: reuse; forecast as the pack runs it (it reuses where fasterdiffusion/samplers.py says forecasting
measured worse); and forecast forced on every sampler.  Samplers whose accuracy falls far are in
fasterdiffusion/samplers.py BYPASSED (they run in full).  Writes docs/quality/sampler_survey.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import testmodel as tm  # noqa: E402


def host_prefix() -> str:
    """``COMFYUI_PATH=... `` where the survey ran on another ComfyUI than the default test host."""
    d = tm.comfy_dir().resolve()
    return "" if d == (tm.REPO / ".testhost" / "ComfyUI").resolve() else f"COMFYUI_PATH={os.path.relpath(d, tm.REPO)} "


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strategy", default="uniform:2")
    ap.add_argument("--samplers", default="", help="comma-separated sampler names (default: every host sampler)")
    ap.add_argument("--out", default=str(tm.REPO / "docs" / "quality" / "sampler_survey.md"))
    args = ap.parse_args()
    tm.boot_comfy()
    import numpy as np
    import torch
    import comfy.samplers
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)   # torchsde chatter from the SDE samplers
    Apply, cu = tm.load_pack(tempfile.mkdtemp())
    model, tokens = tm.load_test_model()
    import math
    import shlex
    policy = cu.forecast_off_reason
    runs = {}
    for name in ("reuse", "forecast", "forecast always"):
        (m,) = Apply.execute(model, args.strategy, True, 32, propagation=name.split()[0])
        runs[name] = (m, m.model_options["transformer_options"][cu.KEY])
    digits = list(range(10)) * 2

    def psnr(a, b):
        mse = float(((a - b) ** 2).mean())
        return math.inf if mse == 0 else 10 * math.log10(1 / mse)
    head = (f"| sampler | plain acc | reuse acc | reuse PSNR | forecast (as run) acc | PSNR | forecast forced PSNR "
            f"| FasterDiffusion |")
    import comfyui_version
    lines = [f"# Sampler survey: digits model, {args.steps} steps, `{args.strategy}`, 20 digits, CFG 3, "
             f"ComfyUI {comfyui_version.__version__}", "",
             f"Command: `{host_prefix()}OMP_NUM_THREADS=1 {os.path.relpath(sys.executable, tm.REPO)} tools/sampler_survey.py "
             f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}`. PSNR of the images to the plain run of the same "
             "sampler; \"as run\" is what the pack does (it reuses where forecasting measured worse), \"forced\" "
             "forecasts everywhere.", "", head, "|---|---|---|---|---|---|---|---|"]
    print(head)
    for name in (args.samplers.split(",") if args.samplers else comfy.samplers.SAMPLER_NAMES):
        if name in ("dpm_fast", "dpm_adaptive"):      # adaptive step sizes: no fixed schedule to propagate on
            continue
        images = {"plain": tm.decode(tm.sample_digits(model, tokens, digits, seed=1, steps=args.steps, sampler=name))}
        for run_name, (m, _) in runs.items():
            cu.forecast_off_reason = (lambda *a: None) if run_name == "forecast always" else policy
            images[run_name] = tm.decode(tm.sample_digits(m, tokens, digits, seed=1, steps=args.steps, sampler=name))
        cu.forecast_off_reason = policy
        acc = {k: float((tm.classify(i) == np.array(digits)).mean()) for k, i in images.items()}
        db = {k: psnr(i, images["plain"]) for k, i in images.items()}
        r = runs["forecast"][1].reports[-1]          # what the pack did with forecast asked for
        why = r.get("forecast_off") or ""
        status = ("bypassed (full compute)" if r.get("bypassed") else
                  "forecast" if r.get("propagation", "reuse") != "reuse" else
                  "reuse (fresh noise every step)" if "fresh noise" in why else
                  "reuse (multistep, under 20 steps)" if "multistep" in why else f"reuse ({why})")
        lines.append(f"| {name} | {acc['plain']:.0%} | {acc['reuse']:.0%} | {db['reuse']:.1f} | {acc['forecast']:.0%} | "
                     f"{db['forecast']:.1f} | {db['forecast always']:.1f} | {status} |")
        print(lines[-1], flush=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
