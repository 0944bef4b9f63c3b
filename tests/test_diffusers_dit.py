"""DiT in diffusers 0.42.1: ``DiTPipeline`` on ``DiTTransformer2DModel``, the transformer split (encoder = patch
embedding + the first N blocks, decoder = the rest + the final adaLN layer + unpatchify; fasterdiffusion/diffusers/
dit.py).  A tiny random-weight pipeline (tests/diffusers_tiny_dit.py: 6 blocks, learned sigma, 8 x 8 latents), DDIM
at 8 steps, CFG 4 (the pipeline doubles the batch with the null class 1000); compared are the guided model outputs
every step hands the scheduler.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import diffusers_tiny as dt  # noqa: E402
import diffusers_tiny_dit as dd  # noqa: E402
from diffusers_checks import rel  # noqa: E402
from fasterdiffusion import diffusers as fdd  # noqa: E402
from fasterdiffusion.diffusers import dit  # noqa: E402
from fasterdiffusion.runtime import decode_steps, format_report  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
DEPTH = dd.DIT["num_layers"]     # 6 blocks: the default split is round(6 * 18 / 28) = 4
ROWS = 2                         # rows of one step's call: one label and its null-class twin (CFG)


@functools.lru_cache(maxsize=None)
def pipeline():
    return dd.dit()


def sample(**kw):
    return dd.run(pipeline(), **{"steps": STEPS, **kw})


def state_of(pipe):
    """What apply() may touch and remove() must restore."""
    return (type(pipe), type(pipe).__call__, {k: id(v) for k, v in pipe.components.items()},
            sorted(vars(pipe.transformer)), sorted(vars(pipe.scheduler)), pipe.transformer.forward.__func__)


@contextlib.contextmanager
def block_calls(transformer):
    """Per module of the transformer (pos_embed, each block, proj_out_2): how many times it ran, and on how many
    rows in all, while inside."""
    counts = {}
    modules = {"pos_embed": transformer.pos_embed, "proj_out_2": transformer.proj_out_2,
               **{i: b for i, b in enumerate(transformer.transformer_blocks)}}
    hooks = [m.register_forward_hook(lambda m, args, out, k=k: counts.__setitem__(
        k, (counts.get(k, (0, 0))[0] + 1, counts.get(k, (0, 0))[1] + args[0].shape[0]))) for k, m in modules.items()]
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------------ exactness

def test_all_and_remove_are_bit_identical():
    """``all`` (reuse and forecast) equals the unpatched pipeline bit for bit; a direct transformer call outside a
    pipeline call runs the original; remove() restores the pipeline exactly."""
    pipe = pipeline()
    base = sample()
    before = state_of(pipe)
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([3, 1000])
    with torch.no_grad():
        direct = pipe.transformer(x, t, labels).sample
    for propagation in ("reuse", "forecast"):
        handle = fdd.apply(pipe, "all", propagation=propagation)
        try:
            assert torch.equal(sample(), base)
            assert "step" not in vars(pipe.scheduler), "nothing of the call left on the scheduler"
            with torch.no_grad():
                assert torch.equal(pipe.transformer(x, t, labels).sample, direct)
        finally:
            handle.remove()
        assert state_of(pipe) == before and not hasattr(pipe.transformer, "_diffusers_hook")
        (r,) = handle.reports
        assert (r["steps"], r["full_calls"], r["encoder_calls"], r["cached_calls"]) == (STEPS, STEPS, 0, 0)
        assert r["off_schedule_calls"] == 0 and "bypassed" not in r
    assert torch.equal(sample(), base), "removal restores the pipeline exactly"


DECODER_CASES = {                                  # transformer overrides, latent size
    "learned_sigma": ({}, 8),
    "eps_only": (dict(out_channels=None), 8),      # out_channels = in_channels
    "patch_1": (dict(patch_size=1), 4),
    "other_size": ({}, 4),                         # a latent smaller than sample_size: PatchEmbed's own pos embed
}


@pytest.mark.parametrize("case", list(DECODER_CASES))
@pytest.mark.parametrize("n", [1, 3, 5])
def test_decoder_on_fresh_features_equals_the_forward(case, n):
    """At every split point: the features are the hidden state after block N, the decoder on them is the forward bit
    for bit (twice: the features stay untouched), at another timestep it differs, and several steps' decoders
    batched (uncapped, under a cap, one a call) equal one call per step (within float noise: CPU matmul kernels
    differ with the row count)."""
    overrides, size = DECODER_CASES[case]
    transformer = dd.transformer(seed=3, **overrides)
    adapter = fdd.DiTAdapter(transformer, n)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)
    labels = torch.tensor([3, 1000])
    call = lambda t: adapter.make_call(adapter.arguments((x, torch.tensor(t).expand(2), labels), {}))
    after_block = []
    hook = transformer.transformer_blocks[n - 1].register_forward_hook(lambda m, a, out: after_block.append(out))
    with torch.no_grad():
        ref = transformer(x, torch.tensor([700, 700]), labels).sample
        hook.remove()
        c = call(700)
        assert c.rows == ROWS and adapter.call_reason(adapter.arguments((x, torch.tensor(700), labels), {})) is None
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        assert torch.equal(feats.mid, after_block[0]) and feats.skips == []
        kept = feats.mid.clone()
        assert torch.equal(adapter.decode(c, feats, emb), ref)
        assert torch.equal(adapter.decode(c, feats, emb), ref), "a second decode on the same features"
        assert torch.equal(feats.mid, kept), "features untouched"
        c2 = call(300)
        other = adapter.decode(c2, feats, adapter.embed(c2))
        assert rel(other, ref) > 1e-3
        rows = [(c.timesteps, None), (c2.timesteps, None), (c.timesteps, None)]
        for cap, widths in ((0, [3]), (2 * ROWS + 1, [2, 1]), (ROWS, [1, 1, 1])):
            outs, got = decode_steps(adapter, c, feats, rows, max_decoder_batch=cap)
            assert got == widths and [o.shape for o in outs] == [ref.shape] * 3
            assert rel(outs[0], ref) < 1e-6 and rel(outs[1], other) < 1e-6 and rel(outs[2], ref) < 1e-6, cap


def test_gradient_checkpointing_is_mirrored():
    """Under autograd with gradient checkpointing on, the forward runs each block through the model's checkpoint
    function: the split does too, with the same output and the same gradients."""
    transformer = dd.transformer(seed=4)
    transformer.enable_gradient_checkpointing()
    checkpoint, calls = transformer._gradient_checkpointing_func, []
    transformer._gradient_checkpointing_func = lambda block, *a: (calls.append(block), checkpoint(block, *a))[1]
    adapter = fdd.DiTAdapter(transformer, 2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    args = (x, torch.tensor([400, 400]), torch.tensor([5, 1000]))
    c = adapter.make_call(adapter.arguments(args, {}))

    def split():
        emb = adapter.embed(c)
        return adapter.decode(c, adapter.encode(c, emb), emb)
    runs = []
    for forward in (lambda: transformer(*args).sample, split):
        calls.clear()
        out = forward()
        grad = torch.autograd.grad(out.square().sum(), transformer.pos_embed.proj.weight)[0]
        runs.append((out, grad, list(calls)))
    (ref, ref_grad, ref_calls), (out, grad, split_calls) = runs
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
    assert split_calls == ref_calls == list(transformer.transformer_blocks)


def test_key_steps_are_exact_and_non_key_steps_cached(patch):
    """Sequential: every step up to the first non-key step is bit-identical to the unpatched pipeline (key step 4,
    whose group holds step 5, included); step 5 is served from step 4's features."""
    base = sample()
    h = patch(pipeline(), "0,1,2,3,4,6", parallel=False)
    fd = sample()
    assert torch.equal(fd[:5], base[:5])
    assert rel(fd[5], base[5]) > 1e-4
    r = h.reports[-1]
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (2, 2, STEPS - 4)
    assert r["off_schedule_calls"] == r["fallback_calls"] == 0


