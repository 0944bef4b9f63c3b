"""Distil a TiUE one-pass student from a teacher UNet (arXiv 2505.21960): conditions only, no images.

    bash tools/run.sh tiue --digits --steps 3000 --eval-every 100 --eval-per-class 30     (20 min, one CPU thread)
    bash tools/run.sh tiue --fashion ...                                                   (the Fashion-MNIST model)
    bash tools/run.sh tiue --teacher unet.safetensors --conds conds.safetensors --out student.safetensors

The student starts as a copy of the teacher and learns to generate in one pass (encoder once on the noise at
the first of K DDIM timesteps, K decoders in one batch, closed-form DDIM; ``fasterdiffusion.onepass``).  Its
losses (``fasterdiffusion.tiue``), each weighted by a setting of ``Config``:
  * regression (``--reg``, the default recipe): MSE to the teacher's own guided DDIM sample from the same noise
    (DMD's pairs: ``--reg-pairs`` noises, ``--reg-steps`` teacher steps with CFG ``--cfg`` from the schedule's top,
    made once and cached in ``--pairs-cache``), plus its image-space high frequencies (``--reg-hf``);
  * variational score distillation (``--vsd``) against the frozen teacher and an online "fake score" model (a
    full copy of the teacher, trained on the student's samples), both with CFG, and the KL term on each predicted
    noise map's mean and variance (``--kl``): the paper's recipe, ``--vsd 1 --kl 0.1 --reg 0 --reg-hf 0 --lr 1e-5``.
Each step's record holds every loss, its gradient's norm on each decoder's output and the student's gradient
norm; ``--eval-every`` scores the one pass of the EMA and raw students (test teachers) and each loss's gradient
norm over the weights.

Teacher: ``--digits`` / ``--fashion`` (the committed test models, their 10 class-token sets and null set as
conditions) or any epsilon-prediction SD-architecture UNet that ComfyUI's own loader reads (``--teacher``, a UNet
or checkpoint safetensors) with ``--conds``: a safetensors with ``context`` [N, T, D] (prompt embeddings) and, for
CFG, ``null`` [T, D] (the empty prompt).  CPU for the test models; ``--device cuda`` (default: cuda when present).

Writes ``--out`` (a ComfyUI-loadable UNet safetensors whose metadata marks it a TiUE student, with a weights
fingerprint the One-Pass node recognises; ``--export`` EMA or raw weights), ``--log`` (JSON: settings, curves,
evaluations, time) and checkpoints (``--checkpoint``, every ``--checkpoint-every`` steps and at the end);
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
from host_python import require  # noqa: E402

import testmodel as tm  # noqa: E402

STUDENT = tm.REPO / "testmodel" / "digits_tiue_student.safetensors"
FASHION_STUDENT = tm.REPO / "testmodel" / "fashion_tiue_student.safetensors"


@dataclass
class Config:
    """The defaults are the recipe that made the committed digits student (measured: docs/quality/tiue_runs.md;
    the Fashion-MNIST one used fewer pairs, teacher steps and rows for CPU time: its log says which): regression to
    the teacher's guided samples with the image-space high-frequency term, no VSD, no KL.  The
    paper's recipe (VSD + KL, the diagnosis runs): --vsd 1 --kl 0.1 --reg 0 --reg-hf 0 --reg-batch 0 --lr 1e-5."""
    k: int = 4                  # DDIM steps the student is distilled for
    batch: int = 8              # the paper's per-GPU batch: the VSD/KL batch (the KL/VSD balance depends on it)
    cfg: float = 3.0            # teacher (and fake score) guidance; the test models sample at 3
    vsd: float = 0.0            # weight of variational score distillation (0: no fake score model at all; paper 1)
    vsd_weighting: str = "sigma2"   # its gradient: "sigma2" (SwiftBrush, the paper) or "dmd" (per-sample normalised)
    kl: float = 0.0             # lambda_KL on every predicted noise map (the paper: 0.1)
    kl_reduce: str = "sum"      # "sum" over the K*B maps (the paper) or "mean" per map (VSD's scale per element)
    reg: float = 1.0            # weight of DMD's regression to the teacher's guided DDIM samples (0: none)
    reg_pairs: int = 4096       # fixed (noise, class) -> teacher sample pairs for it
    reg_steps: int = 16         # the teacher's DDIM steps (with ``cfg``, from the schedule's top) per target
    reg_batch: int = 16         # pairs per student update (0: ``batch``)
    reg_hf: float = 1.0         # weight of the regression's high frequencies (image Laplacian where the decoder is known)
    lr: float = 1e-4            # student (Adam); the paper's 1e-6 is for SD over 66k steps; its recipe here: 1e-5
    cosine_steps: int = 0       # > 0: the student's lr follows a cosine from lr to 0 over this many steps (then 0)
    fake_lr: float = 1e-4       # fake score model (a full copy: smaller than the paper's LoRA 1e-3)
    fake_steps: int = 4         # fake score updates per student update (the paper: 1; more lets it keep up, as DMD2)
    ema: float = 0.999
    grad_clip: float = 1.0
    t_min: int = 20             # VSD timesteps ~ U{t_min..t_max}
    t_max: int = 980
    p_null: float = 0.1         # null-condition dropout of the fake score model's training
    max_decoder_batch: int = 0  # rows per decoder call in the student's forward (0 = all K at once)
    seed: int = 0


