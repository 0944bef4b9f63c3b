"""ControlNet benchmark: SD1.5 UNet + SD1.5 ControlNet in ComfyUI, baseline vs FasterDiffusion with and without
ControlNet reuse.

    bash tools/run.sh controlnet                     # CPU: ~4.5 min of one core (build 1 min), 5 GB
    COMFYUI_PATH=/path/to/ComfyUI python tools/controlnet_benchmark.py --device cuda --dtype fp16 --size 64 --steps 50

Both networks are ComfyUI's own classes with the real SD1.5 configuration (``tools/benchmark.py``'s) and random
fan-in weights (time does not depend on the weights): ``UNetModel`` and ``comfy.cldm.cldm.ControlNet`` (hint 3 x 8H
x 8W), applied with ComfyUI's ControlNetApplyAdvanced node (strength 1, 0 - 100 %).  Rows, interleaved on the
same seed, medians of --repeats after a warm-up run (of all steps on cuda, of 2 steps on cpu, where there is
no autotuning to absorb and a full warm-up would double the run time):
  baseline             the plain model
  paper, reuse off     FasterDiffusion 'paper': the ControlNet runs every step, decoders one step at a time
  paper, reuse on      the ControlNet runs at key steps only; non-key decoders reuse its residuals, in parallel
Columns: UNet+ControlNet seconds (a CALC_COND_BATCH wrapper outside FasterDiffusion's, which holds everything
ComfyUI runs for a model call: the ControlNet and the UNet; CUDA synchronised), its ratio to the baseline, whole
sampling seconds, ControlNet forwards per run, decoder batches, latent PSNR to the baseline (peak = the
baseline's range).  Prints a markdown table and a JSON object to stdout, and writes the JSON to --out.
Needs only ComfyUI (COMFYUI_PATH, or the test host), torch and numpy, and this pack.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))
from host_python import require  # noqa: E402

require("controlnet")
import testmodel as tm  # noqa: E402
from benchmark import SD15, psnr  # noqa: E402  (tools/benchmark.py: the SD1.5 UNet configuration)

VARIANTS = {"baseline": None, "paper, reuse off": False, "paper, reuse on": True}


def sd15_controlnet(device, dtype, seed=1):
    """ComfyUI's CONTROL_NET around a random-weight SD1.5 ``comfy.cldm.cldm.ControlNet``."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    cfg = {k: v for k, v in SD15.items() if k not in ("out_channels", "use_temporal_attention", "use_temporal_resblock")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=dtype, device=device,
                                     operations=comfy.ops.disable_weight_init, **cfg)
    tm.fan_in_init_(net, seed).requires_grad_(False)
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device())


def sd15_model(device, dtype):
    import comfy.supported_models
    mc = comfy.supported_models.SD15(dict(SD15))
    mc.set_inference_dtype(dtype, None)
    return tm.build_model_patcher(mc, seed=0, device=device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--size", type=int, default=16, help="latent size (64 = 512x512 images)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per variant after one warm-up run")
    ap.add_argument("--warmup-steps", type=int, help="steps of the warm-up run (default: --steps on cuda, 2 on cpu)")
    ap.add_argument("--strategy", default="paper")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    t_start = time.perf_counter()

    tm.boot_comfy(cpu=args.device == "cpu")
    import torch
    import comfy.patcher_extension
    import comfy.sample
    import nodes
    if args.device == "cpu":
        torch.set_num_threads(1)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    Apply, cu = tm.load_pack(tempfile.mkdtemp())

    model = sd15_model(args.device, dtype)
    control = sd15_controlnet(args.device, dtype)
    forwards = [0]
    control.control_model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.zeros(1, 77, 768), {}]]
    hint = torch.rand(1, 8 * args.size, 8 * args.size, 3, generator=g)
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 1.0, 0.0, 1.0)

    model_seconds = [0.0]

    def timed(executor, *a, **kw):
        sync()
        t0 = time.perf_counter()
        out = executor(*a, **kw)
        sync()
        model_seconds[0] += time.perf_counter() - t0
        return out

    timed_model = model.clone()
    timed_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "bench_timer", timed)
    variants, configs = {}, {}
    for label, reuse in VARIANTS.items():
        if reuse is None:
            variants[label] = timed_model
        else:
            (variants[label],) = Apply.execute(timed_model, args.strategy, True, 32, controlnet_reuse=reuse)
            configs[label] = variants[label].model_options["transformer_options"][cu.KEY]
    latent = torch.zeros(1, 4, args.size, args.size)
    noise = comfy.sample.prepare_noise(latent, 42)
    built = time.perf_counter() - t_start

    times = {label: ([], []) for label in variants}
    counts, outs = {}, {}
    warmup_steps = args.warmup_steps or (args.steps if cuda else min(2, args.steps))
    for rep in range(args.repeats + 1):
        for label, m in variants.items():
            model_seconds[0], forwards[0] = 0.0, 0
            sync()
            t0 = time.perf_counter()
            outs[label] = comfy.sample.sample(m, noise, args.steps if rep else warmup_steps, args.cfg, "euler",
                                              "normal", pos, neg, latent, seed=42, disable_pbar=True)
            sync()
            counts[label] = forwards[0]
            if rep:                                   # rep 0 is the warm-up
                times[label][0].append(model_seconds[0])
                times[label][1].append(time.perf_counter() - t0)
            print(f"  [{time.perf_counter() - t_start:6.1f}s] {'warm-up' if rep == 0 else f'repeat {rep}'}: {label}",
                  file=sys.stderr, flush=True)

    base = outs["baseline"].float()
    peak = float(base.max() - base.min())
    base_s = statistics.median(times["baseline"][0])
    rows = []
    for label in variants:
        report = configs[label].reports[-1] if label in configs else {}
        s = statistics.median(times[label][0])
        rows.append({"variant": label, "unet_controlnet_s": round(s, 4), "ratio": round(s / base_s, 3),
                     "sampling_s": round(statistics.median(times[label][1]), 4),
                     "controlnet_forwards": counts[label], "decoder_batches": report.get("decoder_batches"),
                     "latent_psnr": None if label == "baseline" else round(psnr(outs[label], base, peak), 2)})
    keys = configs["paper, reuse on"].reports[-1]["keys"]
    result = {"device": args.device + (f" ({torch.cuda.get_device_name()})" if cuda else
                                       f" ({torch.get_num_threads()} thread)"),
              "dtype": args.dtype, "latent": args.size, "steps": args.steps, "cfg": args.cfg, "sampler": "euler",
              "strategy": args.strategy, "keys": keys, "repeats": args.repeats, "torch": torch.__version__,
              "build_s": round(built, 1), "total_s": round(time.perf_counter() - t_start, 1), "rows": rows}
    print(markdown(result))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def markdown(r) -> str:
    lines = [f"SD1.5 UNet + SD1.5 ControlNet (random weights), {r['device']} {r['dtype']}, latent {r['latent']}x"
             f"{r['latent']}, {r['steps']} steps euler, CFG {r['cfg']}, strategy {r['strategy']} (keys {r['keys']}), "
             f"median of {r['repeats']} after a warm-up",
             "",
             "| variant | UNet+ControlNet s | ratio | sampling s | ControlNet forwards | decoder batches | latent PSNR |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for row in r["rows"]:
        psnr_text = "-" if row["latent_psnr"] is None else f"{row['latent_psnr']:.2f}"
        lines.append(f"| {row['variant']} | {row['unet_controlnet_s']:.3f} | {row['ratio']:.3f} | {row['sampling_s']:.3f} "
                     f"| {row['controlnet_forwards']} | {row['decoder_batches'] or '-'} | {psnr_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
