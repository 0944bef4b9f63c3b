"""AnimateDiff in real ComfyUI: a UNetModel patched the way ComfyUI-AnimateDiff-Evolved patches it, with a stand-in motion
module built here (no AnimateDiff-Evolved code).

What AnimateDiff-Evolved does (animatediff/model_injection.py, motion_module_ad.py, sampling.py), mirrored here:
  * the motion modules are extra entries of the UNet's TimestepEmbedSequential blocks: a ModelPatcher injection
    (``set_injections(key, [PatcherInjection(inject, eject)])``) inserts one into ``input_blocks[i]``,
    ``middle_block`` and ``output_blocks[i]`` right after the block's last SpatialTransformer, else after its first
    ResBlock, and takes them out again on eject;
  * ``forward_timestep_embed`` reaches them through a ``forward_timestep_embed_patch`` (their class, a handler that
    calls ``layer(x, context, transformer_options=...)``);
  * the frame count is an attribute of every motion module (``video_length``), set before sampling from the latent
    batch (an OUTER_SAMPLE wrapper) and, with sliding context windows, before each window's call; the module
    reshapes its (videos * frames) rows by it;
  * sliding contexts: a CALC_COND_BATCH wrapper calls the model once per window on that window's frames, with the
    window's frames in ``transformer_options["ad_params"]["sub_idxs"]`` and on the modules (positional encoding);
    windows may move from step to step ("uniform" schedules).

A batched decoder call stacks whole calls step-major, so the motion modules see steps * videos videos of
``video_length`` frames: right as long as the frame count they read is one video's.  Each context window is its own
call slot, keyed by its frames (patches/comfy/unet.py ``window_frames``).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import testmodel as tm
from conftest import apply

FRAMES = 6
STEPS = 8
KEY = "fd_test_animatediff"


def rel(a, b):
    return float((a - b).norm() / b.norm())


class TemporalAttention(torch.nn.Module):
    """A stand-in motion module: single-head self-attention across the frames of each video at every pixel, with a
    positional encoding of the frame indices, added to its input.  Rows are (videos * frames), video by video."""

    def __init__(self, channels: int, seed: int, max_len: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = torch.nn.GroupNorm(8, channels)
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.proj = torch.nn.Linear(channels, channels)
        with torch.no_grad():
            for p in (self.qkv.weight, self.proj.weight):
                p.copy_(torch.randn(p.shape, generator=g) / channels ** 0.5)
        self.pe = torch.nn.Parameter(torch.randn(max_len, channels, generator=g) * 0.5)
        self.video_length = 16          # set per run (and per window) by the motion model
        self.sub_idxs = None            # the window's frames, or None: all
        self.calls = []                 # (rows, video_length) of each call, for the tests

    def forward(self, x, context=None, transformer_options=None):
        rows, c, h, w = x.shape
        f = self.video_length
        self.calls.append((rows, f))
        frames = list(range(f)) if self.sub_idxs is None else self.sub_idxs
        t = self.norm(x).reshape(rows // f, f, c, h * w).permute(0, 3, 1, 2).reshape(-1, f, c) + self.pe[frames]
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        out = self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return x + out.reshape(rows // f, h * w, f, c).permute(0, 2, 3, 1).reshape(rows, c, h, w)


def temporal_handler(layer, x, emb, context, transformer_options, *args, **kwargs):
    """The forward_timestep_embed_patch of the motion modules (AnimateDiff-Evolved's calls them the same way)."""
    return layer(x, context, transformer_options=transformer_options)


def _blocks(unet):
    return list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)


def _place(block) -> int | None:
    """Where a motion module goes in a block: after its last SpatialTransformer, else after its first ResBlock."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    kinds = [type(m) for m in block]
    if SpatialTransformer in kinds:
        return len(kinds) - kinds[::-1].index(SpatialTransformer)
    return kinds.index(ResBlock) + 1 if ResBlock in kinds else None


class StandInMotionModel:
    """One motion module per block that has a ResBlock, injected into the UNet's block lists by a ModelPatcher
    injection; the frame count and window frames are set on every module."""

    def __init__(self, unet, seed: int = 7):
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
        self.modules = [TemporalAttention(next(m for m in b if isinstance(m, ResBlock)).out_channels, seed + i)
                        if _place(b) is not None else None for i, b in enumerate(_blocks(unet))]
        self.sigmas = None

    def inject(self, patcher):
        for block, module in zip(_blocks(patcher.model.diffusion_model), self.modules):
            if module is not None:
                block.insert(_place(block), module)

    def eject(self, patcher):
        for block in _blocks(patcher.model.diffusion_model):
            for i in reversed([i for i, m in enumerate(block) if isinstance(m, TemporalAttention)]):
                block.pop(i)

    def set_video_length(self, frames: int, sub_idxs=None):
        for m in filter(None, self.modules):
            m.video_length, m.sub_idxs = frames, sub_idxs

    def calls(self) -> list:
        return [c for m in filter(None, self.modules) for c in m.calls]


def moving_windows(step: int) -> list:
    """Windows of 4 of the 6 frames that move with the step, as AnimateDiff-Evolved's "uniform" schedules do."""
    shift = step % 2
    return [[(j + shift + k) % FRAMES for k in range(4)] for j in (0, 3)]


