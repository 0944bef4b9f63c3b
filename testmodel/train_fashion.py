"""Train the Fashion-MNIST test model and its classifier:  python -m testmodel.train_fashion [--device cuda]

On a GPU it takes a few minutes (the committed model: see fashion_train_log.json); on this project's
CPU use ``--steps 4000 --batch 64`` for a ~90-minute run on one thread.  Writes next to this file:
  fashion_classifier.safetensors  a small CNN trained on the real training set (FD-fashion features, accuracy)
  fashion_unet.safetensors        the UNet (EMA, fp16) + "cond.class_tokens" [11, 4, 128]
  fashion_train_log.json          seed, settings, loss curve, time, classifier test accuracy, sample accuracy
  fashion_samples.png             50-step euler samples, CFG 3, one row per class
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import testmodel as tm
from testmodel import fashion as fm

SEED = 1234


def train_classifier(device, epochs: int, log):
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(SEED)
    x, y = fm.fashion_dataset("train")
    xt, yt = fm.fashion_dataset("test")
    net = fm.make_classifier().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = x.to(device).unsqueeze(1), y.to(device)
    t0 = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), device=device)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"classifier epoch {epoch}: loss {loss.item():.3f}", flush=True)
    net = net.cpu().eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(fm.CLASSIFIER_WEIGHTS))
    fm._CLASSIFIER = None
    acc = float((fm.classify(xt) == yt.numpy()).mean())
    log.update(classifier_epochs=epochs, classifier_seconds=round(time.time() - t0, 1), classifier_test_accuracy=acc)
    print(f"classifier: test accuracy {acc:.2%}", flush=True)


def train_unet(device, steps: int, batch: int, lr: float, max_minutes: float, log):
    import torch
    import comfy.utils
    torch.manual_seed(SEED)
    images, labels = fm.fashion_dataset("train")
    data, labels = fm.images_to_latents(images).to(device), labels.to(device)
    mp = tm.build_model_patcher(fm.fashion_model_config(), seed=SEED, device=device)
    unet = mp.model.diffusion_model.to(device).train().requires_grad_(True)
    sigmas = mp.model.model_sampling.sigmas.float().to(device)
    tokens = torch.nn.Parameter(torch.randn(11, fm.CONTEXT_TOKENS, fm.CONTEXT_DIM, device=device))
    params = list(unet.parameters()) + [tokens]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_tokens = tokens.detach().clone()
    ema_decay = 0.999 if steps >= 4000 else 0.995
    losses, t0, step = [], time.time(), 0
    for step in range(steps):
        loss = tm.eps_loss(unet, sigmas, tokens, data, labels, batch, fm.NULL_CLASS, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - ema_decay)
            ema_tokens.lerp_(tokens.detach(), 1 - ema_decay)
        losses.append(loss.detach())
        if step % 200 == 0 or step == steps - 1:
            recent = torch.stack(losses[-200:]).mean().item()
            print(f"step {step:5d}/{steps}  loss {recent:.4f}  {time.time() - t0:.0f}s", flush=True)
            if time.time() - t0 > max_minutes * 60:
                print(f"stopping at step {step}: --max-minutes {max_minutes} reached", flush=True)
                break
    losses = torch.stack(losses).cpu().tolist()
    sd = {k: v.detach().cpu().half().contiguous() for k, v in ema.state_dict().items()}
    sd["cond.class_tokens"] = ema_tokens.cpu().half().contiguous()
    comfy.utils.save_torch_file(sd, str(fm.WEIGHTS))
    log.update(seed=SEED, steps_planned=steps, steps_run=len(losses), batch=batch, lr=lr, ema=ema_decay,
               p_uncond=0.1, params=sum(p.numel() for p in ema.parameters()), device=str(device),
               train_seconds=round(time.time() - t0, 1), unet_config=fm.FASHION_UNET_CONFIG,
               loss_every_100=[round(sum(losses[i:i + 100]) / 100, 5) for i in range(0, len(losses) - 99, 100)])


def sample_check(device, log):
    import torch
    model, tokens = fm.load_fashion_model(device=device)
    classes = [c for c in range(10) for _ in range(10)]
    imgs = fm.decode(fm.sample(model, tokens, classes, seed=0, steps=50, cfg=3.0).cpu())
    acc = float((fm.classify(imgs) == torch.tensor(classes).numpy()).mean())
    fm.save_grid(imgs, fm.HERE / "fashion_samples.png")
    log.update(sample_accuracy=acc, sample_setting="euler, normal, 50 steps, cfg 3, seed 0, 10 per class")
    print(f"classifier accuracy on 100 samples: {acc:.2%}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-minutes", type=float, default=90.0)
    ap.add_argument("--classifier-epochs", type=int, default=4)
    args = ap.parse_args()
    tm.boot_comfy(cpu=args.device == "cpu")
    import torch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log = {}
    train_classifier(args.device, args.classifier_epochs, log)
    train_unet(args.device, args.steps, args.batch, args.lr, args.max_minutes, log)
    (fm.HERE / "fashion_train_log.json").write_text(json.dumps(log, indent=1))
    sample_check(args.device, log)
    (fm.HERE / "fashion_train_log.json").write_text(json.dumps(log, indent=1))
    print(f"saved {fm.WEIGHTS} ({fm.WEIGHTS.stat().st_size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
