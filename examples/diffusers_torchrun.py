"""FasterDiffusion past one GPU with diffusers: each group's decoder steps split across the ranks of a torchrun job.

    torchrun --nproc-per-node 2 examples/diffusers_torchrun.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompt "a photograph of an astronaut riding a horse" --out astronaut.png

Every rank loads the pipeline on its own GPU (``cuda:<LOCAL_RANK>``, NCCL) and runs the *same* generation (same prompt,
seed and settings): each rank runs the key steps' encoder itself, decodes its share of each group's steps, and the
decoder outputs are all-gathered, so every rank ends with the same latents; rank 0 saves the image.  Where the split
pays and what it sends: docs/scaling.md.  Under torchrun on a machine without GPUs it runs on the CPU with ``gloo``.

``--tiny`` runs the project's tiny random-weight SD1.5-shaped pipeline instead (tests/diffusers_tiny.py; no download)
and prints each rank's stats and seconds per group (``--json-dir``: also one file per rank): the smoke test (tests/test_distributed.py) and the timing of
``tools/split_benchmark.py`` use it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fasterdiffusion.diffusers import apply  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="a diffusers model id or folder")
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse", help="(--tiny: its first 15 characters)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", default="paper", help="key steps (FasterDiffusion's grammar; 'paper' by default)")
    ap.add_argument("--propagation", default="forecast", choices=("forecast", "reuse"))
    ap.add_argument("--max-decoder-batch", type=int, default=32, help="rows per decoder call on each rank (0: no cap)")
    ap.add_argument("--out", default="out/torchrun.png", help="the image rank 0 saves")
    ap.add_argument("--tiny", action="store_true", help="the tiny test pipeline on the CPU (no download)")
    ap.add_argument("--width", type=int, default=32, help="--tiny: the UNet's base width (SD1.5's layout)")
    ap.add_argument("--latent", type=int, default=16, help="--tiny: the latent's side")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after a warm-up (--tiny)")
    ap.add_argument("--json-dir", default="", help="--tiny: write each rank's figures to DIR/rank<R>.json too (the "
                    "ranks' printed lines can interleave)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a rank waits for the others before failing")
    args = ap.parse_args()

    distributed = "RANK" in os.environ            # set by torchrun
    cuda = torch.cuda.is_available() and not args.tiny
    if cuda and distributed:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    group = None
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
        group = dist.group.WORLD
    rank = dist.get_rank() if distributed else 0
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    if args.tiny:
        torch.set_num_threads(1)
        sys.path.insert(0, str(ROOT / "tests"))
        import diffusers_tiny as dt
        pipe = dt.sd15(unet_overrides=dict(dt.sd15_layout(args.width, args.latent), attention_head_dim=4,
                                           cross_attention_dim=32))
        kw = dict(height=args.latent * dt.VAE_FACTOR, width=args.latent * dt.VAE_FACTOR)
    else:
        import diffusers
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            args.model, torch_dtype=torch.float16 if cuda else torch.float32).to(device)
        pipe.set_progress_bar_config(disable=rank != 0)
        kw = {}
    handle = apply(pipe, strategy=args.strategy, propagation=args.propagation,
                   max_decoder_batch=args.max_decoder_batch, process_group=group)

    def generate():
        generator = torch.Generator(device).manual_seed(args.seed)
        t0 = time.perf_counter()
        out = pipe(prompt=args.prompt[:15] if args.tiny else args.prompt, num_inference_steps=args.steps, generator=generator,
                   output_type="latent" if args.tiny else "pil", **kw).images
        return out, time.perf_counter() - t0

    out, seconds = generate()
    times = [generate()[1] for _ in range(args.repeats)] if args.tiny else [seconds]
    report = handle.reports[-1]
    groups = report["encoder_calls"] + report["full_calls"]
    if args.tiny:
        figures = json.dumps(dict(rank=rank, world=dist.get_world_size() if distributed else 1, seconds=min(times),
                                  per_group=min(times) / max(groups, 1), latents_sum=float(out.double().sum()),
                                  report=report))
        print(figures, flush=True)
        if args.json_dir:
            Path(args.json_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.json_dir) / f"rank{rank}.json").write_text(figures)
    elif rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out[0].save(args.out)
        print(f"saved {args.out}; {seconds:.1f}s; rank 0: {report}")
    if distributed:
        dist.barrier()              # every rank done before any tears the group down (gloo aborts otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
