"""Benchmark: baseline vs encoder propagation (EP) vs EP + parallel decoders (PEP), with the paper's reuse
propagation, and PEP with forecast propagation (the pack's default), in ComfyUI.

    bash tools/run.sh benchmark          # CPU defaults: digits + SD1.5, 10–15 min and 5 GB of memory
    python tools/benchmark.py --device cuda --dtype fp16 --models sd15,sdxl --size 64,128 --steps 50

One process, variants interleaved on the same seeds, medians of --repeats after a warm-up run; a progress line
per sampling run shows how far it is.
Per model and variant it prints: UNet time (a DIFFUSION_MODEL wrapper outside FasterDiffusion's, CUDA
synchronised), whole sampling time, the measured time ratio to the baseline, the FLOP fraction the cost
model predicts (encoder share counted by torch's FlopCounterMode on this very UNet), and fidelity to the
full run: PSNR of decoded images (digits) or of latents (peak = the baseline's range; random-weight models).
Models: ``digits`` = the trained test model; ``sd15``/``sdxl`` = ComfyUI's UNetModel with the real SD1.5 /
SDXL configurations and random fan-in weights (time does not depend on the weights); ``svd`` = SVD's image-to-video
UNet (temporal res blocks and attention) at base width ``--svd-width``, ``--frames`` frames, init latent 16x16
(``--size`` must be 16 for it).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from host_python import require  # noqa: E402  (tools/, next to this script)

require("benchmark")         # says which interpreter to use when this one has no torch
import testmodel as tm  # noqa: E402

SD15 = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
            adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
            use_linear_in_transformer=False, context_dim=768, num_heads=8,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            use_temporal_attention=False, use_temporal_resblock=False)
SDXL = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
            num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
            num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
            transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
            use_temporal_attention=False, use_temporal_resblock=False)
# SVD(-XT)'s image-to-video UNet (comfy.supported_models.SVD_img2vid and what ComfyUI detects from its checkpoint), at
# base width --svd-width (the real one: 320) and --frames frames folded into the batch
SVD = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
           num_classes="sequential", adm_in_channels=768, in_channels=8, model_channels=320, num_res_blocks=[2, 2, 2, 2],
           channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
           transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=True,
           context_dim=1024, use_temporal_attention=True, use_temporal_resblock=True, extra_ff_mix_layer=True,
           use_spatial_context=True, merge_strategy="learned_with_images", video_kernel_size=[3, 1, 1])


def build(name, device, dtype, args=None):
    """(model patcher, positive, negative, latent size) for one benchmark model."""
    import torch
    import comfy.supported_models
    if name == "digits":
        model, tokens = tm.load_test_model()
        pos, neg = tm.digit_conditioning(tokens, [7])
        return model, pos, neg, tm.LATENT_SIZE, 1
    if name == "svd":
        return build_svd(device, dtype, args.svd_width, args.frames)
    cfg, cls, ctx = (SD15, comfy.supported_models.SD15, 768) if name == "sd15" else (SDXL, comfy.supported_models.SDXL, 2048)
    mc = cls(cfg)
    mc.set_inference_dtype(dtype, None)
    model = tm.build_model_patcher(mc, seed=0, device=device)
    g = torch.Generator().manual_seed(0)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if name == "sdxl" else {}
    pos = [[torch.randn(1, 77, ctx, generator=g), dict(extra)]]
    neg = [[torch.zeros(1, 77, ctx), {k: torch.zeros_like(v) for k, v in extra.items()}]]
    return model, pos, neg, None, 1


def build_svd(device, dtype, width, frames):
    """SVD: every latent of the batch is one frame; the conditioning is SVD_img2vid_Conditioning's (CLIP-vision tokens,
    the init latent concatenated, fps / motion bucket / augmentation in the ADM vector)."""
    import torch
    import comfy.supported_models
    mc = comfy.supported_models.SVD_img2vid(dict(SVD, model_channels=width))
    mc.set_inference_dtype(dtype, None)
    model = tm.build_model_patcher(mc, seed=0, device=device)
    g = torch.Generator().manual_seed(0)
    init = torch.randn(1, 4, 16, 16, generator=g)
    extra = {"concat_latent_image": init, "fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0}
    pos = [[torch.randn(1, 1, 1024, generator=g), dict(extra)]]
    neg = [[torch.zeros(1, 1, 1024), dict(extra, concat_latent_image=torch.zeros_like(init))]]
    return model, pos, neg, None, frames


def _ldm(cu):
    """The pack's ldm adapter module, beside its patches.comfy.unet module ``cu``."""
    return import_module(cu.__name__.rsplit(".", 1)[0] + ".ldm")


