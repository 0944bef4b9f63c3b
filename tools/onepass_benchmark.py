"""TiUE one-pass students vs their teacher on the digits test model: quality and cost.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/onepass_benchmark.py [--samples 600] [--out docs/quality]   (~10 min)

Every configuration samples the same digits and seeds through ComfyUI (the one-pass rows through the
FasterDiffusion One-Pass node, the teacher rows through KSampler / FasterDiffusion KSampler) and is scored as in
``tools/quality_benchmark.py``: FD-digits (Frechet distance in a digits-MLP feature space, lower is better), the
accuracy of a separate digits classifier, wall time, and UNet FLOPs counted by torch over one sample's run,
relative to the teacher's 50-step euler run with CFG 3; plus *speckle*: the mean squared Laplacian of the 16x16
images relative to the real digits' (1 = as smooth as real digits; FD-digits works on 2x2-pooled images and
hardly sees pixel noise).  Rows:
  * the teacher: 50 euler steps (CFG 3); DDIM with K = 4 and 8 steps (``ddim`` + ``ddim_uniform``: the timesteps
    751, 501, 251, 1 at 4), CFG 3 and without CFG;
  * the teacher with FasterDiffusion at similar cost: DDIM 4 steps, only step 0 a key step (one encoder pass and
    four decoders per guidance branch: the same work as one pass, twice for CFG), and keys 0,2;
  * one pass (K = 4, no CFG) of the undistilled teacher, of the committed student
    (testmodel/digits_tiue_student.safetensors), and of the KL ablation (``--ablation``, if that file exists).
Writes ``onepass.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))
from host_python import require  # noqa: E402

require("quality")
import testmodel as tm  # noqa: E402

STUDENT = tm.REPO / "testmodel" / "digits_tiue_student.safetensors"
ABLATION = tm.REPO / "out" / "tiue" / "digits_tiue_student_nokl.safetensors"


def quality_module():
    spec = spec_from_file_location("quality_benchmark", TOOLS / "quality_benchmark.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--student", default=str(STUDENT))
    ap.add_argument("--ablation", default=str(ABLATION), help="the student trained with --kl 0 (row skipped if absent)")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=PATH",
                    help="one more one-pass row: a student safetensors (e.g. an earlier checkpoint's export)")
    ap.add_argument("--out", default=str(tm.REPO / "docs" / "quality"))
    args = ap.parse_args()
    tm.tool_session()
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import nodes
    qb = quality_module()
    features, real = qb.feature_space()
    teacher, tokens = tm.load_test_model()
    one_pass_node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionOnePass"]
    fd_ksampler = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]
    digits = [d % 10 for d in range(args.samples)]

    def latent(n):
        return {"samples": torch.zeros(n, 4, tm.LATENT_SIZE, tm.LATENT_SIZE)}

    def ksampler(steps, cfg, sampler="euler", scheduler="normal"):
        return lambda digs, seed: tm.sample_digits(teacher, tokens, digs, seed=seed, steps=steps, cfg=cfg,
                                                   sampler=sampler, scheduler=scheduler)

    def fd(steps, strategy, cfg=3.0):
        def run(digs, seed):
            pos, neg = tm.digit_conditioning(tokens, digs)
            return fd_ksampler.execute(teacher, seed, steps, cfg, "ddim", "ddim_uniform", pos, neg, latent(len(digs)), 1.0,
                                      strategy, True, 0, 0.0, 500.0)[0]["samples"]
        return run

    def one_pass(model, k=4):
        def run(digs, seed):
            pos, _ = tm.digit_conditioning(tokens, digs)
            return one_pass_node.execute(model, pos, latent(len(digs)), seed, k, 0)[0]["samples"]
        return run

    configs = {
        "teacher, euler 50 steps, CFG 3": ksampler(50, 3.0),
        "teacher, euler 50 steps, no CFG": ksampler(50, 1.0),
        "teacher, DDIM 8 steps, CFG 3": ksampler(8, 3.0, "ddim", "ddim_uniform"),
        "teacher, DDIM 4 steps, CFG 3": ksampler(4, 3.0, "ddim", "ddim_uniform"),
        "teacher, DDIM 4 steps, no CFG": ksampler(4, 1.0, "ddim", "ddim_uniform"),
        "teacher, FasterDiffusion DDIM 4 steps, keys 0 (CFG 3)": fd(4, "0"),
        "teacher, FasterDiffusion DDIM 4 steps, keys 0,2 (CFG 3)": fd(4, "0,2"),
        "teacher, one pass K=4 (undistilled)": one_pass(teacher),
    }
    students = [("student, one pass K=4", Path(args.student)), ("student without KL, one pass K=4", Path(args.ablation))]
    extras = [(label + ", one pass K=4", Path(path)) for label, path in (e.split("=", 1) for e in args.extra)]
    students += extras
    grid_stems = {"teacher, one pass K=4 (undistilled)": "teacher", "student, one pass K=4": "student",
                  "student without KL, one pass K=4": "student_nokl"}
    for name, path in students:
        if path.is_file():
            configs[name] = one_pass(tm.load_test_model(path)[0])
        else:
            print(f"({name}: {path} not found, row skipped)")

    import torch.nn.functional as F
    laplace = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)

    def hf(images):
        return float(F.conv2d(images.float().unsqueeze(1), laplace).pow(2).mean())
    real_hf = hf(tm.digits_dataset()[0])

    def flops(run):
        with FlopCounterMode(display=False) as fc:
            run([3], 77)
        return fc.get_total_flops()

    base_flops = flops(configs["teacher, euler 50 steps, CFG 3"])
    rows = []
    for name, run in configs.items():
        t0 = time.perf_counter()
        images = tm.decode(run(digits, 1))
        seconds = time.perf_counter() - t0
        rows.append(dict(name=name, cost=flops(run) / base_flops, seconds=seconds,
                         fd=qb.frechet(features(qb.to8(images)), real),
                         acc=float((tm.classify(images) == np.array(digits)).mean()), speckle=hf(images) / real_hf))
        print(f"{name:58s} FLOPs {rows[-1]['cost']:.4f}  FD-digits {rows[-1]['fd']:7.2f}  acc {rows[-1]['acc']:.1%}  "
              f"speckle {rows[-1]['speckle']:5.2f}  {seconds:6.1f}s", flush=True)
        if name in grid_stems and args.samples >= 100:      # a grid of the first 100 (10 of each digit)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            tm.save_grid(images[:100], Path(args.out) / f"onepass_{grid_stems[name]}.png")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# TiUE one pass vs the teacher on the digits test model ({args.samples} samples)", "",
             "Command: `OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/onepass_benchmark.py "
             + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "`",
             "", "FD-digits and accuracy as in quality.md (the 50-step baseline's FD-digits varies by about 2 between "
             "seed sets); UNet FLOPs relative to the teacher's 50-step CFG run; wall time on one CPU thread; speckle = mean "
             "squared Laplacian of the images over the real digits'.", "",
             "| configuration | UNet FLOPs | wall s | FD-digits ↓ | accuracy | speckle (real = 1) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['cost']:.4f} | {r['seconds']:.1f} | {r['fd']:.2f} | {r['acc']:.1%} | "
                     f"{r['speckle']:.2f} |")
    (out / "onepass.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'onepass.md'}")


if __name__ == "__main__":
    main()