# what a checkpoint made before a setting existed ran with (the first trainer: VSD + KL only)
BEFORE_SETTING = dict(vsd=1.0, vsd_weighting="sigma2", kl_reduce="sum", reg=0.0, reg_hf=0.0, cosine_steps=0)


# ------------------------------------------------------------------------------------------------ the pack

def pack_modules():
    """(onepass, tiue, patches.comfy.ldm) as the pack has them (patches/ imports the engine relatively)."""
    _, cu = tm.load_pack(tempfile.mkdtemp(prefix="fd_tiue_"))
    pkg = cu.__name__.rsplit(".", 3)[0]
    return (import_module(pkg + ".fasterdiffusion.onepass"), import_module(pkg + ".fasterdiffusion.tiue"),
            import_module(pkg + ".patches.comfy.ldm"))


def schedule_of(model_patcher):
    """alpha-bar per train timestep (float64) of a ComfyUI model, refusing what the trainer cannot distil."""
    import comfy.model_base
    import comfy.model_sampling
    ms = model_patcher.get_model_object("model_sampling")
    kind = model_patcher.model.model_type
    if kind != comfy.model_base.ModelType.EPS or not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete):
        raise SystemExit(f"train_tiue: the teacher must be an epsilon-prediction model on a DDPM schedule "
                         f"(SD1.x, SD2.x-base, SDXL); this one is {kind.name} with {type(ms).__name__}")
    sig = ms.sigmas.double()
    return 1.0 / (1.0 + sig * sig)


