"""Train the Flux-shaped Fashion-MNIST test model:  python -m testmodel.train_fashion_flux [--device cuda]

The committed model was trained on this project's CPU, one thread, seed 1234 (command, steps, time, loss curve and
sample accuracy are in ``fashion_flux_train_log.json``):
  OMP_NUM_THREADS=1 .testhost/venv/bin/python -m testmodel.train_fashion_flux --steps 2400 --batch 64 --max-minutes 49
--max-minutes stopped it at step 1900 of 2400 after 50.4 min (the 2 cores were shared with other jobs; ~1.2-3 s per
step); the EMA weights then sample 97 % class accuracy (20 euler steps, CFG 3).  ``--measure 10`` only times 10 steps (nothing saved), to choose --steps for a time budget.
It trains as ComfyUI samples Flux: sigma drawn from the ModelPatcher's own ModelSamplingFlux table (shift 1.15),
x_t = (1 - sigma) x0 + sigma eps, the model predicts eps - x0 (CONST: denoised = x_t - sigma * output); AdamW,
cosine LR with warm-up, class labels dropped to the null set with p 0.1 (CFG); EMA weights, saved fp16.
Uses the Fashion-MNIST data and the committed classifier of ``testmodel.fashion``.  Writes next to this file:
  fashion_flux.safetensors        the model (EMA, fp16) + "cond.class_tokens" [11,4,128] + "cond.class_vectors" [11,128]
  fashion_flux_train_log.json     command, seed, settings, loss curve, time, sample class accuracy
  fashion_flux_samples.png        20-step euler samples (simple scheduler), CFG 3, one row per class
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import testmodel as tm
from testmodel import fashion as fm
from testmodel import fashion_flux as ff

SEED = 1234
P_UNCOND = 0.1


def flow_loss(dm, sigmas, tokens, vectors, data, labels, batch: int):
    """One class-conditional rectified-flow loss exactly as ComfyUI samples Flux: sigma from the model's own
    ModelSamplingFlux table, x_t = (1 - sigma) x0 + sigma eps (CONST noise_scaling), target eps - x0."""
    import torch
    device = data.device
    idx = torch.randint(0, len(data), (batch,), device=device)
    x0, y = data[idx], labels[idx].clone()
    y[torch.rand(batch, device=device) < P_UNCOND] = ff.NULL_CLASS
    s = sigmas[torch.randint(0, len(sigmas), (batch,), device=device)]
    eps = torch.randn_like(x0)
    sv = s.view(-1, 1, 1, 1)
    x_t = (1 - sv) * x0 + sv * eps
    with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):   # see inplace_safe
        out = dm(x_t, s, context=tokens[y], y=vectors[y])     # ModelSamplingFlux.timestep(sigma) = sigma
    return torch.nn.functional.mse_loss(out, eps - x0)


def train(device, steps: int, batch: int, lr: float, max_minutes: float, ema_decay: float, log, measure: int = 0):
    import torch
    import comfy.utils
    torch.manual_seed(SEED)
    images, labels = fm.fashion_dataset("train")
    data, labels = fm.images_to_latents(images).to(device), labels.to(device)
    mp = tm.build_model_patcher(ff.fashion_flux_config(), seed=SEED, device=device)
    dm = ff.init_weights_(mp.model.diffusion_model, SEED).to(device).train().requires_grad_(True)
    sigmas = mp.model.model_sampling.sigmas.float().to(device)
    tokens = torch.nn.Parameter(torch.randn(11, ff.CONTEXT_TOKENS, ff.CONTEXT_DIM, device=device))
    vectors = torch.nn.Parameter(torch.randn(11, ff.VEC_DIM, device=device))
    params = list(dm.parameters()) + [tokens, vectors]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = copy.deepcopy(dm).eval().requires_grad_(False)
    ema_cond = [tokens.detach().clone(), vectors.detach().clone()]
    losses, t0 = [], time.time()
    for step in range(measure or steps):
        loss = flow_loss(dm, sigmas, tokens, vectors, data, labels, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()) + ema_cond, list(dm.parameters()) + [tokens, vectors],
                                 1 - ema_decay)
        losses.append(loss.detach())
        if step % 100 == 0 or step == steps - 1:
            recent = torch.stack(losses[-100:]).mean().item()
            print(f"step {step:5d}/{steps}  loss {recent:.4f}  {time.time() - t0:.0f}s", flush=True)
            if time.time() - t0 > max_minutes * 60:
                print(f"stopping at step {step}: --max-minutes {max_minutes} reached", flush=True)
                break
    if measure:
        print(f"{(time.time() - t0) / measure:.3f} s/step at batch {batch}", flush=True)
        return
    losses = torch.stack(losses).cpu().tolist()
    sd = {k: v.detach().cpu().half().contiguous() for k, v in ema.state_dict().items()}
    sd["cond.class_tokens"] = ema_cond[0].cpu().half().contiguous()
    sd["cond.class_vectors"] = ema_cond[1].cpu().half().contiguous()
    comfy.utils.save_torch_file(sd, str(ff.WEIGHTS))
    log.update(seed=SEED, steps_planned=steps, steps_run=len(losses), batch=batch, lr=lr, ema=ema_decay,
               p_uncond=P_UNCOND, shift=float(mp.model.model_sampling.shift),
               params=sum(p.numel() for p in ema.parameters()), device=str(device),
               threads=torch.get_num_threads(), train_seconds=round(time.time() - t0, 1),
               model_config=ff.FASHION_FLUX_CONFIG,
               loss_every_100=[round(sum(losses[i:i + 100]) / 100, 5) for i in range(0, len(losses) - 99, 100)])


def sample_check(device, log):
    """Class accuracy (committed classifier) of 100 samples, 10 per class, at 20 euler steps, CFG 3."""
    import torch
    model, tokens, vectors = ff.load_fashion_flux(device=device)
    classes = [c for c in range(10) for _ in range(10)]
    for scheduler in ("simple", "normal"):
        t0 = time.time()
        imgs = ff.decode(ff.sample(model, tokens, vectors, classes, seed=0, steps=20, cfg=3.0,
                                   scheduler=scheduler).cpu())
        acc = float((fm.classify(imgs) == torch.tensor(classes).numpy()).mean())
        log[f"sample_accuracy_{scheduler}"] = acc
        print(f"{scheduler}: classifier accuracy on 100 samples {acc:.2%} ({time.time() - t0:.0f}s)", flush=True)
        if scheduler == "simple":
            fm.save_grid(imgs, ff.HERE / "fashion_flux_samples.png")
    log.update(sample_setting="euler, 20 steps, cfg 3, seed 0, 10 per class (committed fashion classifier)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--max-minutes", type=float, default=50.0)
    ap.add_argument("--measure", type=int, default=0, help="only time this many steps; save nothing")
    args = ap.parse_args()
    tm.boot_comfy(cpu=args.device == "cpu")
    import torch
    if args.device == "cpu":
        torch.set_num_threads(1)
    log = {"command": "python -m testmodel.train_fashion_flux " + " ".join(sys.argv[1:])}
    train(args.device, args.steps, args.batch, args.lr, args.max_minutes, args.ema, log, args.measure)
    if args.measure:
        return
    out = ff.HERE / "fashion_flux_train_log.json"
    out.write_text(json.dumps(log, indent=1))
    sample_check(args.device, log)
    out.write_text(json.dumps(log, indent=1))
    print(f"saved {ff.WEIGHTS} ({ff.WEIGHTS.stat().st_size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