def encoder_share(unet, cu, size, batch, ctx_shape, adm, device, dtype, frames=None):
    """(Encoder+bottleneck fraction of one full forward's FLOPs, counted on this UNet at this shape; bytes of one
    key step's features: what forecast propagation keeps once more per call slot).  ``frames``: a video UNet's
    frames per video (the batch holds batch // frames videos)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(batch, unet.in_channels, size, size, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    ctx = torch.randn(batch, *ctx_shape, device=device, dtype=dtype)
    y = torch.randn(batch, adm, device=device, dtype=dtype) if adm else None
    kwargs = {} if frames is None else {"num_video_frames": frames}
    with torch.no_grad():
        with FlopCounterMode(display=False) as full:
            unet(x, t, ctx, y, None, {}, **kwargs)
        with FlopCounterMode(display=False) as enc:
            ldm = _ldm(cu)
            call = ldm.make_call(x, t, ctx, y, None, {}, dict(kwargs))
            adapter = ldm.LdmUNetAdapter(unet)
            feats = adapter.encode(call, adapter.embed(call))
    kept = sum(t.numel() * t.element_size() for t in feats.skips + [feats.mid])
    return enc.get_total_flops() / full.get_total_flops(), kept


def print_decoder_memory(unet, cu, size, pos, adm, dtype, device):
    """Peak CUDA memory of one full forward (CFG batch 2) and of one batched decoder call per group width,
    over the weights: what ``max_decoder_batch`` trades against speed."""
    import torch
    ctx = pos[0][0].to(device, dtype).repeat(2, 1, 1)
    y = torch.randn(2, adm, device=device, dtype=dtype) if adm else None
    x = torch.randn(2, 4, size, size, device=device, dtype=dtype)
    t = torch.full((2,), 500.0, device=device)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 30

    full = peak(lambda: unet(x, t, ctx, y, None, {}))
    with torch.no_grad():
        ldm, runtime = _ldm(cu), import_module(cu.__name__.rsplit(".", 3)[0] + ".fasterdiffusion.runtime")
        adapter = ldm.LdmUNetAdapter(unet)
        call = ldm.make_call(x, t, ctx, y, None, {"sigmas": t}, {})
        feats = adapter.encode(call, adapter.embed(call))
    row = []
    for width in (1, 2, 4, 8, 10, 15, 16):
        steps = [(t, t)] * width
        row.append(f"x{width} ({2 * width} rows) {peak(lambda: runtime.decode_steps(adapter, call, feats, steps, 0)):.2f}")
    print(f"peak GiB above weights: full forward b2 {full:.2f}; decoder " + ", ".join(row))


START = time.perf_counter()


def progress(text):
    """One line of progress with the time since the start (the runs themselves print no bars)."""
    minutes, seconds = divmod(int(time.perf_counter() - START), 60)
    print(f"  [{minutes:2d}:{seconds:02d}] {text}", flush=True)


def injection_table(steps, sampler, cfg):
    """Prior noise injection on/off on the trained digits model: 100 samples (10 per digit), the same seeds,
    fidelity to the full run and digit-classifier accuracy."""
    import numpy as np
    import comfy.utils
    import nodes
    comfy.utils.set_progress_bar_enabled(False)   # ComfyUI's own switch: no tqdm bars in this table
    model, tokens = tm.load_test_model()
    digits = [d for d in range(10) for _ in range(10)]
    pos, neg = tm.digit_conditioning(tokens, digits)
    latent = {"samples": __import__("torch").zeros(len(digits), 4, tm.LATENT_SIZE, tm.LATENT_SIZE)}
    node = nodes.NODE_CLASS_MAPPINGS["FasterDiffusionKSampler"]
    runs = {"baseline (strategy all)": ("all", 0.0), "FD paper": ("paper", 0.0), "FD paper + injection": ("paper", 0.003)}
    images = {}
    for i, (label, (strategy, alpha)) in enumerate(runs.items()):
        progress(f"injection table: run {i + 1} of {len(runs)} ({label})")
        (out,) = node.execute(model, 5, steps, cfg, sampler, "normal", pos, neg, latent, 1.0, strategy, True, 0, alpha, 500.0)
        images[label] = tm.decode(out["samples"])
    base = images["baseline (strategy all)"]
    print(f"\n== prior noise injection (alpha 0.003, t < 500), digits model, {len(digits)} samples, {steps} steps "
          f"{sampler}, cfg {cfg}")
    print(f"{'run':24s} {'image PSNR':>10s} {'digit acc':>9s} {'HF energy':>9s}")
    for label, img in images.items():
        acc = float((tm.classify(img) == np.array(digits)).mean())
        hf = float((img[:, 1:, :] - img[:, :-1, :]).abs().mean() + (img[:, :, 1:] - img[:, :, :-1]).abs().mean())
        print(f"{label:24s} {psnr(img, base, 1.0):10.2f} {acc:9.0%} {hf:9.4f}")


def psnr(a, b, peak):
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,sd15")
    ap.add_argument("--size", default="8,16", help="latent size per model (digits is always 8)")
    ap.add_argument("--steps", default="50,20", help="steps per model")
    ap.add_argument("--strategy", default="paper")
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-decoder-batch", type=int, default=32, help="the node's memory cap (samples per call)")
    ap.add_argument("--svd-width", type=int, default=64, help="svd: the UNet's base width (SVD: 320)")
    ap.add_argument("--frames", type=int, default=4, help="svd: frames per video (SVD: 14, SVD-XT: 25)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--no-injection", action="store_true", help="skip the injection on/off table (digits model)")
    ap.add_argument("--memory", action="store_true",
                    help="CUDA only: also print peak memory of one batched decoder call per group width")
    args = ap.parse_args()

    tm.boot_comfy(cpu=args.device == "cpu")
    import torch
    import comfy.patcher_extension
    import comfy.sample
    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    Apply, cu = tm.load_pack(tempfile.mkdtemp())
    names = args.models.split(",")
    sizes = [int(s) for s in args.size.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"device {args.device} {args.dtype}, threads {torch.get_num_threads()}, strategy {args.strategy!r}, "
          f"sampler {args.sampler}, cfg {args.cfg}, median of {args.repeats} interleaved runs after a warm-up")

    for i, name in enumerate(names):
        model, pos, neg, fixed_size, batch = build(name, args.device if name != "digits" else None, dtype, args)
        size = fixed_size or sizes[min(i, len(sizes) - 1)]
        steps = steps_list[min(i, len(steps_list) - 1)]
        unet_time = [0.0]

        def timed(executor, *a, **kw):
            sync()
            t0 = time.perf_counter()
            out = executor(*a, **kw)
            sync()
            unet_time[0] += time.perf_counter() - t0
            return out

        timed_model = model.clone()
        timed_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_timer", timed)
        variants = {"baseline": timed_model}
        for label, parallel, propagation in (("EP", False, "reuse"), ("EP+parallel", True, "reuse"),
                                             ("forecast", True, "forecast")):
            (variants[label],) = Apply.execute(timed_model, args.strategy, parallel, args.max_decoder_batch,
                                               propagation=propagation)
        config = variants["EP+parallel"].model_options["transformer_options"][cu.KEY]
        latent = torch.zeros(batch, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, 42)
        unet = model.model.diffusion_model
        adm = unet.label_emb[0][0].in_features if unet.num_classes == "sequential" else 0
        share, kept_bytes = encoder_share(unet, cu, size, 2 * batch, pos[0][0].shape[1:], adm,
                                          next(unet.parameters()).device, model.model_dtype(),
                                          batch if name == "svd" else None)

        times = {k: ([], []) for k in variants}
        outs = {}
        for rep in range(args.repeats + 1):
            for label, m in variants.items():
                progress(f"{name}: {'warm-up' if rep == 0 else f'repeat {rep} of {args.repeats}'}, {label}")
                unet_time[0] = 0.0
                sync()
                t0 = time.perf_counter()
                outs[label] = comfy.sample.sample(m, noise, steps, args.cfg, args.sampler, "normal", pos, neg, latent,
                                                  seed=42, disable_pbar=True)
                sync()
                if rep:                                        # rep 0 is the warm-up
                    times[label][0].append(unet_time[0])
                    times[label][1].append(time.perf_counter() - t0)

        from fasterdiffusion import make_plan, predicted_cost_fraction
        plan = make_plan(args.strategy, steps)
        predicted = predicted_cost_fraction(plan, share)
        base_unet = statistics.median(times["baseline"][0])
        base = outs["baseline"]
        if name == "digits":
            imgs = {k: tm.decode(v) for k, v in outs.items()}
            fid = {k: psnr(v, imgs["baseline"], 1.0) for k, v in imgs.items()}
            fid_label = "image PSNR"
        else:
            peak = float(base.max() - base.min())
            fid = {k: psnr(v, base, peak) for k, v in outs.items()}
            fid_label = "latent PSNR"
        print(f"\n== {name}: latent {size}x{size}, batch {batch} (+CFG), {steps} steps; {plan.describe()}; "
              f"encoder+middle = {share:.1%} of UNet FLOPs; parallel decoder batches {config.reports[-1]['decoder_batches']}; "
              f"forecast keeps one more key step's features per call slot: {kept_bytes / 2 ** 20:.2f} MiB (CFG batch)")
        print(f"{'variant':12s} {'UNet s':>8s} {'total s':>8s} {'UNet ratio':>10s} {'FLOP pred':>9s} {fid_label:>11s}")
        for label in variants:
            u = statistics.median(times[label][0])
            tot = statistics.median(times[label][1])
            pred = 1.0 if label == "baseline" else predicted
            label_text = "PEP+forecast" if label == "forecast" else label
            print(f"{label_text:12s} {u:8.3f} {tot:8.3f} {u / base_unet:10.3f} {pred:9.3f} {fid[label]:11.2f}")
        if args.memory and cuda:
            print_decoder_memory(unet, cu, size, pos, adm, model.model_dtype(), args.device)
        del variants, timed_model, model
        if cuda:
            torch.cuda.empty_cache()
    if "digits" in names and not args.no_injection:
        injection_table(50, args.sampler, 3.0)


if __name__ == "__main__":
    main()