# ---------------------------------------------------------------------------- parallel, counts, forecast

def test_parallel_matches_sequential(patch):
    """paper keys at 8 steps: 0, 1, 2, 3, 5 -> groups [3, 4] and [5, 6, 7] batch their decoders; uncapped, under a
    cap of 2 steps' rows plus one, and under one step's rows: all equal to one decoder call per step."""
    pipe = pipeline()
    seq_h = patch(pipe, "paper", parallel=False)
    seq = sample()
    par_h = patch(pipe, "paper", parallel=True)
    par = sample()
    cap_h = patch(pipe, "paper", parallel=True, max_decoder_batch=2 * ROWS + 1)
    capped = sample()
    one_h = patch(pipe, "paper", parallel=True, max_decoder_batch=ROWS - 1)
    one = sample()
    assert rel(par, seq) < 1e-5 and rel(capped, seq) < 1e-5 and rel(one, seq) < 1e-5
    assert [h.reports[-1]["decoder_batches"] for h in (seq_h, par_h, cap_h, one_h)] == [[1, 1], [2, 3], [2, 2, 1],
                                                                                        [1] * 5]
    for h in (seq_h, par_h, cap_h, one_h):
        r = h.reports[-1]
        assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (2, 3, 3)
        assert r["off_schedule_calls"] == r["fallback_calls"] == 0 and "parallel_off" not in r


