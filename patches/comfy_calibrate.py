"""ComfyUI glue for calibration: one full sampling pass that records how the encoder features move.

A DIFFUSION_MODEL wrapper on a clone runs each on-schedule call through the split UNet (identical to the
host forward, pinned by the parity test) and keeps a pooled copy of the skip tensors and middle output per
step.  ``fasterdiffusion.calibrate`` then picks the key steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..fasterdiffusion import match_step
from .comfy_unet import WRAP, embed_time, run_decoder, run_encoder
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

POOL = 16   # features are average-pooled to at most 16x16 per channel: enough to see drift, small to keep


class FeatureRecorder:
    def __init__(self, schedule):
        self.schedule = schedule
        self.steps: dict[int, dict[tuple, list[torch.Tensor]]] = {}   # step -> cond chunks -> pooled features
        self.encoder_share = None     # encoder+middle share of the UNet's FLOPs, counted on the first call

    def wrapper(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        unet = executor.class_obj
        step = match_step(self.schedule, float(transformer_options["sigmas"].flatten()[0]))
        if type(unet) is not UNetModel or step is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        emb = embed_time(unet, timesteps, y, x.dtype, transformer_options)
        if self.encoder_share is not None:
            feats = run_encoder(unet, x, emb, context, control, transformer_options, kwargs)
            self._record(step, transformer_options, feats)
            return run_decoder(unet, feats, emb, context, control, transformer_options, kwargs)
        with FlopCounterMode(display=False) as enc:           # first call: also count the encoder's share
            feats = run_encoder(unet, x, emb, context, control, transformer_options, kwargs)
        self._record(step, transformer_options, feats)
        with FlopCounterMode(display=False) as dec:
            out = run_decoder(unet, feats, emb, context, control, transformer_options, kwargs)
        total = enc.get_total_flops() + dec.get_total_flops()
        self.encoder_share = enc.get_total_flops() / total if total else 0.31
        return out

    def _record(self, step, to, feats):
        # per cond chunk: cond and uncond may come in separate calls; a second call of the same chunk at the
        # same step (a Heun-type corrector lands on the next step first) is replaced by the later one
        chunk = (tuple(map(str, to.get("uuids", ()))), tuple(to.get("cond_or_uncond", ())))
        self.steps.setdefault(step, {})[chunk] = [_pool(t) for t in feats.hs + [feats.mid]]

    def drift(self) -> list[list[float]]:
        """drift[a][j]: mean over feature tensors of |f_j - f_a|^2 / |f_j|^2 (0 on and below the diagonal)."""
        n = len(self.schedule) - 1
        missing = [i for i in range(n) if i not in self.steps]
        if missing:
            raise RuntimeError(f"calibration saw no model call at steps {missing}: the sampler skipped them")
        feats = [[torch.cat(parts) for parts in zip(*(self.steps[i][c] for c in sorted(self.steps[i])))]
                 for i in range(n)]
        out = [[0.0] * n for _ in range(n)]
        for j in range(n):
            norms = [float((t ** 2).sum()) + 1e-12 for t in feats[j]]
            for a in range(j):
                out[a][j] = sum(float(((fj - fa) ** 2).sum()) / nj
                                for fj, fa, nj in zip(feats[j], feats[a], norms)) / len(norms)
        return out


def _pool(t):
    h, w = t.shape[-2:]
    if h > POOL or w > POOL:
        t = F.adaptive_avg_pool2d(t, (min(h, POOL), min(w, POOL)))
    return t.detach().float().cpu()


def recording_model(model, schedule):
    """(a clone of ``model`` that records encoder features per step, the recorder)."""
    recorder = FeatureRecorder([float(s) for s in schedule])
    m = model.clone()
    m.add_wrapper_with_key(WRAP.DIFFUSION_MODEL, "faster_diffusion_calibrate", recorder.wrapper)
    return m, recorder
