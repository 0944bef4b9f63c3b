"""Old pack vs this checkout in one process: the same models, seeds and settings, variants interleaved.

    git worktree add /tmp/fd_old <commit>      # the revision to compare against
    bash tools/run.sh compare --old /tmp/fd_old  (or: .testhost/venv/bin/python tools/compare_revisions.py --old ...)

Both packs are loaded by ComfyUI's own loader under different names; per model it prints the median
sampling time of each variant relative to the baseline and whether old and new give the same latents.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402

require("compare")
import testmodel as tm  # noqa: E402


def load_old(path: str):
    import nodes
    d = Path(tempfile.mkdtemp()) / "FasterDiffusion_old"
    d.symlink_to(Path(path).resolve(), target_is_directory=True)
    if not asyncio.run(nodes.load_custom_node(str(d))):
        raise SystemExit(f"ComfyUI could not load the old pack at {path}")
    # a V1 revision exports NODE_CLASS_MAPPINGS; a V3 one registered its nodes into ComfyUI's (replacing ours there)
    module = sys.modules[str(d).replace(".", "_x_")]
    return getattr(module, "NODE_CLASS_MAPPINGS", nodes.NODE_CLASS_MAPPINGS)["FasterDiffusionApply"]


def run_apply(apply_cls, *args):
    """The Apply node of either API: V3 (a classmethod ``execute``) or V1 (an instance method ``apply``)."""
    return apply_cls.execute(*args)[0] if hasattr(apply_cls, "define_schema") else apply_cls().apply(*args)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a checkout (git worktree) of the revision to compare against")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--strategy", default="paper")
    args = ap.parse_args()
    tm.boot_comfy()
    import torch
    import comfy.sample
    torch.set_num_threads(1)
    new_apply, _ = tm.load_pack(tempfile.mkdtemp())
    old_apply = load_old(args.old)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchmark
    for name, steps, size, batch in (("digits", 50, 8, 20), ("sd15", 20, 16, 1)):
        model, pos, neg, _, _ = benchmark.build(name, "cpu", torch.float32)
        if name == "digits":
            pos, neg = tm.digit_conditioning(tm.load_test_model()[1], list(range(10)) * 2)
        latent = torch.zeros(batch, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, 7)
        variants = {"baseline": model}
        for parallel in (False, True):
            for tag, apply_cls in (("old", old_apply), ("new", new_apply)):
                label = f"{tag} {'EP+parallel' if parallel else 'EP'}"
                variants[label] = run_apply(apply_cls, model, args.strategy, parallel, 32)
        times = {k: [] for k in variants}
        outs = {}
        for _ in range(args.repeats + 1):          # the first round warms up
            for k, m in variants.items():
                t0 = time.perf_counter()
                outs[k] = comfy.sample.sample(m, noise, steps, 3.0, "euler", "normal", pos, neg, latent,
                                              seed=7, disable_pbar=True)
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["baseline"][1:])
        print(f"{name}: {steps} steps, batch {batch}, latent {size}x{size}, strategy {args.strategy}, "
              f"median of {args.repeats}")
        for k in variants:
            med = statistics.median(times[k][1:])
            print(f"  {k:16s} {med:7.3f} s  {med / base:5.3f}x baseline")
        for v in ("EP", "EP+parallel"):
            print(f"  {v}: old and new latents identical: {torch.equal(outs['old ' + v], outs['new ' + v])}")


if __name__ == "__main__":
    main()
