"""The patch points of ``UNetModel``'s forward the ldm split (fasterdiffusion/ldm.py) serves, each with a patch built
here: ComfyUI 0.33's ``middle_block_after_patch`` (it reads the step's latent) and an ``output_block_patch`` returning
``hsp=None``, ``forward_timestep_embed_patch`` (every layer on 0.33, non-timestep layers on 0.3.75), and Forge's
``block_modifiers``.  A test of a patch point this host's forward does not have is skipped, with the reason; CI runs
the suite on both ComfyUI versions."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import testmodel as tm
from conftest import apply

STEPS = 12


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def host(pack):
    from comfy.ldm.modules.diffusionmodules import openaimodel
    return SimpleNamespace(pack=pack, oai=openaimodel, forward=pack.split.host_forward(openaimodel.UNetModel))


def need(host, feature):
    if not getattr(host.forward, feature):
        pytest.skip(f"this ComfyUI's UNetModel forward has no {feature} (ComfyUI 0.33 has)")


class AfterPatch:
    """A SUPIR-like ``middle_block_after_patch``: adds a term of the step's own latent to the middle features and
    records what it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, kw):
        x, h = kw["x"], kw["h"]
        self.seen.append((x.clone(), kw["timesteps"].clone()))
        assert kw["transformer_options"]["block"] == ("middle", 0) and kw["emb"].shape[0] == h.shape[0]
        return {"h": h + 0.5 * x.flatten(1)[:, :1].view(-1, 1, 1, 1) * torch.tanh(h)}


def skip_none(h, hsp, to):
    """An ``output_block_patch`` that fuses the skip itself and returns hsp=None (SUPIR's ZeroSFT does)."""
    return torch.cat([h, 0.7 * hsp], dim=1), None


def embed_patch(oai, layer_type, scale):
    """A ``forward_timestep_embed_patch`` on ``layer_type`` of the host's openaimodel ``oai``: the layer, scaled."""
    def handler(layer, x, emb, context, to, output_shape, *rest):
        if isinstance(layer, oai.TimestepBlock):
            return layer(x, emb) * scale
        return layer(x) * scale
    return (layer_type, handler)


PATCHES = {
    "middle_block_after_patch": lambda oai: {"middle_block_after_patch": [AfterPatch()]},
    "output_block_patch hsp=None": lambda oai: {"output_block_patch": [skip_none]},
    "forward_timestep_embed_patch Downsample": lambda oai: {"forward_timestep_embed_patch": [embed_patch(oai, oai.Downsample, 1.05)]},
    "forward_timestep_embed_patch ResBlock": lambda oai: {"forward_timestep_embed_patch": [embed_patch(oai, oai.ResBlock, 0.97)]},
}
NEEDS = {"middle_block_after_patch": "middle_after_patch", "output_block_patch hsp=None": "optional_skip"}


@pytest.mark.parametrize("kind", list(PATCHES))
def test_split_on_fresh_features_equals_the_host_forward_with_the_patch(host, digits, kind):
    if kind in NEEDS:
        need(host, NEEDS[kind])
    ldm = host.pack.ldm
    unet = digits[0].model.diffusion_model
    adapter = ldm.LdmUNetAdapter(unet)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([600.0, 600.0])
    ctx = torch.randn(2, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM, generator=g)
    patches = PATCHES[kind](host.oai)
    with torch.no_grad():
        plain = unet(x, t, ctx, None, None, {})
        ref = unet(x, t, ctx, None, None, {"patches": patches})
        honoured = not kind.endswith("ResBlock") or host.forward.middle_after_patch   # 0.33: on every layer
        assert (rel(ref, plain) > 1e-4) == honoured, "the patch acts where this host's forward honours it"
        c = ldm.make_call(x, t, ctx, None, None, {"patches": patches, "sigmas": t}, {})
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        assert torch.equal(adapter.decode(c, feats, emb), ref)
        again = adapter.decode(c, feats, emb)
        assert torch.equal(again, ref), "the cached features stay clean"


