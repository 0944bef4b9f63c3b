"""Distil a TiUE one-pass student from a teacher UNet (arXiv 2505.21960): conditions only, no images.

    OMP_NUM_THREADS=1 .testhost/venv/bin/python tools/train_tiue.py --digits --max-minutes 55      (~1 h, CPU)
    python tools/train_tiue.py --teacher unet.safetensors --conds conds.safetensors --out student.safetensors

The student starts as a copy of the teacher and learns to generate in one pass (encoder once on the noise at
the first of K DDIM timesteps, K decoders in one batch, closed-form DDIM; ``fasterdiffusion.onepass``) by
variational score distillation against the frozen teacher and an online "fake score" model (a full copy of
the teacher, trained on the student's samples), both with classifier-free guidance ``--cfg``, plus the KL term
on each predicted noise map's mean and variance (``--kl``, 0.1, summed; 0 for the ablation).

Teacher: ``--digits`` (the committed test model, its 10 class-token sets and null set as conditions) or any
epsilon-prediction SD-architecture UNet that ComfyUI's own loader reads (``--teacher``, a UNet or checkpoint
safetensors) with ``--conds``: a safetensors with ``context`` [N, T, D] (prompt embeddings) and, for CFG,
``null`` [T, D] (the empty prompt).  CPU for the test model; ``--device cuda`` (default: cuda when present).

Writes ``--out`` (a ComfyUI-loadable UNet safetensors whose metadata marks it a TiUE student, with a weights
fingerprint the One-Pass node recognises), ``--log`` (JSON: settings, loss curve, time, sample accuracy for
the digits model) and checkpoints (``--checkpoint``, every ``--checkpoint-every`` steps and at the end);
``--resume`` continues from the checkpoint exactly as if the run had not stopped.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import import_module
from pathlib import Path

for _p in (Path(__file__).resolve().parent.parent, Path(__file__).resolve().parent):   # testmodel, host_python
    if str(_p) not in sys.path:
        sys.path.append(str(_p))        # after ComfyUI's directory: the pack's nodes/ must not shadow ComfyUI's nodes
from host_python import wrong_interpreter  # noqa: E402

import testmodel as tm  # noqa: E402

STUDENT = tm.REPO / "testmodel" / "digits_tiue_student.safetensors"


@dataclass
class Config:
    k: int = 4                  # DDIM steps the student is distilled for
    batch: int = 8              # the paper's per-GPU batch (the KL/VSD balance depends on it)
    cfg: float = 3.0            # teacher (and fake score) guidance; the digits model samples at 3
    kl: float = 0.1             # lambda_KL; 0 = the ablation without the KL term
    lr: float = 1e-5            # student (Adam); the paper's 1e-6 is for SD over 66k steps (digits pilots: 2e-5, 1e-4 worse)
    fake_lr: float = 1e-4       # fake score model (a full copy: smaller than the paper's LoRA 1e-3)
    fake_steps: int = 4         # fake score updates per student update (the paper: 1; more lets it keep up, as DMD2)
    ema: float = 0.999
    grad_clip: float = 1.0
    t_min: int = 20             # VSD timesteps ~ U{t_min..t_max}
    t_max: int = 980
    p_null: float = 0.1         # null-condition dropout of the fake score model's training
    max_decoder_batch: int = 0  # rows per decoder call in the student's forward (0 = all K at once)
    seed: int = 0


# ------------------------------------------------------------------------------------------------ the pack

def pack_modules():
    """(onepass, tiue, patches.comfy.ldm) as the pack has them (patches/ imports the engine relatively)."""
    _, cu = tm.load_pack(tempfile.mkdtemp(prefix="fd_tiue_"))
    pkg = cu.__name__.rsplit(".", 3)[0]
    return (import_module(pkg + ".fasterdiffusion.onepass"), import_module(pkg + ".fasterdiffusion.tiue"),
            import_module(pkg + ".patches.comfy.ldm"))


def schedule_of(model_patcher):
    """alpha-bar per train timestep (float64) of a ComfyUI model, refusing what the trainer cannot distil."""
    import torch
    import comfy.model_base
    import comfy.model_sampling
    ms = model_patcher.get_model_object("model_sampling")
    kind = model_patcher.model.model_type
    if kind != comfy.model_base.ModelType.EPS or not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete):
        raise SystemExit(f"train_tiue: the teacher must be an epsilon-prediction model on a DDPM schedule "
                         f"(SD1.x, SD2.x-base, SDXL); this one is {kind.name} with {type(ms).__name__}")
    sig = ms.sigmas.double()
    return 1.0 / (1.0 + sig * sig)


def load_teacher(args):
    """(unet, alphas_cumprod, conds [N,T,D], null [T,D] or None, extra tensors to save, teacher name, latent CHW)."""
    import torch
    import comfy.sd
    import comfy.utils
    if args.digits:
        mp, tokens = tm.load_test_model()
        return (mp.model.diffusion_model, schedule_of(mp), tokens[:tm.NULL_CLASS].clone(),
                tokens[tm.NULL_CLASS].clone(), {"cond.class_tokens": tokens.contiguous()}, tm.WEIGHTS.name,
                (4, tm.LATENT_SIZE, tm.LATENT_SIZE))
    if not args.teacher or not args.conds:
        raise SystemExit("train_tiue: give --digits, or --teacher UNET.safetensors and --conds CONDS.safetensors")
    mp = comfy.sd.load_diffusion_model(args.teacher)
    conds = comfy.utils.load_torch_file(args.conds)
    if "context" not in conds or conds["context"].dim() != 3:
        raise SystemExit("train_tiue: --conds needs 'context' [N, T, D] (and 'null' [T, D] for CFG)")
    null = conds.get("null")
    if null is None and args.cfg != 1.0:
        raise SystemExit("train_tiue: --cfg other than 1 needs a 'null' [T, D] entry in --conds")
    unet = mp.model.diffusion_model
    c = unet.in_channels
    size = args.latent_size or 64
    return unet, schedule_of(mp), conds["context"].float(), None if null is None else null.float(), {}, \
        Path(args.teacher).name, (c, size, size)


# ------------------------------------------------------------------------------------------------ training

class Trainer:
    """Student, fake score model and their optimisers; every random draw comes from one generator, so a
    resumed run continues bit for bit."""

    def __init__(self, teacher, alphas_cumprod, conds, null, cfg: Config, latent_chw, device, modules):
        import torch
        self.onepass, self.tiue, self.ldm = modules
        self.cfg, self.device, self.chw = cfg, torch.device(device), tuple(latent_chw)
        self.alphas = alphas_cumprod.to(torch.float64)
        self.alphas_dev = self.alphas.float().to(self.device)
        self.timesteps = self.onepass.ddim_timesteps(cfg.k, num_train_timesteps=len(self.alphas))
        self.final_alpha = float(self.alphas[0])
        self.conds = conds.to(self.device)
        self.null = None if null is None else null.to(self.device)
        self.teacher = copy.deepcopy(teacher).float().to(self.device).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.fake = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.ema = copy.deepcopy(self.teacher).eval().requires_grad_(False)
        self.opt_s = torch.optim.Adam(self.student.parameters(), lr=cfg.lr)
        self.opt_f = torch.optim.Adam(self.fake.parameters(), lr=cfg.fake_lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.history: list[list[float]] = []      # [vsd, kl, fake] per step

    # -------------------------------------------------------------------------------- pieces
    def rand(self, *shape):
        import torch
        return torch.randn(*shape, generator=self.gen).to(self.device)

    def randint(self, lo, hi, n):
        import torch
        return torch.randint(lo, hi, (n,), generator=self.gen).to(self.device)

    def student_sample(self, unet, noise, context, max_decoder_batch=None):
        """The one-pass latent and the K decoder outputs of ``unet`` (the student's forward)."""
        import torch
        t0 = torch.full((noise.shape[0],), float(self.timesteps[0]), device=self.device)
        call = self.ldm.make_call(noise, t0, context, None, None, {}, {})
        return self.onepass.one_pass(self.ldm.LdmUNetAdapter(unet), call, self.timesteps, self.alphas,
                                     self.final_alpha, self.cfg.max_decoder_batch if max_decoder_batch is None else max_decoder_batch)

    def eps(self, unet, x, t, context, scale):
        """``unet``'s noise prediction at (x, t), with CFG ``scale`` against the null condition."""
        import torch
        if self.null is None or scale == 1.0:
            return unet(x, t.float(), context=context)
        null = self.null.unsqueeze(0).expand_as(context)
        both = unet(torch.cat([x, x]), torch.cat([t, t]).float(), context=torch.cat([context, null]))
        cond, uncond = both.chunk(2)
        return self.tiue.guided(cond, uncond, scale)

    def step(self):
        """One student update, then one fake-score update; returns (vsd, kl, fake) losses."""
        import torch
        cfg, b = self.cfg, self.cfg.batch
        idx = self.randint(0, len(self.conds), b)
        context = self.conds[idx]
        noise = self.rand(b, *self.chw)
        t = self.randint(cfg.t_min, cfg.t_max + 1, b)
        eps_t = self.rand(b, *self.chw)

        # student: VSD against teacher vs fake score, + KL on every predicted noise map
        res = self.student_sample(self.student, noise, context)
        x0 = res.latent
        a_t = self.alphas_dev[t]
        with torch.no_grad():
            x_t = self.tiue.noised(x0.detach(), eps_t, a_t)
            e_teacher = self.eps(self.teacher, x_t, t, context, cfg.cfg)
            e_fake = self.eps(self.fake.eval(), x_t, t, context, cfg.cfg)
            self.fake.train()
        vsd = self.tiue.vsd_loss(x0, e_teacher, e_fake, a_t)
        kl = self.tiue.kl_loss(res.outputs, cfg.kl) if cfg.kl > 0 else torch.zeros((), device=self.device)
        self.opt_s.zero_grad(set_to_none=True)
        (vsd + kl).backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
        self.opt_s.step()
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.student.parameters()):
                pe.lerp_(p, 1.0 - cfg.ema)

        # fake score: denoising on the detached student samples, null-condition dropout (``fake_steps`` updates)
        fake_losses = []
        for _ in range(cfg.fake_steps):
            t_f = self.randint(0, len(self.alphas), b)
            eps_f = self.rand(b, *self.chw)
            drop = torch.rand(b, generator=self.gen).to(self.device) < cfg.p_null
            a_f = self.alphas_dev[t_f]
            ctx_f = context
            if self.null is not None:
                ctx_f = torch.where(drop.view(-1, 1, 1), self.null.unsqueeze(0).expand_as(context), context)
            x_f = self.tiue.noised(x0.detach(), eps_f, a_f)
            fake = self.tiue.denoising_loss(self.fake(x_f, t_f.float(), context=ctx_f), eps_f, a_f)
            self.opt_f.zero_grad(set_to_none=True)
            fake.backward()
            torch.nn.utils.clip_grad_norm_(self.fake.parameters(), cfg.grad_clip)
            self.opt_f.step()
            fake_losses.append(fake.item())

        self.step_count += 1
        losses = [vsd.item(), kl.item(), sum(fake_losses) / len(fake_losses)]
        self.history.append(losses)
        return losses

    # -------------------------------------------------------------------------------- state
    def state_dict(self):
        return dict(step=self.step_count, config=asdict(self.cfg), student=self.student.state_dict(),
                    fake=self.fake.state_dict(), ema=self.ema.state_dict(), opt_s=self.opt_s.state_dict(),
                    opt_f=self.opt_f.state_dict(), generator=self.gen.get_state(), history=self.history)

    def load_state_dict(self, state):
        if state["config"] != asdict(self.cfg):
            diff = {k: (state["config"].get(k), v) for k, v in asdict(self.cfg).items() if state["config"].get(k) != v}
            raise SystemExit(f"train_tiue: the checkpoint was made with other settings (checkpoint, now): {diff}")
        self.student.load_state_dict(state["student"])
        self.fake.load_state_dict(state["fake"])
        self.ema.load_state_dict(state["ema"])
        self.opt_s.load_state_dict(state["opt_s"])
        self.opt_f.load_state_dict(state["opt_f"])
        self.gen.set_state(state["generator"])
        self.step_count = state["step"]
        self.history = [list(h) for h in state["history"]]

    def save_checkpoint(self, path):
        import torch
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def save_student(self, path, extra, dtype="fp16", **info):
        """The EMA student as a ComfyUI UNet safetensors (ldm keys, no prefix) marked as a TiUE student."""
        import torch
        import comfy.utils
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        sd = {k: v.detach().to("cpu", dt).contiguous() for k, v in self.ema.state_dict().items()}
        meta = self.tiue.student_metadata(sd, timesteps=self.timesteps, prediction="eps", steps=self.step_count,
                                          **info)
        sd.update({k: v.detach().cpu().contiguous() for k, v in extra.items()})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        comfy.utils.save_torch_file(sd, str(path), metadata=meta)
        return meta