@pytest.mark.parametrize("encoder_blocks, n", [(0, 4), (2, 2), (5, 5)])
@pytest.mark.parametrize("parallel", [False, True])
def test_encoder_passes_are_counted_per_block(patch, encoder_blocks, n, parallel):
    """uniform:2 at 8 steps: keys 0, 2, 4, 6, each with one served step.  The patch embedding and the encoder's
    blocks run at the key steps only; the decoder's blocks and the output layer at every step (sequential: one call
    a step; parallel: one call a group, on both steps' rows).  ``encoder_blocks`` 0 is the default split, 4 of 6."""
    pipe = pipeline()
    h = patch(pipe, "uniform:2", parallel=parallel, encoder_blocks=encoder_blocks)
    assert h.adapter.blocks == n
    with block_calls(pipe.transformer) as counts:
        sample()
    r = h.reports[-1]
    assert (r["encoder_calls"], r["cached_calls"], r["full_calls"]) == (4, 4, 0)
    assert r["keys"] == [0, 2, 4, 6] and r["decoder_batches"] == ([2] * 4 if parallel else [1] * 4)
    assert "encoder ran 4x and was skipped 4x" in format_report(r)
    encoder, decoder = (4, 4 * ROWS), ((4, 8 * ROWS) if parallel else (8, 8 * ROWS))
    assert counts == {"pos_embed": encoder, "proj_out_2": decoder, **{i: encoder for i in range(n)},
                      **{i: decoder for i in range(n, DEPTH)}}


def test_forecast_parallel_equals_sequential(patch):
    pipe = pipeline()
    outs = []
    for parallel, cap in ((False, 32), (True, 0), (True, 2 * ROWS + 1)):
        h = patch(pipe, "uniform:3", parallel=parallel, max_decoder_batch=cap, propagation="forecast")
        outs.append(sample())
        assert h.reports[-1]["propagation"] == "forecast (order 1)" and "forecast_off" not in h.reports[-1]
    assert rel(outs[1], outs[0]) < 1e-5 and rel(outs[2], outs[0]) < 1e-5
    patch(pipe, "uniform:3", propagation="reuse")
    assert rel(sample(), outs[1]) > 1e-4, "forecast is not reuse"


def test_batch_size_never_changes_a_sample(patch):
    """Three class labels in one call (6 rows a step with CFG, stacked over the group's steps in the decoder batch)
    give each label what it gets alone, with and without a cap that splits a group."""
    pipe = pipeline()
    labels, seeds = (3, 7, 11), (0, 1, 2)
    for cap in (32, 5):
        patch(pipe, "paper", max_decoder_batch=cap)
        batch = sample(labels=labels, seeds=seeds)
        for i in range(3):
            alone = sample(labels=labels[i:i + 1], seeds=seeds[i:i + 1])
            assert rel(batch[:, i:i + 1], alone) < 1e-5, (cap, i)


# ------------------------------------------------------------------------------ encoder_blocks, refusals

def test_encoder_blocks_default_is_the_papers_fraction():
    """The paper's 18 of DiT-XL/2's 28 blocks; other depths the same fraction; an explicit value as given."""
    assert fdd.DiTAdapter(dd.transformer(num_layers=28, attention_head_dim=4, sample_size=4)).blocks == 18
    assert fdd.DiTAdapter(dd.transformer(num_layers=14, attention_head_dim=4, sample_size=4)).blocks == 9
    assert fdd.DiTAdapter(dd.transformer()).blocks == 4
    assert fdd.DiTAdapter(dd.transformer(), 1).blocks == 1