def load_teacher(args, kit=None):
    """(unet, alphas_cumprod, conds [N,T,D], null [T,D] or None, extra tensors to save, teacher name, latent CHW);
    ``kit``: the benchmark's model kit of a test teacher (``--digits``/``--fashion``), which holds it loaded."""
    import comfy.sd
    import comfy.utils
    if kit is not None:
        from testmodel import fashion as fm
        mp, tokens, size = kit.model, kit.tokens, kit.latent_size
        return (mp.model.diffusion_model, schedule_of(mp), tokens[:tm.NULL_CLASS].clone(),
                tokens[tm.NULL_CLASS].clone(), {"cond.class_tokens": tokens.contiguous()},
                (tm.WEIGHTS if args.digits else fm.WEIGHTS).name, (4, size, size))
    if not args.teacher or not args.conds:
        raise SystemExit("train_tiue: give --digits, --fashion, or --teacher UNET.safetensors and --conds CONDS.safetensors")
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
    """Student, fake score model and their optimisers; every random draw comes from one generator (the regression
    pairs from a second one, made once and kept in the checkpoint), so a resumed run continues bit for bit."""

    def __init__(self, teacher, alphas_cumprod, conds, null, cfg: Config, latent_chw, device, modules):
        import torch
        self.onepass, self.tiue, self.ldm = modules
        if cfg.vsd <= 0 and cfg.kl <= 0 and cfg.reg <= 0:
            raise SystemExit("train_tiue: every loss weight is 0: set --vsd, --kl or --reg")
        if cfg.kl_reduce not in ("sum", "mean"):
            raise SystemExit(f"train_tiue: --kl-reduce is 'sum' or 'mean', not {cfg.kl_reduce!r}")
        self.cfg, self.device, self.chw = cfg, torch.device(device), tuple(latent_chw)
        self.alphas = alphas_cumprod.to(torch.float64)
        self.alphas_dev = self.alphas.float().to(self.device)
        self.timesteps = self.onepass.ddim_timesteps(cfg.k, num_train_timesteps=len(self.alphas))
        self.final_alpha = float(self.alphas[0])
        self.conds = conds.to(self.device)
        self.null = None if null is None else null.to(self.device)
        self.teacher = copy.deepcopy(teacher).float().to(self.device).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.fake = copy.deepcopy(self.teacher).train().requires_grad_(True) if cfg.vsd > 0 else None
        self.ema = copy.deepcopy(self.teacher).eval().requires_grad_(False)
        self.opt_s = torch.optim.Adam(self.student.parameters(), lr=cfg.lr)
        self.opt_f = torch.optim.Adam(self.fake.parameters(), lr=cfg.fake_lr) if self.fake is not None else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.pairs = None                         # (noise, class index, teacher sample) for --reg, made at step 1
        self.pairs_cache, self.teacher_name = None, "teacher"     # where make_pairs keeps them (main sets it)
        self.to_image = None      # the latent's decoder, where cheap (the test models' pixel shuffle; main sets it)
        self.step_count = 0
        self.history: list[dict] = []             # per step: losses, gradient norms (see ``step``)
        self.evals: list[dict] = []               # per evaluation: step, accuracy, speckle, FD

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

    def teacher_sample(self, noise, context, steps, first=None):
        """The frozen teacher's guided DDIM (eta 0) sample from ``noise`` as the UNet's input at timestep ``first``
        (default: the schedule's top, where a sampler starts; any deterministic noise-to-image map of the teacher's
        can be the student's target), in ``steps`` steps down to the student's last timestep."""
        import torch
        first = len(self.alphas) - 1 if first is None else first
        last = self.timesteps[-1]
        ts = sorted({round(first + (last - first) * i / max(1, steps - 1)) for i in range(steps)}, reverse=True)
        chain = [float(self.alphas[t]) for t in ts] + [self.final_alpha]
        z = noise
        with torch.no_grad():
            for i, t in enumerate(ts):
                e = self.eps(self.teacher, z, torch.full((len(z),), t, device=self.device), context, self.cfg.cfg)
                z = self.onepass.ddim_step(z, e, chain[i], chain[i + 1])
        return z

    def make_pairs(self, chunk=256):
        """The regression pairs (a second generator: the same for every run with this seed), read from
        ``pairs_cache`` when a run with the same teacher and pair settings made them (they cost teacher steps)."""
        import torch
        cfg = self.cfg
        cache = None
        if self.pairs_cache:
            key = f"{self.teacher_name}_s{cfg.seed}_n{cfg.reg_pairs}_k{cfg.reg_steps}_cfg{cfg.cfg:g}_" + \
                "x".join(map(str, self.chw))
            cache = Path(self.pairs_cache) / f"{key}.pt"
            if cache.is_file():
                self.pairs = {k: v.to(self.device) for k, v in torch.load(cache, weights_only=True).items()}
                return
        g = torch.Generator().manual_seed(cfg.seed + 1)
        noise = torch.randn(cfg.reg_pairs, *self.chw, generator=g).to(self.device)
        cls = torch.randint(0, len(self.conds), (cfg.reg_pairs,), generator=g).to(self.device)
        target = torch.cat([self.teacher_sample(noise[i:i + chunk], self.conds[cls[i:i + chunk]], cfg.reg_steps)
                            for i in range(0, cfg.reg_pairs, chunk)])
        self.pairs = dict(noise=noise, cls=cls, target=target)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in self.pairs.items()}, cache.with_suffix(".tmp"))
            os.replace(cache.with_suffix(".tmp"), cache)

    def step(self, diagnose=False):
        """One student update, then ``fake_steps`` fake-score updates; returns this step's record: each loss
        (weighted as trained), the fake score's loss, the student's gradient norm before clipping, and per loss the
        norm of its gradient on each of the K decoder outputs (``g_<loss>``: which term pulls which decoder step).
        ``diagnose`` adds each loss's own gradient norm over the student's weights (one more backward per loss)."""
        import torch
        cfg, b = self.cfg, self.cfg.batch
        idx = self.randint(0, len(self.conds), b)
        context = self.conds[idx]
        noise = self.rand(b, *self.chw)
        t = self.randint(cfg.t_min, cfg.t_max + 1, b)
        eps_t = self.rand(b, *self.chw)

        if cfg.cosine_steps:
            for group in self.opt_s.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, self.step_count / cfg.cosine_steps)))
        res = self.student_sample(self.student, noise, context)
        x0 = res.latent
        terms, outputs = {}, {}
        if cfg.vsd > 0:           # VSD against teacher vs fake score
            a_t = self.alphas_dev[t]
            with torch.no_grad():
                x_t = self.tiue.noised(x0.detach(), eps_t, a_t)
                e_teacher = self.eps(self.teacher, x_t, t, context, cfg.cfg)
                e_fake = self.eps(self.fake.eval(), x_t, t, context, cfg.cfg)
                self.fake.train()
            terms["vsd"] = cfg.vsd * self.tiue.vsd_loss(x0, e_teacher, e_fake, a_t, cfg.vsd_weighting, x_t)
            outputs["vsd"] = res.outputs
        if cfg.kl > 0:            # KL on every predicted noise map
            terms["kl"], outputs["kl"] = self.tiue.kl_loss(res.outputs, cfg.kl, cfg.kl_reduce), res.outputs
        if cfg.reg > 0:           # regression to the teacher's samples of fixed noises
            if self.pairs is None:
                self.make_pairs()
            r = self.randint(0, cfg.reg_pairs, cfg.reg_batch or b)
            rres = self.student_sample(self.student, self.pairs["noise"][r], self.conds[self.pairs["cls"][r]])
            terms["reg"] = cfg.reg * self.tiue.regression_loss(rres.latent, self.pairs["target"][r], cfg.reg_hf,
                                                                self.to_image)
            outputs["reg"] = rres.outputs
        record = {name: term.item() for name, term in terms.items()}
        for name, term in terms.items():
            grads = torch.autograd.grad(term, outputs[name], retain_graph=True, allow_unused=True)
            record["g_" + name] = [0.0 if g is None else float(g.norm()) for g in grads]
        if diagnose:
            params = [p for p in self.student.parameters() if p.requires_grad]
            for name, term in terms.items():
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                record["w_" + name] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
        self.opt_s.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip))
        self.opt_s.step()
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.student.parameters()):
                pe.lerp_(p, 1.0 - cfg.ema)

        # fake score: denoising on the detached student samples, null-condition dropout (``fake_steps`` updates)
        fake_losses = []
        for _ in range(cfg.fake_steps if self.fake is not None else 0):
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
        if fake_losses:
            record["fake"] = sum(fake_losses) / len(fake_losses)

        self.step_count += 1
        self.history.append(record)
        return record

    # -------------------------------------------------------------------------------- state
    def state_dict(self):
        return dict(step=self.step_count, config=asdict(self.cfg), student=self.student.state_dict(),
                    fake=self.fake.state_dict() if self.fake is not None else None, ema=self.ema.state_dict(),
                    opt_s=self.opt_s.state_dict(), opt_f=self.opt_f.state_dict() if self.opt_f is not None else None,
                    generator=self.gen.get_state(), history=self.history, evals=self.evals, pairs=self.pairs)

    def load_state_dict(self, state):
        # a setting added since the checkpoint was made: what that trainer did (no regression, no schedule, ...)
        saved = {**asdict(Config()), **BEFORE_SETTING, **state["config"]}
        if any(saved[k] != v for k, v in asdict(self.cfg).items()):
            diff = {k: (saved.get(k), v) for k, v in asdict(self.cfg).items() if saved.get(k) != v}
            raise SystemExit(f"train_tiue: the checkpoint was made with other settings (checkpoint, now): {diff}")
        self.student.load_state_dict(state["student"])
        if self.fake is not None:
            self.fake.load_state_dict(state["fake"])
            self.opt_f.load_state_dict(state["opt_f"])
        self.ema.load_state_dict(state["ema"])
        self.opt_s.load_state_dict(state["opt_s"])
        self.gen.set_state(state["generator"])
        self.step_count = state["step"]
        self.history = [dict(h) for h in state["history"]]
        self.evals = [dict(e) for e in state.get("evals", [])]
        self.pairs = state.get("pairs")

    def save_checkpoint(self, path):
        import torch
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def save_student(self, path, extra, dtype="fp16", export="ema", **info):
        """The EMA (or raw) student as a ComfyUI UNet safetensors (ldm keys, no prefix) marked as a TiUE student."""
        import torch
        import comfy.utils
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        net = self.ema if export == "ema" else self.student
        sd = {k: v.detach().to("cpu", dt).contiguous() for k, v in net.state_dict().items()}
        meta = self.tiue.student_metadata(sd, timesteps=self.timesteps, prediction="eps", steps=self.step_count,
                                          weights=export, **info)
        sd.update({k: v.detach().cpu().contiguous() for k, v in extra.items()})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        comfy.utils.save_torch_file(sd, str(path), metadata=meta)
        return meta