def static_windows(step: int) -> list:
    return [[0, 1, 2, 3], [2, 3, 4, 5]]


def with_animatediff(model, windows=None, seed: int = 7):
    """A clone of ``model`` with the stand-in motion model attached the way AnimateDiff-Evolved attaches its own:
    injection, forward_timestep_embed_patch, the frame count from the latent batch (OUTER_SAMPLE) and, with
    ``windows`` (step -> lists of frames), sliding context windows (CALC_COND_BATCH).  Returns (clone, motion model)."""
    import comfy.patcher_extension as pe
    m = model.clone()
    mm = StandInMotionModel(m.model.diffusion_model, seed)
    m.set_injections(KEY, [pe.PatcherInjection(inject=mm.inject, eject=mm.eject)])
    m.set_model_forward_timestep_embed_patch((TemporalAttention, temporal_handler))

    def outer_sample(executor, *args, **kwargs):
        latents, mm.sigmas = args[1], args[3]
        mm.set_video_length(latents.shape[0])
        return executor(*args, **kwargs)

    def sliding_calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        step = int((mm.sigmas - timestep[0]).abs().argmin())
        ad_params = {"full_length": x_in.shape[0], "context_length": None, "sub_idxs": None}
        model_options = {**model_options, "transformer_options": {**model_options["transformer_options"],
                                                                  "ad_params": ad_params}}
        finals = [torch.zeros_like(x_in) for _ in conds]
        counts = torch.zeros(x_in.shape[0], 1, 1, 1)
        try:
            for idxs in windows(step):
                mm.set_video_length(len(idxs), idxs)
                ad_params.update(sub_idxs=idxs, context_length=len(idxs))
                outs = executor(model, conds, x_in[idxs], timestep[idxs], model_options)
                for final, out in zip(finals, outs):
                    final[idxs] += out
                counts[idxs] += 1
        finally:
            mm.set_video_length(x_in.shape[0])
        return [f / counts for f in finals]

    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, outer_sample)
    if windows is not None:
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, KEY, sliding_calc_cond_batch)
    return m, mm


@pytest.fixture(scope="module")
def base_model(comfy):
    """A random-weight model of the digits architecture (SD1.5 layout: SpatialTransformers on every level)."""
    return tm.build_model_patcher(tm.digits_model_config(), seed=5)


def conditioning(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([[torch.randn(1, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g), {}]],
            [[torch.zeros(1, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM), {}]])


def sample(model, steps=STEPS):
    import comfy.sample
    latent = torch.zeros(FRAMES, 4, tm.LATENT_SIZE, tm.LATENT_SIZE)
    pos, neg = conditioning()
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 3), steps, 4.0, "euler", "karras", pos, neg,
                               latent, seed=3, disable_pbar=True)


# ------------------------------------------------------------------------------------------ the split