def digits_accuracy(trainer, unet, n_per_digit=10, seed=0):
    """(accuracy, images) of one-pass samples of ``unet`` with the digits class tokens (noise as ComfyUI's KSampler
    makes it for ``seed``)."""
    import torch
    import comfy.sample
    digits = [d for d in range(10) for _ in range(n_per_digit)]
    noise = comfy.sample.prepare_noise(torch.zeros(len(digits), *trainer.chw), seed).to(trainer.device)
    with torch.no_grad():
        z0 = trainer.student_sample(unet, noise, trainer.conds[torch.tensor(digits)], max_decoder_batch=0).latent
    images = tm.latents_to_images(z0.cpu())           # model space -> image (the latent format divides, decode multiplies)
    return float((tm.classify(images) == torch.tensor(digits).numpy()).mean()), images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", action="store_true", help="distil the committed digits test model")
    ap.add_argument("--teacher", help="teacher UNet/checkpoint safetensors (ComfyUI's loader must read it)")
    ap.add_argument("--conds", help="safetensors with 'context' [N,T,D] and 'null' [T,D]")
    ap.add_argument("--latent-size", type=int, default=0, help="latent height = width (default: 8 digits, 64 else)")
    ap.add_argument("--out", help=f"the student safetensors (default with --digits: {STUDENT.relative_to(tm.REPO)})")
    ap.add_argument("--log", help="the JSON log (default: next to --out, <stem>_log.json)")
    ap.add_argument("--checkpoint", help="checkpoint file (default: out/tiue/<stem>.ckpt)")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    ap.add_argument("--steps", type=int, default=100000, help="stop after this many steps in total")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this much wall time")
    ap.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--device", default="", help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--eval-per-digit", type=int, default=10, help="one-pass samples per digit scored at the end (--digits)")
    for name, value in asdict(Config()).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = ap.parse_args(argv)
    if wrong_interpreter("test"):
        sys.exit(f"train_tiue: {sys.executable} has no torch; run it with .testhost/venv/bin/python "
                 "(bash tools/setup_test_host.sh provisions it) or a Python with ComfyUI's requirements")
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tm.boot_comfy(cpu=device == "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config())})
    out = Path(args.out) if args.out else (STUDENT if args.digits else None)
    if out is None:
        raise SystemExit("train_tiue: give --out")
    log_path = Path(args.log) if args.log else out.with_name(out.stem + "_log.json")
    ckpt = Path(args.checkpoint) if args.checkpoint else tm.REPO / "out" / "tiue" / (out.stem + ".ckpt")

    teacher, alphas, conds, null, extra, teacher_name, chw = load_teacher(args)
    trainer = Trainer(teacher, alphas, conds, null, cfg, chw, device, pack_modules())
    if args.resume and ckpt.is_file():
        trainer.load_state_dict(torch.load(ckpt, map_location=device, weights_only=False))
        print(f"resumed from {ckpt} at step {trainer.step_count}", flush=True)
    total = max(args.steps, trainer.step_count)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=trainer.step_count, desc="TiUE", mininterval=2.0, file=sys.stdout)
    t0, run_seconds = time.time(), 0.0
    prior_seconds = 0.0
    if log_path.is_file() and trainer.step_count:
        prior_seconds = json.loads(log_path.read_text()).get("train_seconds", 0.0)
    stopped = "steps"
    while trainer.step_count < total:
        vsd, kl, fake = trainer.step()
        if bar is not None:
            bar.update(1)
            if trainer.step_count % 10 == 0:
                bar.set_postfix(vsd=f"{vsd:.2e}", kl=f"{kl:.3f}", fake=f"{fake:.4f}", refresh=False)
        if trainer.step_count % args.checkpoint_every == 0:
            trainer.save_checkpoint(ckpt)
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
            stopped = "time"
            break
    if bar is not None:
        bar.close()
    run_seconds = time.time() - t0
    trainer.save_checkpoint(ckpt)
    train_seconds = round(prior_seconds + run_seconds, 1)

    info = dict(teacher=teacher_name, kl_weight=cfg.kl, cfg=cfg.cfg, batch=cfg.batch, trainer="tools/train_tiue.py")
    trainer.save_student(out, extra, args.save_dtype, **info)
    hist = trainer.history
    every = 50

    def curve(i):
        return [round(sum(h[i] for h in hist[j:j + every]) / every, 6) for j in range(0, len(hist) - every + 1, every)]
    log = dict(config=asdict(cfg), teacher=teacher_name, steps=trainer.step_count, stopped_by=stopped,
               timesteps=trainer.timesteps, final_alpha_cumprod=trainer.final_alpha, device=device,
               threads=torch.get_num_threads(), train_seconds=train_seconds,
               seconds_per_step=round(train_seconds / max(1, trainer.step_count), 4), save_dtype=args.save_dtype,
               command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               vsd_every_50=curve(0), kl_every_50=curve(1), fake_every_50=curve(2))
    if args.digits:
        acc_student, images = digits_accuracy(trainer, trainer.ema, args.eval_per_digit)
        acc_teacher, _ = digits_accuracy(trainer, trainer.teacher, args.eval_per_digit)
        tm.save_grid(images, out.with_name(out.stem + "_samples.png"))
        log.update(sample_accuracy=acc_student, teacher_one_pass_accuracy=acc_teacher,
                   sample_setting=f"one pass, K DDIM timesteps above, seed 0, {args.eval_per_digit} per digit, no CFG")
        print(f"one-pass digit accuracy: student {acc_student:.0%}, undistilled teacher {acc_teacher:.0%}")
    log_path.write_text(json.dumps(log, indent=1))
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) after {trainer.step_count} steps, {train_seconds:.0f}s; "
          f"log {log_path}; checkpoint {ckpt}", flush=True)
    return trainer


if __name__ == "__main__":
    main()