# ------------------------------------------------------------------------------------------------ evaluation

class Judge:
    """How the test teachers' one-pass samples are scored during and after training (no draws from the trainer's
    generator), as ``tools/quality_benchmark.py`` scores a run (its model ``kit``): class accuracy, speckle (mean
    squared Laplacian over the real images') and the Frechet distance in the benchmark's feature space, on
    ``per_class`` samples of each class from fixed noise (seed 0)."""

    def __init__(self, qb, kit, to_images, per_class):
        self.qb, self.kit, self.to_images, self.per_class = qb, kit, to_images, per_class

    def __call__(self, trainer, unet):
        """({accuracy, speckle, fd}, images) of ``unet``'s one pass (noise as ComfyUI's KSampler makes it)."""
        import torch
        import comfy.sample
        classes = [c for c in range(10) for _ in range(self.per_class)]
        noise = comfy.sample.prepare_noise(torch.zeros(len(classes), *trainer.chw), 0).to(trainer.device)
        with torch.no_grad():
            z0 = torch.cat([trainer.student_sample(unet, noise[i:i + 200], trainer.conds[torch.tensor(classes[i:i + 200])],
                                                   max_decoder_batch=0).latent for i in range(0, len(classes), 200)])
        images = self.to_images(z0.cpu())       # model space -> image (the latent format divides, decode multiplies)
        return dict(accuracy=round(float((self.kit.classify(images) == torch.tensor(classes).numpy()).mean()), 4),
                    speckle=round(self.qb.speckle(self.kit, images), 3),
                    fd=round(self.qb.frechet(self.kit.features(images), self.kit.real), 2)), images