def test_a_bad_encoder_blocks_is_a_clear_error():
    """A split that leaves no decoder block (or a negative one) raises ValueError naming encoder_blocks and the
    fix, before anything is patched; a model of one block cannot be split."""
    pipe = pipeline()
    before = state_of(pipe)
    with pytest.raises(ValueError, match=r"encoder_blocks 6 does not split DiTTransformer2DModel \(6 blocks\): set it "
                                         r"to 1\.\.5, or 0 for the model's default \(4\)"):
        fdd.apply(pipe, encoder_blocks=DEPTH)
    with pytest.raises(ValueError, match="encoder_blocks must be >= 0"):
        fdd.apply(pipe, encoder_blocks=-1)
    assert state_of(pipe) == before and not hasattr(pipe.transformer, "_diffusers_hook")
    with pytest.raises(ValueError, match="has 1 transformer block"):
        fdd.DiTAdapter(dd.transformer(num_layers=1))


def _tiny_other_transformers():
    """Diffusers' other transformer classes (PixArt, SD3, Flux), tiny: the split does not mirror them."""
    return [diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                               cross_attention_dim=16, sample_size=8, caption_channels=16),
            diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=16, out_channels=4),
            diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))]


def test_other_transformers_and_pipelines_are_refused():
    """A subclass of DiTTransformer2DModel, PixArt's, SD3's and Flux's transformers are refused with the TypeError
    unknown UNet classes get (naming the pipeline's attribute and the classes served); so is a transformer pipeline
    other than DiTPipeline."""
    pipe = pipeline()

    class MyDiT(diffusers.DiTTransformer2DModel):
        pass
    with pytest.raises(TypeError, match="MyDiT is not diffusers' DiTTransformer2DModel"):
        fdd.DiTAdapter(MyDiT(**dd.DIT))
    for model in [MyDiT(**dd.DIT)] + _tiny_other_transformers():
        other = diffusers.DiTPipeline(transformer=model, vae=pipe.vae, scheduler=pipe.scheduler)
        with pytest.raises(TypeError, match=f"cannot serve DiTPipeline.transformer: {type(model).__name__} is not one "
                                            "of the UNet classes or transformers .*DiTTransformer2DModel"):
            fdd.apply(other)
        assert type(other) is diffusers.DiTPipeline
    pixart = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=dt.vae(),
                                           transformer=_tiny_other_transformers()[0], scheduler=dd.scheduler())
    with pytest.raises(TypeError, match="PixArtAlphaPipeline is not a supported pipeline"):
        fdd.apply(pixart)


def test_a_forward_the_split_does_not_know_is_named():
    """The split mirrors diffusers 0.42.1's forward: a forward that uses anything else is named, and refused."""
    assert dit.forward_difference(diffusers.DiTTransformer2DModel.forward) is None

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True):
        hidden_states = self.pos_embed(hidden_states)
        hidden_states = self.norm_in(hidden_states)
        return rescale(hidden_states)
    assert dit.forward_difference(forward) == ("its forward uses self norm_in; calls rescale, which the split "
                                               "(diffusers 0.42.1's) does not mirror")


def rescale(hidden_states):
    return hidden_states


def test_calls_the_split_cannot_serve_are_named(patch, caplog):
    adapter = fdd.DiTAdapter(dd.transformer())
    a = lambda **kw: {**adapter.arguments((torch.zeros(2, 4, 8, 8), torch.tensor([1, 1]), torch.tensor([3, 1000])),
                                          {}), **kw}
    assert adapter.call_reason(a()) is None
    assert "['foo']" in adapter.call_reason(a(cross_attention_kwargs={"foo": 1}))
    assert "class_labels" in adapter.call_reason(a(class_labels=None))
    assert "one label per row" in adapter.call_reason(a(class_labels=torch.tensor([3])))
    # the pipeline's transformer replaced after apply(): that call runs unpatched
    pipe = dd.dit(seed=5)
    h = patch(pipe, "paper")
    own = pipe.transformer
    pipe.transformer = dd.transformer(seed=6)
    try:
        base = dd.run(pipe, steps=STEPS)
    finally:
        pipe.transformer = own
    assert h.reports == [] and base.shape == (STEPS, 1, 4, 8, 8)
    assert "pipe.transformer was replaced after apply(); this call runs unpatched" in caplog.text
