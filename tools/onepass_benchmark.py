"""TiUE one-pass students vs their teacher's few steps on the two trained test models: quality and cost.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/onepass_benchmark.py [--model digits|fashion] [--samples 600]

Every configuration samples the same classes and seeds through ComfyUI (the one-pass rows through the
FasterDiffusion One-Pass node, the teacher rows through ``comfy.sample`` / FasterDiffusion KSampler) and is scored
as in ``tools/quality_benchmark.py``: FD (Frechet distance in the model's feature space, FD-digits or FD-fashion;
lower is better), the accuracy of a separate classifier, wall time, and UNet FLOPs counted by torch over one
sample's run, relative to the teacher's 50-step euler run with CFG 3; plus *speckle*: the mean squared Laplacian
of the images relative to the real images' (1 = as smooth as real images; FD hardly sees pixel noise).  The
few-step rows (and every one-pass row) are also scored on two more seed sets: the FD spread column.  Rows:
  * the teacher: 50 euler steps (CFG 3 and none); DDIM with K = 4 and 8 steps (``ddim`` + ``ddim_uniform``),
    CFG 3 and none;
  * the teacher with FasterDiffusion at similar cost: DDIM 4 steps, only step 0 a key step (one encoder pass and
    four decoders per guidance branch: the same work as one pass, twice for CFG), and keys 0,2;
  * one pass (K = 4, no CFG) of the undistilled teacher and of the committed student
    (testmodel/<model>_tiue_student.safetensors), and of any ``--extra LABEL=PATH`` student.
Writes ``onepass.md`` (digits) or ``onepass_fashion.md`` into ``--out``, and sample grids of the one-pass rows.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))
from host_python import require  # noqa: E402

require("onepass")
import testmodel as tm  # noqa: E402

STUDENTS = {"digits": tm.REPO / "testmodel" / "digits_tiue_student.safetensors",
            "fashion": tm.REPO / "testmodel" / "fashion_tiue_student.safetensors"}
TABLES = {"digits": "onepass", "fashion": "onepass_fashion"}
SPREAD_SEEDS = (2, 3)        # the extra seed sets of the cheap rows


def load_student(model, path):
    if model == "digits":
        return tm.load_test_model(path)[0]
    from testmodel import fashion as fm
    return fm.load_fashion_model(path)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(STUDENTS), default="digits")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--student", default="", help="the student row's safetensors (default: the committed one)")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=PATH",
                    help="one more one-pass row: a student safetensors (e.g. an earlier checkpoint's export)")
    ap.add_argument("--skip", action="append", default=[], metavar="TEXT",
                    help="leave out the rows whose name contains TEXT (e.g. '50 steps' on a slow CPU; FLOPs stay "
                         "relative to the 50-step run, counted on one sample)")
    ap.add_argument("--out", default=str(tm.REPO / "docs" / "quality"))
    args = ap.parse_args()
    tm.tool_session()
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import comfy.sample
    import nodes
    import quality_benchmark as qb
    kit = (qb.Digits if args.model == "digits" else qb.Fashion)("cpu")
    teacher = kit.model
    one_pass_node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionOnePass"]
    fd_ksampler = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]
    classes = [c % 10 for c in range(args.samples)]

    def latent(n):
        return torch.zeros(n, 4, kit.latent_size, kit.latent_size)

    def ksampler(steps, cfg, sampler="euler", scheduler="normal"):
        def run(labels, seed):
            pos, neg = kit.conditioning(labels)
            noise = comfy.sample.prepare_noise(latent(len(labels)), seed)
            return comfy.sample.sample(teacher, noise, steps, cfg, sampler, scheduler, pos, neg, latent(len(labels)),
                                       seed=seed, disable_pbar=True)
        return run

    def fd(steps, strategy, cfg=3.0):
        def run(labels, seed):
            pos, neg = kit.conditioning(labels)
            return fd_ksampler.execute(teacher, seed, steps, cfg, "ddim", "ddim_uniform", pos, neg,
                                       {"samples": latent(len(labels))}, 1.0, strategy, True, 0, 0.0, 500.0)[0]["samples"]
        return run

    def one_pass(model, k=4):
        def run(labels, seed):
            pos, _ = kit.conditioning(labels)
            return one_pass_node.execute(model, pos, {"samples": latent(len(labels))}, seed, k, 0)[0]["samples"]
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
    grid_stems = {"teacher, one pass K=4 (undistilled)": "teacher", "student, one pass K=4": "student"}
    students = [("student, one pass K=4", Path(args.student) if args.student else STUDENTS[args.model])]
    for label, path in (e.split("=", 1) for e in args.extra):
        students.append((label + ", one pass K=4", Path(path)))
    for name, path in students:
        if path.is_file():
            configs[name] = one_pass(load_student(args.model, path))
        else:
            print(f"({name}: {path} not found, row skipped)")

    def flops(run):
        with FlopCounterMode(display=False) as fc:
            run([3], 77)
        return fc.get_total_flops()

    def score(images):
        return qb.frechet(kit.features(images), kit.real)

    base_flops = flops(configs["teacher, euler 50 steps, CFG 3"])
    prefix = "onepass_" if args.model == "digits" else "onepass_fashion_"
    rows = []
    for name, run in configs.items():
        if any(text in name for text in args.skip):
            continue
        t0 = time.perf_counter()
        images = kit.decode(run(classes, 1))
        seconds = time.perf_counter() - t0
        cost = flops(run) / base_flops
        row = dict(name=name, cost=cost, seconds=seconds, fd=score(images),
                   acc=float((kit.classify(images) == np.array(classes)).mean()),
                   speckle=qb.speckle(kit, images), spread="")
        if cost <= 0.2:           # cheap: two more seed sets
            fds = [row["fd"]] + [score(kit.decode(run(classes, s))) for s in SPREAD_SEEDS]
            row["spread"] = f"{min(fds):.1f}–{max(fds):.1f}"
        rows.append(row)
        print(f"{name:58s} FLOPs {cost:.4f}  {kit.fd_name} {row['fd']:7.2f} ({row['spread']})  acc {row['acc']:.1%}  "
              f"speckle {row['speckle']:5.2f}  {seconds:6.1f}s", flush=True)
        if name in grid_stems and args.samples >= 100:      # a grid of the first 100 (10 of each class)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            tm.save_grid(images[:100], Path(args.out) / f"{prefix}{grid_stems[name]}.png")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/onepass_benchmark.py " + \
        " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"# TiUE one pass vs the teacher's few steps: {kit.title} ({args.samples} samples)", "",
             f"Command: `{command.strip()}`", "",
             f"{kit.fd_name} and accuracy as in the quality tables; the spread column is {kit.fd_name} over seed sets 1, "
             f"{', '.join(map(str, SPREAD_SEEDS))} (rows costing at most 0.2); UNet FLOPs relative to the teacher's "
             "50-step CFG run; wall time on one CPU thread; speckle = mean squared Laplacian of the images over the "
             "real images'.", "",
             f"| configuration | UNet FLOPs | wall s | {kit.fd_name} ↓ | {kit.fd_name} over 3 seed sets | accuracy | "
             "speckle (real = 1) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['cost']:.4f} | {r['seconds']:.1f} | {r['fd']:.2f} | {r['spread']} | "
                     f"{r['acc']:.1%} | {r['speckle']:.2f} |")
    path = out / f"{TABLES[args.model]}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
