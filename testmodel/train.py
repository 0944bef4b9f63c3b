"""Train the digits test model:  python -m testmodel.train  (about 40 minutes on one CPU thread).

Builds ComfyUI's UNetModel (SD1.5 layout, cross-attention on 4 learned context tokens per class and
one null token set for classifier-free guidance), trains epsilon-prediction on the SD1.5 noise
schedule exactly as ComfyUI samples it, and writes next to this file:
  digits_unet.safetensors   UNet weights (EMA) + "cond.class_tokens" [11, 4, 64]
  train_log.json            seed, settings, loss curve, accuracy of a digits classifier on samples
  samples.png               50-step euler samples, CFG 3, one row per digit
"""
from __future__ import annotations

import copy
import json
import math
import os
import time

import testmodel as tm

SEED = 1234
STEPS = int(os.environ.get("FD_TRAIN_STEPS", 8000))
BATCH = 64
LR = 2e-3
EMA = 0.995
P_UNCOND = 0.1


def main():
    tm.boot_comfy()
    import torch
    import comfy.utils
    torch.manual_seed(SEED)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))

    images, labels = tm.digits_dataset()
    data = tm.images_to_latents(images)                      # model space, [-1, 1]
    mp = tm.build_model_patcher(tm.digits_model_config(), seed=SEED)
    unet = mp.model.diffusion_model.train().requires_grad_(True)   # the patcher builds it frozen
    sigmas = mp.model.model_sampling.sigmas.float()          # sigma for each of the 1000 timesteps
    tokens = torch.nn.Parameter(torch.randn(11, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM))
    params = list(unet.parameters()) + [tokens]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / STEPS)))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_tokens = tokens.detach().clone()

    losses, t0 = [], time.time()
    for step in range(STEPS):
        loss = tm.eps_loss(unet, sigmas, tokens, data, labels, BATCH, tm.NULL_CLASS, P_UNCOND)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - EMA)
            ema_tokens.lerp_(tokens.detach(), 1 - EMA)
        losses.append(loss.item())
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}  {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0

    sd = {k: v.contiguous() for k, v in ema.state_dict().items()}
    sd["cond.class_tokens"] = ema_tokens.contiguous()
    comfy.utils.save_torch_file(sd, str(tm.WEIGHTS))

    model, toks = tm.load_test_model()
    digits = [d for d in range(10) for _ in range(10)]
    imgs = tm.decode(tm.sample_digits(model, toks, digits, seed=0, steps=50, cfg=3.0))
    acc = float((tm.classify(imgs) == torch.tensor(digits).numpy()).mean())
    tm.save_grid(imgs, tm.WEIGHTS.parent / "samples.png")
    log = dict(seed=SEED, steps=STEPS, batch=BATCH, lr=LR, ema=EMA, p_uncond=P_UNCOND,
               params=sum(p.numel() for p in ema.parameters()), train_seconds=round(train_s, 1),
               threads=torch.get_num_threads(), sample_accuracy=acc,
               sample_setting="euler, normal, 50 steps, cfg 3, seed 0, 10 per digit",
               loss_every_50=[round(sum(losses[i:i + 50]) / 50, 5) for i in range(0, len(losses) - 49, 50)])
    (tm.WEIGHTS.parent / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"saved {tm.WEIGHTS} ({tm.WEIGHTS.stat().st_size / 1e6:.1f} MB); trained {train_s:.0f}s; "
          f"classifier accuracy on 100 samples: {acc:.2%}")


if __name__ == "__main__":
    main()
