"""A tiny random-weight DiT pipeline built from configs (no downloads): ``DiTPipeline`` with a
``DiTTransformer2DModel`` in DiT-XL/2's layout (patch 2, adaLN-Zero blocks, 1000 ImageNet classes plus the null class
1000 for CFG, learned sigma: 8 output channels for 4 latent ones) at a tiny width and depth, the tiny VAE of
``diffusers_tiny`` and DDIM on DiT's linear beta schedule.  Latents are 4 x 8 x 8 (16 tokens).  Used by
tests/test_diffusers_dit.py; ``bench_cases()`` gives a small real-shaped DiT-XL/2 (28 blocks, 32 x 32 latent).

DiTPipeline has no latent output (it always decodes with the VAE and clamps to [0, 1]), so ``run`` and
``call_latents`` read the loop (``loop_record``): the model output each ``scheduler.step`` gets and the latents it
returns, the first half of the rows under CFG (both halves get the same guided output; the pipeline's own
``chunk(2)`` keeps the first).
"""
from __future__ import annotations

import contextlib
import functools

import diffusers_tiny as dt
import torch

DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=6,
           sample_size=dt.LATENT, patch_size=2)
# DiT's DDIM (the facebook/DiT-XL-2-256 scheduler: linear betas 1e-4 .. 0.02, no clipping)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 clip_sample=False)


def dit_xl2_layout(width: int = 288, latent: int = 32):
    """Transformer overrides for the real DiT-XL/2 layout (28 blocks, patch 2, head dim 72, learned sigma) at width
    ``width`` (DiT-XL: 1152 = 16 heads of 72) on a ``latent`` x ``latent`` latent (DiT-XL/2-256: 32)."""
    return dict(num_layers=28, attention_head_dim=72, num_attention_heads=width // 72, sample_size=latent,
                patch_size=2, in_channels=4, out_channels=8)


def transformer(seed: int = 0, **overrides):
    from diffusers import DiTTransformer2DModel
    dt._seeded(seed)
    return DiTTransformer2DModel(**{**DIT, **overrides}).eval()


def scheduler(name: str = "DDIMScheduler"):
    import diffusers
    return getattr(diffusers, name)(**SCHEDULER)


def dit(seed: int = 0, sched: str = "DDIMScheduler", **overrides):
    """A DiTPipeline on a tiny transformer (``overrides``: its config) and the tiny VAE."""
    import diffusers
    pipe = diffusers.DiTPipeline(transformer=transformer(seed, **overrides), vae=dt.vae(seed),
                                 scheduler=scheduler(sched))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def loop_record(pipe):
    """(model output, latents after the step) of each ``scheduler.step`` of the calls inside, in a list."""
    sched = pipe.scheduler
    original = sched.step
    kept = []

    @functools.wraps(original)
    def step(model_output, *a, **k):
        out = original(model_output, *a, **k)
        kept.append((model_output.clone(), (out[0] if isinstance(out, tuple) else out.prev_sample).clone()))
        return out
    vars(sched)["step"] = step
    try:
        yield kept
    finally:
        vars(sched).pop("step")


def call_latents(pipe, kwargs: dict) -> torch.Tensor:
    """The final latents [len(class_labels), 4, h, w] of the call ``pipe(**kwargs)``."""
    with loop_record(pipe) as kept:
        pipe(**kwargs)
    return kept[-1][1][:len(kwargs["class_labels"])]


def run(pipe, labels=(3,), steps: int = 8, seeds=None, guidance_scale: float = 4.0, **kw) -> torch.Tensor:
    """The model output (guided noise prediction) every step of one DiTPipeline call hands its scheduler, stacked:
    [steps, len(labels), 4, h, w].  Label i's noise comes from seed ``seeds[i]`` (default i): one generator per
    label, so a label's run never depends on the others in the batch.  (Step outputs, not the final latents: DiT's
    linear schedule scales the first steps' x0 predictions by up to 150, so the last steps barely move the final
    latents of a random model.)"""
    seeds = range(len(labels)) if seeds is None else seeds
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with loop_record(pipe) as kept:
        pipe(class_labels=list(labels), num_inference_steps=steps, guidance_scale=guidance_scale,
             generator=generators, output_type="pt", **kw)
    return torch.stack([out[:len(labels)] for out, _ in kept])


# ----------------------------------------------------------------------------------------- benchmark

def _dit_xl2_small():
    return dit(**dit_xl2_layout())


def bench_cases():
    """name -> (build, call kwargs, strategy, latent_of_call): DiT-XL/2's layout (28 blocks, patch 2, head dim 72,
    learned sigma) at width 288 (4 heads; DiT-XL: 1152) on its real 32 x 32 latent (256 tokens), two ImageNet
    classes, CFG 4 (the pipeline's default), DDIM at 25 steps, strategy "paper" with the paper's split after block 18
    of 28 (the default).  The latent is the loop's (``call_latents``: the pipeline has no latent output)."""
    return {"dit_xl2_w288": (_dit_xl2_small, dict(class_labels=[207, 360], num_inference_steps=25, guidance_scale=4.0,
                                                  output_type="pt"), "paper", call_latents)}