def summary(history, every=50):
    """The log's curves: each record's numbers averaged over ``every`` steps (lists element-wise)."""
    keys = sorted({k for h in history for k in h})
    out = {}
    for key in keys:
        rows = [h[key] for h in history if key in h]
        if not rows:
            continue
        curve = []
        for j in range(0, len(rows) - every + 1, every):
            chunk = rows[j:j + every]
            if isinstance(chunk[0], list):
                curve.append([round(sum(c[i] for c in chunk) / every, 6) for i in range(len(chunk[0]))])
            else:
                curve.append(round(sum(chunk) / every, 6))
        out[key] = curve
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", action="store_true", help="distil the committed digits test model")
    ap.add_argument("--fashion", action="store_true", help="distil the committed Fashion-MNIST test model")
    ap.add_argument("--teacher", help="teacher UNet/checkpoint safetensors (ComfyUI's loader must read it)")
    ap.add_argument("--conds", help="safetensors with 'context' [N,T,D] and 'null' [T,D]")
    ap.add_argument("--latent-size", type=int, default=0, help="latent height = width (default: the test model's, 64 else)")
    ap.add_argument("--out", help=f"the student safetensors (default with --digits: {STUDENT.relative_to(tm.REPO)}, "
                                  f"with --fashion: {FASHION_STUDENT.relative_to(tm.REPO)})")
    ap.add_argument("--log", help="the JSON log (default: next to --out, <stem>_log.json)")
    ap.add_argument("--checkpoint", help="checkpoint file (default: out/tiue/<stem>.ckpt)")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    ap.add_argument("--init-student", help="start the student from this student safetensors instead of the teacher "
                                           "(a second stage with other losses; ignored when resuming)")
    ap.add_argument("--pairs-cache", default=str(tm.REPO / "out" / "tiue" / "pairs"),
                    help="folder where the regression pairs (--reg) are kept for other runs ('' = none)")
    ap.add_argument("--steps", type=int, default=100000, help="stop after this many steps in total")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this much wall time")
    ap.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--export", choices=("ema", "raw"), default="ema",
                    help="which weights --out gets: the EMA of the student's (default) or the student's own (a short "
                         "run whose EMA still holds much of the teacher; with --cosine-steps they end smooth)")
    ap.add_argument("--device", default="", help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="score the EMA student's one pass every N steps (and save its samples: <checkpoint>_samples/), "
                         "with each loss's weight-gradient norm (test teachers; 0: only at the end)")
    ap.add_argument("--eval-per-digit", "--eval-per-class", dest="eval_per_class", type=int, default=10,
                    help="one-pass samples per class scored (test teachers)")
    for name, value in asdict(Config()).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = ap.parse_args(argv)
    require("tiue")
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tm.boot_comfy(cpu=device == "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config())})
    out = Path(args.out) if args.out else (STUDENT if args.digits else FASHION_STUDENT if args.fashion else None)
    if out is None:
        raise SystemExit("train_tiue: give --out")
    log_path = Path(args.log) if args.log else out.with_name(out.stem + "_log.json")
    ckpt = Path(args.checkpoint) if args.checkpoint else tm.REPO / "out" / "tiue" / (out.stem + ".ckpt")

    modules = pack_modules()       # first: it imports ComfyUI's nodes, which the benchmark's path would shadow
    qb = kit = None
    if args.digits or args.fashion:        # the benchmark's kit: the teacher loaded, its scores
        import quality_benchmark as qb
        kit = (qb.Digits if args.digits else qb.Fashion)(device)
    teacher, alphas, conds, null, extra, teacher_name, chw = load_teacher(args, kit)
    trainer = Trainer(teacher, alphas, conds, null, cfg, chw, device, modules)
    trainer.teacher_name, trainer.pairs_cache = Path(teacher_name).stem, args.pairs_cache
    if args.digits or args.fashion:       # their "VAE" folds 2x2 pixels into 4 channels
        trainer.to_image = lambda latent: torch.nn.functional.pixel_shuffle(latent, 2)
    elif cfg.reg and cfg.reg_hf:
        print(f"train_tiue: --reg-hf {cfg.reg_hf:g} acts on the latent's channels (this teacher's VAE is too costly "
              "to run in the loss); measured only on the test models' pixel latents: --reg-hf 0 turns it off", flush=True)
    if args.resume and ckpt.is_file():
        trainer.load_state_dict(torch.load(ckpt, map_location=device, weights_only=False))
        print(f"resumed from {ckpt} at step {trainer.step_count}", flush=True)
    elif args.init_student:          # a second stage: the student (and its EMA) start from an earlier student
        sd = {k: v for k, v in comfy.utils.load_torch_file(args.init_student).items() if k in trainer.student.state_dict()}
        for net in (trainer.student, trainer.ema):
            net.load_state_dict({k: v.to(device, torch.float32) for k, v in sd.items()})
        print(f"student initialised from {args.init_student}", flush=True)
    judge = None
    if kit is not None:
        from testmodel import fashion as fm
        judge = Judge(qb, kit, tm.latents_to_images if args.digits else fm.latents_to_images, args.eval_per_class)
    total = max(args.steps, trainer.step_count)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=trainer.step_count, desc="TiUE", mininterval=2.0, file=sys.stdout)
    prior_seconds = 0.0
    if log_path.is_file() and trainer.step_count:
        prior_seconds = json.loads(log_path.read_text()).get("train_seconds", 0.0)
    t0 = time.time()

    grids = ckpt.parent / (ckpt.stem + "_samples")

    def evaluate():           # scores, and a grid of the EMA student's one pass (10 of each class) per evaluation
        scores, images = judge(trainer, trainer.ema)
        trainer.evals.append(dict(step=trainer.step_count, **scores, raw=judge(trainer, trainer.student)[0]))
        grids.mkdir(parents=True, exist_ok=True)
        tm.save_grid(images[::max(1, args.eval_per_class // 10)][:100], grids / f"step_{trainer.step_count:06d}.png")
        return scores, images

    stopped = "steps"
    while trainer.step_count < total:
        diagnose = bool(args.eval_every) and (trainer.step_count + 1) % args.eval_every == 0
        rec = trainer.step(diagnose=diagnose)
        if bar is not None:
            bar.update(1)
            if trainer.step_count % 10 == 0:
                bar.set_postfix(refresh=False, **{k: f"{v:.3g}" for k, v in rec.items() if not isinstance(v, list)})
        if diagnose and judge is not None:
            scores, _ = evaluate()
            line = "  ".join(f"{k} {v:.3g}" for k, v in rec.items() if k.startswith("w_") or k == "grad_norm")
            (bar.write if bar is not None else print)(f"step {trainer.step_count}: EMA {scores}, raw "
                                                      f"{trainer.evals[-1]['raw']}  |  {line}")
        if trainer.step_count % args.checkpoint_every == 0:
            trainer.save_checkpoint(ckpt)
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
            stopped = "time"
            break
    if bar is not None:
        bar.close()
    trainer.save_checkpoint(ckpt)
    train_seconds = round(prior_seconds + time.time() - t0, 1)

    info = dict(teacher=teacher_name, cfg=cfg.cfg, batch=cfg.batch, vsd_weight=cfg.vsd, kl_weight=cfg.kl,
                kl_reduce=cfg.kl_reduce, reg_weight=cfg.reg, trainer="tools/train_tiue.py",
                init_student=Path(args.init_student).name if args.init_student else None)
    trainer.save_student(out, extra, args.save_dtype, args.export, **info)
    hist = trainer.history
    log = dict(config=asdict(cfg), teacher=teacher_name, init_student=args.init_student, steps=trainer.step_count,
               stopped_by=stopped,
               timesteps=trainer.timesteps, final_alpha_cumprod=trainer.final_alpha, device=device,
               threads=torch.get_num_threads(), train_seconds=train_seconds,
               seconds_per_step=round(train_seconds / max(1, trainer.step_count), 4), save_dtype=args.save_dtype,
               command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               evaluations="the EMA student's one pass (raw: the student's own weights)",
               record="per step: each loss as weighted in training; g_<loss>: its gradient's norm on each of the K "
                      "decoder outputs (first = noisiest); grad_norm: the student's before clipping; fake: the fake "
                      "score's loss; w_<loss>: its gradient's norm over the student's weights (at evaluations)",
               every_50=summary([{k: v for k, v in h.items() if not k.startswith("w_")} for h in hist]),
               weight_gradients=[dict(step=i + 1, **{k: round(v, 6) for k, v in h.items() if k.startswith("w_")})
                                 for i, h in enumerate(hist) if any(k.startswith("w_") for k in h)])
    if judge is not None:
        if not trainer.evals or trainer.evals[-1]["step"] != trainer.step_count:
            evaluate()
        scores, images = judge(trainer, trainer.ema if args.export == "ema" else trainer.student)
        teacher_scores, _ = judge(trainer, trainer.teacher)
        tm.save_grid(images[::max(1, args.eval_per_class // 10)][:100] if args.eval_per_class >= 10 else images,
                     out.with_name(out.stem + "_samples.png"))
        log.update(evals=trainer.evals, final=scores, teacher_one_pass=teacher_scores,
                   sample_accuracy=scores["accuracy"], teacher_one_pass_accuracy=teacher_scores["accuracy"],
                   exported=args.export,
                   sample_setting=f"one pass of the exported weights, K DDIM timesteps above, seed 0, {args.eval_per_class} per class, no CFG; "
                                  "speckle: mean squared Laplacian over the real images'; fd: the benchmark's feature "
                                  "space (few samples: compare within this log)")
        print(f"one-pass student {scores}; undistilled teacher {teacher_scores}")
    log_path.write_text(json.dumps(log, indent=1))
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) after {trainer.step_count} steps, {train_seconds:.0f}s; "
          f"log {log_path}; checkpoint {ckpt}", flush=True)
    return trainer


if __name__ == "__main__":
    main()
