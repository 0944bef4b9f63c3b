"""Survey: which stock samplers encoder propagation can serve, on the trained digits test model.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/sampler_survey.py [--steps 20] [--strategy paper]

For every ComfyUI sampler, samples 20 digits (2 per class, same seed) with the plain model and through
FasterDiffusion Apply, and prints the digit-classifier accuracy of both and the relative image difference.
Samplers whose accuracy falls far are in fasterdiffusion/samplers.py BYPASSED (they run in full).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import testmodel as tm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--strategy", default="paper")
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
    (fd,) = Apply.execute(model, args.strategy, True, 32)
    config = fd.model_options["transformer_options"][cu.KEY]
    digits = list(range(10)) * 2
    print(f"{'sampler':30s} {'plain':>6s} {'FD':>6s} {'rel diff':>8s}  FasterDiffusion")
    for name in comfy.samplers.SAMPLER_NAMES:
        if name in ("dpm_fast", "dpm_adaptive"):      # adaptive step sizes: no fixed schedule to propagate on
            continue
        images = [tm.decode(tm.sample_digits(m, tokens, digits, seed=1, steps=args.steps, sampler=name))
                  for m in (model, fd)]
        acc = [float((tm.classify(i) == np.array(digits)).mean()) for i in images]
        diff = float((images[1] - images[0]).norm() / images[0].norm())
        status = "bypassed (full compute)" if config.reports[-1].get("bypassed") else "propagated"
        print(f"{name:30s} {acc[0]:6.0%} {acc[1]:6.0%} {diff:8.3f}  {status}", flush=True)


if __name__ == "__main__":
    main()