def test_decoder_on_fresh_features_equals_the_host_forward_and_batches_steps_whole(pack, comfy):
    """With the motion modules injected: encode + decode == the host forward bit for bit; two steps' calls (cond and
    uncond videos of FRAMES frames each) in one decoder batch equal one call per step, the motion modules seeing the
    4 videos of FRAMES frames in one call."""
    model = tm.build_model_patcher(tm.digits_model_config(), seed=6)
    m, mm = with_animatediff(model)
    mm.inject(m)
    try:
        unet = m.model.diffusion_model
        assert sum(isinstance(x, TemporalAttention) for b in _blocks(unet) for x in b) == 3 + 1 + 6
        assert [type(x).__name__ for x in unet.input_blocks[1]] == ["ResBlock", "SpatialTransformer", "TemporalAttention"]
        mm.set_video_length(FRAMES)
        adapter = pack.ldm.LdmUNetAdapter(unet)
        g = torch.Generator().manual_seed(2)
        rows = 2 * FRAMES
        x = torch.randn(rows, 4, 8, 8, generator=g)
        ctx = torch.randn(rows, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g)
        to = lambda: {"patches": {"forward_timestep_embed_patch": [(TemporalAttention, temporal_handler)]},
                      "cond_or_uncond": [0, 1]}
        t, t2 = torch.full((rows,), 600.0), torch.full((rows,), 250.0)
        call = lambda t: pack.ldm.make_call(x, t, ctx, None, None, {**to(), "sigmas": t}, {})
        with torch.no_grad():
            ref = unet(x, t, ctx, None, None, to())
            y = x.clone()
            y[FRAMES - 1] += 1.0
            assert rel(unet(y, t, ctx, None, None, to())[0], ref[0]) > 1e-4, "frames mix"
            c = call(t)
            emb = adapter.embed(c)
            feats = adapter.encode(c, emb)
            assert torch.equal(adapter.decode(c, feats, emb), ref)
            other = adapter.decode(call(t2), feats, adapter.embed(call(t2)))
            assert rel(other, ref) > 1e-3
            for m_ in filter(None, mm.modules):
                m_.calls.clear()
            outs, widths = pack.runtime.decode_steps(adapter, c, feats, [(t, t), (t2, t2)], 0)
            assert widths == [2] and rel(outs[0], ref) < 1e-5 and rel(outs[1], other) < 1e-5
            assert {(r // f, f) for r, f in mm.calls()} == {(4, FRAMES)}, "4 videos of FRAMES frames in one call"
            outs, widths = pack.runtime.decode_steps(adapter, c, feats, [(t, t), (t2, t2)], 2 * rows - 1)
            assert widths == [1, 1] and rel(outs[1], other) < 1e-5, "a step's frames are never split"
    finally:
        mm.eject(m)
    assert not any(isinstance(x, TemporalAttention) for b in _blocks(m.model.diffusion_model) for x in b)


# ------------------------------------------------------------------------------------------ sampling

def test_all_is_identical_and_parallel_equals_sequential(pack, base_model):
    m, mm = with_animatediff(base_model)
    base = sample(m)
    assert {f for _, f in mm.calls()} == {FRAMES}, "the frame count came from the latent batch"
    allk, _ = apply(pack, m, "all")
    assert torch.equal(sample(allk), base)
    runs = {}
    for parallel, cap in ((False, 32), (True, 0), (True, 2 * 2 * FRAMES), (True, 2 * FRAMES)):
        patched, config = apply(pack, m, "uniform:3", parallel=parallel, max_decoder_batch=cap)
        runs[parallel, cap] = (sample(patched), config.reports[-1])
    seq, r = runs[False, 32]
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (3, 5, 0), r      # groups 0-2, 3-5, 6-7
    for (parallel, cap), batches in (((True, 0), [3, 3, 2]), ((True, 2 * 2 * FRAMES), [2, 1, 2, 1, 2]),
                                     ((True, 2 * FRAMES), [1] * 8)):
        out, r = runs[parallel, cap]
        assert r["decoder_batches"] == batches and r["cached_calls"] == 5, (cap, r)
        assert rel(out, seq) < 1e-4, cap
    assert rel(seq, base) > 1e-4 and torch.isfinite(seq).all()


@pytest.mark.parametrize("parallel", [False, True])
def test_static_context_windows_are_served_window_by_window(pack, base_model, parallel):
    """Windows of the same frames every step: each window is a call slot of its own, served from its own key step's
    features (with the modules set to its frames)."""
    m, mm = with_animatediff(base_model, static_windows)
    base = sample(m)
    assert {f for _, f in mm.calls()} == {4}
    allk, _ = apply(pack, m, "all")
    assert torch.equal(sample(allk), base)
    seq_m, _ = apply(pack, m, "uniform:2", parallel=False)
    seq = sample(seq_m)
    patched, config = apply(pack, m, "uniform:2", parallel=parallel)
    out = sample(patched)
    r = config.reports[-1]
    assert (r["encoder_calls"], r["cached_calls"], r["fallback_calls"]) == (8, 8, 0), r      # 4 keys x 2 windows
    assert rel(out, seq) < 1e-4 and rel(out, base) > 1e-4


@pytest.mark.parametrize("parallel", [False, True])
def test_windows_that_move_with_the_step_are_never_served_other_frames(pack, base_model, parallel):
    """Windows that move every step: a non-key step's windows hold frames no key-step window of its group held, so
    they run in full (counted), and the result is the unpatched one (bit for bit when sequential)."""
    m, mm = with_animatediff(base_model, moving_windows)
    base = sample(m)
    patched, config = apply(pack, m, "uniform:2", parallel=parallel)
    out = sample(patched)
    r = config.reports[-1]
    assert (r["encoder_calls"], r["cached_calls"], r["fallback_calls"]) == (8, 0, 8), r
    assert torch.equal(out, base) if not parallel else rel(out, base) < 1e-5


def test_the_frames_of_a_window_tell_call_slots_apart(pack):
    slot = pack.cu.call_slot
    x = torch.zeros(8, 4, 8, 8)
    to = lambda sub: {"ad_params": {"full_length": 16, "context_length": 8, "sub_idxs": sub}}
    assert slot(x, to(list(range(8)))) == slot(x, to(list(range(8))))
    assert slot(x, to(list(range(8)))) != slot(x, to(list(range(4, 12))))
    assert slot(x, {}) == slot(x, to(None)), "no window: as before"
    # ComfyUI's own context windows: an IndexListContextWindow (its index_list and dim) in transformer_options
    native = lambda idxs: {"context_window": SimpleNamespace(index_list=idxs, dim=0)}
    assert slot(x, native([0, 1])) == slot(x, native([0, 1])) != slot(x, native([1, 2]))