def test_middle_block_after_patch_runs_at_every_step_on_its_own_latent(host, digits):
    """Key steps are exact; every non-key step's decoder applies the patch to a copy of the cached middle features
    with its own step's latent (so its decoders run one step at a time, and the stats say why)."""
    need(host, "middle_after_patch")
    import comfy.patcher_extension
    model, tok = digits
    patch = AfterPatch()
    m = model.clone()
    m.set_model_patch(patch, "middle_block_after_patch")
    base = tm.sample_digits(m, tok, [3, 8], steps=STEPS)
    patch.seen.clear()
    allk, _ = apply(host.pack, m, "all")
    assert torch.equal(tm.sample_digits(allk, tok, [3, 8], steps=STEPS), base)
    patch.seen.clear()

    inputs = []

    def spy(executor, x, *args, **kwargs):     # outside FasterDiffusion's wrapper: the latent of each call
        inputs.append(x.clone())
        return executor(x, *args, **kwargs)

    spied = m.clone()      # the spy's wrapper comes first: it sees the latent FasterDiffusion's wrapper gets
    spied.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "spy", spy)
    fast, config = apply(host.pack, spied, "uniform:3")
    out = tm.sample_digits(fast, tok, [3, 8], steps=STEPS)
    r = config.reports[-1]
    assert r["cached_calls"] == 8 and set(r["decoder_batches"]) == {1}
    assert "middle_block_after_patch" in r["parallel_off"]
    assert len(patch.seen) == len(inputs) == STEPS
    assert all(torch.equal(x, seen) for x, (seen, _) in zip(inputs, patch.seen)), "each step's own latent"
    assert rel(tm.decode(out), tm.decode(base)) < 0.2


def test_one_pass_refuses_a_middle_block_after_patch_and_says_why(host, digits):
    need(host, "middle_after_patch")
    from importlib import import_module
    package = host.pack.cu.__name__.rsplit(".", 3)[0]
    glue = import_module(package + ".patches.comfy.onepass")
    engine = import_module(package + ".fasterdiffusion.onepass")
    model, tok = digits
    m = model.clone()
    m.set_model_patch(AfterPatch(), "middle_block_after_patch")
    pos, _ = tm.digit_conditioning(tok, [3])
    with pytest.raises(engine.OnePassError, match="middle_block_after_patch"):
        glue.sample(m, pos, {"samples": torch.zeros(1, 4, tm.LATENT_SIZE, tm.LATENT_SIZE)}, seed=0, k=4)


def test_forge_block_modifiers_run_around_every_block_in_forge_order(host, digits):
    """Forge's forward (``block_modifiers``, head cast last) read from a Forge-style source, and the split calling
    the modifiers around every block, the middle block's "after" in the decoder, and ("last", 0) around the head."""
    split = host.pack.split
    forge_style = '''
def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
    mods = transformer_options.get("block_modifiers", [])
    frames = kwargs.get("num_video_frames", self.default_num_video_frames)
    hint = kwargs.get("image_only_indicator", self.default_image_only_indicator)
    h = forward_timestep_embed(self.input_blocks[0], x, None, context, transformer_options, num_video_frames=frames)
    h = forward_timestep_embed(self.middle_block, h, None, context, transformer_options, image_only_indicator=hint)
    h = forward_timestep_embed(self.output_blocks[0], h, None, context, transformer_options)
    for m in mods:
        h = m(h, "after", transformer_options)
    return self.out(h).type(x.dtype)
'''
    forward = split.read_forward(forge_style)
    assert forward.difference is None
    assert forward.block_modifiers and forward.cast_last and forward.default_indicator and not forward.emb_patch
    unet = digits[0].model.diffusion_model
    adapter = host.pack.ldm.LdmUNetAdapter(unet)
    adapter.host = replace(forward, emb_patch=True)
    seen = []

    def modifier(h, where, to):
        seen.append((to["block"], where))
        return h

    x = torch.randn(1, 4, 8, 8)
    c = host.pack.ldm.make_call(x, torch.tensor([500.0]), torch.randn(1, tm.CONTEXT_TOKENS, tm.CONTEXT_DIM), None,
                                None, {"block_modifiers": [modifier]}, {})
    with torch.no_grad():
        emb = adapter.embed(c)
        feats = adapter.encode(c, emb)
        encoder = list(seen)
        out = adapter.decode(c, feats, emb)
    blocks = [("input", i) for i in range(len(unet.input_blocks))]
    assert encoder == [(b, w) for b in blocks for w in ("before", "after")] + [(("middle", 0), "before")]
    outputs = [("output", i) for i in range(len(unet.output_blocks))]
    assert seen[len(encoder):] == ([(("middle", 0), "after")] + [(b, w) for b in outputs for w in ("before", "after")]
                                   + [(("last", 0), "before"), (("last", 0), "after")])
    assert out.dtype == x.dtype
