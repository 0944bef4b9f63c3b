"""AUTOMATIC1111 / Forge: the extension layout, the ldm/sgm-style adapter on the real ldm ``UNetModel`` (PyPI
``stable-diffusion-sdkit``, the package A1111 uses for SD1/SD2), the hooks, and the Script glue driven through
project-written fakes of the hosts' call patterns (tests/webui_fakes.py, hosts.md D1).

k-diffusion: the sampler functions are ComfyUI's vendored copy (comfy/k_diffusion/sampling.py) — PyPI
``k-diffusion==0.1.1.post1`` does not install under the test host's torch/numpy constraints (its dependencies
pull numpy 1.26 or a scipy source build).  Forge: the UNet stand-in is ComfyUI's ``UNetModel`` (the class
ldm_patched was copied from), registered with the Forge adapter for the test.
"""
from __future__ import annotations

import ast
import logging
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import webui_fakes as wf
from fasterdiffusion import ldm
from fasterdiffusion.runtime import ModelCall, Run
from fasterdiffusion.settings import Settings
from fasterdiffusion.strategy import parse_strategy
from test_runtime_contract import check_log, schedule, simulate

ldm_oai = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel",
                              reason="stable-diffusion-sdkit is not installed: run tools/setup_test_host.sh")
REPO = wf.REPO


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def webui(comfy):
    """The script as A1111 imports it, on fake ``modules.*`` and a recording gradio."""
    gradio = wf.FakeGradio()
    callbacks = wf.install_modules(gradio)
    mod = wf.load_script()
    hosts = mod._hosts
    yield SimpleNamespace(mod=mod, script=mod.FasterDiffusionScript(), glue=hosts.webui.glue, ldm=hosts.webui.compvis,
                          forge=hosts.webui.forge, ui=hosts.webui.ui, callbacks=callbacks, gr=gradio)
    hosts.webui.glue.cleanup_all()
    wf.remove_modules()


def toy_unet(seed=0, num_classes=None, context_dim=32):
    """A toy SD1-layout ldm UNetModel (12 input, 1 middle, 12 output blocks); the zero-initialised
    output layers get random weights so that every block matters."""
    torch.manual_seed(seed)
    unet = ldm_oai.UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                             attention_resolutions=[1, 2, 4], channel_mult=(1, 2, 4, 4), num_head_channels=16,
                             use_spatial_transformer=True, transformer_depth=1, context_dim=context_dim,
                             legacy=False, use_linear_in_transformer=True, num_classes=num_classes).eval()
    with torch.no_grad():
        for w in unet.parameters():
            if w.dim() > 1 and not w.any():
                w.normal_(0, (1 / w[0].numel()) ** 0.5)
    return unet


@pytest.fixture(scope="module")
def unet():
    torch.set_num_threads(1)
    return toy_unet()


@pytest.fixture(scope="module")
def ks(comfy):
    import comfy.k_diffusion.sampling as sampling
    return sampling


def conds(batch=1, seed=1, ctx=(7, 7)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, ctx[0], 32, generator=g),
            torch.randn(batch, ctx[1], 32, generator=g))


def generate(w, sd, args, func, steps=6, batch=1, mode="batched", ctx=(7, 7), sampler_cls=None, seed=1):
    noise, cond, uncond = conds(batch, seed, ctx)
    p = wf.P(sd, steps=steps)
    sampler = (sampler_cls or wf.KSampler)(func, sd, mode)
    outs, processed = wf.generate(w.script, p, args, [wf.Pass(sampler, noise, cond, uncond, steps)])
    return outs[0], p, processed


def reports(p):
    gen = p._fasterdiffusion
    return gen.reports if gen is not None else []


# ------------------------------------------------------------------------------------------------ 1. layout

def test_script_imports_without_comfyui_and_never_imports_it():
    code = f"""
import sys
sys.path[:] = [p for p in sys.path if 'ComfyUI' not in p] + [{str(REPO / 'tests')!r}]
import webui_fakes as wf
wf.install_modules()
mod = wf.load_script()
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_extras', 'nodes', 'folder_paths', 'server')
             or 'comfy_' in m or m.endswith('.nodes'))
assert not bad, bad
assert mod.FasterDiffusionScript().title() == 'FasterDiffusion'
print('ok', sorted(m for m in sys.modules if m.startswith('fasterdiffusion_webui_hosts')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fasterdiffusion_webui_hosts.webui.compvis" in out.stdout


def test_comfyui_loader_never_imports_the_webui_modules(pack):
    prefix = pack.cu.__name__.rsplit(".", 3)[0]
    loaded = [m for m in sys.modules if m.startswith(prefix + ".")]
    assert loaded and not [m for m in loaded if "webui" in m or ".scripts" in m or ".javascript" in m]
    # and statically: nothing the ComfyUI side imports names a webui module
    for path in [REPO / "__init__.py", *(REPO / "nodes").glob("*.py"), *(REPO / "patches" / "comfy").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("webui" in n for n in names), (path, names)


def test_extension_folder_layout():
    assert (REPO / "scripts" / "fasterdiffusion_webui.py").is_file()
    assert list((REPO / "javascript").glob("*.mjs")) and (REPO / "style.css").is_file()
    out = subprocess.run([sys.executable, str(REPO / "install.py")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "no extra dependencies" in out.stdout
    webui_sources = list((REPO / "patches" / "webui").glob("*.py"))
    assert webui_sources
    for path in webui_sources:   # no host import at module level: each module imports on the other host
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert (mod or "").split(".")[0] not in ("modules", "gradio", "comfy", "ldm", "sgm", "ldm_patched",
                                                         "backend", "k_diffusion"), (path.name, mod)


# ------------------------------------------------------------------------------------------------ 2. adapter

def test_decoder_on_fresh_features_equals_the_forward(webui, unet):
    """encode + decode (no hooks) is the UNet's forward, bit for bit; also with class labels (the y path)."""
    ldm = webui.ldm
    for model, y in ((unet, None), (toy_unet(3, num_classes=10), torch.tensor([3, 7]))):
        adapter = ldm.CompVisSplit(model)
        x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([801.5, 801.5]), torch.randn(2, 7, 32)
        kwargs = {"context": ctx} if y is None else {"context": ctx, "y": y}
        call = ldm.make_call(model, (x, t), kwargs)
        with torch.no_grad():
            emb = adapter.embed(call)
            out = adapter.decode(call, adapter.encode(call, emb), emb)
            assert torch.equal(out, model(x, t, **kwargs))
            # batched decoders: two steps' rows in one call equal the two calls
            t2 = torch.tensor([400.0, 400.0])
            feats = adapter.encode(call, emb)
            big = adapter.tile(call, 2, torch.cat([t, t2]), None)
            two = adapter.decode(big, feats.tile(2), adapter.embed(big))
            c2 = ldm.make_call(model, (x, t2), kwargs)
            torch.testing.assert_close(two[2:], adapter.decode(c2, feats, adapter.embed(c2)), rtol=1e-4, atol=1e-5)


class HookedRun:
    """The contract suite's run, with every model call going through the hooked UNet (its pre-hook calls the
    real ``Run.forward``)."""

    def __init__(self, run, unet, contexts):
        self.run, self.unet, self.contexts, self.step = run, unet, contexts, None

    def __getattr__(self, name):
        return getattr(self.run, name)

    def forward(self, adapter, call, step, full):
        self.step = step
        return self.unet(call.x, call.timesteps, context=self.contexts[call.slot][:call.rows])


@pytest.mark.parametrize("shared", [False, True], ids=["own-forward", "controlnet-forward"])
def test_hooked_unet_keeps_the_runtime_contract(webui, unet, shared):
    """simulate/check_log of the runtime contract suite through the hooks on the real ldm UNet: own mode (the
    adapter computes, parallel decoders, the memory cap) and shared mode (a ControlNet-style replaced forward
    drives; non-key steps decode in its loop with this step's residuals)."""
    ldm = webui.ldm
    g = torch.Generator().manual_seed(5)
    contexts = {("cond",): torch.randn(2, 7, 32, generator=g), ("uncond",): torch.randn(2, 7, 32, generator=g)}
    sigmas, timesteps = schedule(5, 2)
    adapter = ldm.CompVisSplit(unet)
    residual = (lambda t, h: 0.01 * torch.cos(t.view(-1, 1, 1, 1) / 100.0) * torch.ones_like(h)) if shared else None

    def cn_forward(self, x, timesteps=None, context=None, **kw):     # the ControlNet extension's shape of forward
        emb = self.time_embed(ldm_oai.timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        hs, h = [], x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        h = h + residual(timesteps, h)
        for module in self.output_blocks:
            skip = hs.pop()
            h = torch.cat([h, skip + residual(timesteps, skip)], dim=1)
            h = module(h, emb, context)
        return self.out(h.type(x.dtype))

    def ctx(call):
        return contexts[call.slot][:call.rows]

    def full(call):
        return (cn_forward(unet, call.x, call.timesteps, ctx(call)) if shared else unet(call.x, call.timesteps, context=ctx(call)))

    def reference(key_call, call):
        k = ldm.make_call(unet, (key_call.x, key_call.timesteps), {"context": ctx(key_call)})
        c = ldm.make_call(unet, (call.x, call.timesteps), {"context": ctx(call)})
        feats = adapter.encode(k, adapter.embed(k))
        if not shared:
            return adapter.decode(c, feats, adapter.embed(c))
        emb = adapter.embed(c)      # the CN loop's decoder on cached features, with this call's residuals
        h = feats.mid + residual(call.timesteps, feats.mid)
        hs = list(feats.skips)
        for module in unet.output_blocks:
            skip = hs.pop()
            h = module(torch.cat([h, skip + residual(call.timesteps, skip)], dim=1), emb, ctx(call))
        return unet.out(h)

    if shared:
        unet.forward = types.MethodType(cn_forward, unet)
    try:
        with torch.no_grad():
            for parallel, cap in ((True, 0),) if shared else ((True, 0), (True, 2), (False, 0)):
                run = Run(Settings(parse_strategy("0,3"), parallel, cap, propagation="reuse"), sigmas, timesteps)
                hooked = HookedRun(run, unet, contexts)
                hook = ldm.UNetHook(unet, lambda: run, lambda: hooked.step).install()
                hook.shared = shared
                try:
                    log = simulate(hooked, hook.adapter, full, sigmas, timesteps,
                                   lambda: torch.randn(2, 4, 8, 8, generator=g), [("cond",), ("uncond",)],
                                   passes=0, corrector=True, midpoints=False)
                finally:
                    hook.remove()
                check_log(run, log, reference, full)
                stats = run.finish()
                assert stats["cached_calls"] > 0
                if shared or not parallel:
                    assert set(stats["decoder_batches"]) == {1}
                if shared and parallel:
                    assert "ControlNet" in stats["parallel_off"]
    finally:
        unet.__dict__.pop("forward", None)
    assert not unet._forward_hooks and not unet._forward_pre_hooks
    assert all("forward" not in m.__dict__ for m in [*unet.input_blocks, unet.middle_block, *unet.output_blocks, unet.out])


@pytest.mark.parametrize("parallel", [True, False], ids=["served", "decoded"])
def test_non_key_output_does_not_depend_on_the_latent(webui, unet, parallel):
    ldm = webui.ldm
    sigmas, timesteps = schedule(4, 1)
    run = Run(Settings(parse_strategy("0,3"), parallel, propagation="reuse"), sigmas, timesteps)
    state = SimpleNamespace(step=0)
    hook = ldm.UNetHook(unet, lambda: run, lambda: state.step).install()
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(1, 7, 32, generator=g)
    try:
        with torch.no_grad():
            for step in (0, 1, 2):
                state.step = step
                outs = []
                for x in (torch.randn(1, 4, 8, 8, generator=g), 3 * torch.randn(1, 4, 8, 8, generator=g)):
                    run.begin_evaluation()
                    outs.append(unet(x, torch.tensor([timesteps[step]]), context=ctx))
                if step == 0:
                    assert not torch.equal(outs[0], outs[1])      # a key step reads its latent
                else:
                    assert torch.equal(outs[0], outs[1]), step    # a propagated step never does
    finally:
        hook.remove()
    stats = run.finish()
    assert stats["cached_calls"] == 4 and stats["decoder_batches"] == ([3, 3] if parallel else [1, 1])


def test_sdxl_call_style_with_a_label_vector(webui, ks):
    """SDXL's call (x, timesteps=t, context=c, y=vector) through the same hooks; the ADM path (emb + label_emb(y))
    runs on a class-conditional ldm UNet (the sgm class itself is not on any registry)."""
    unet = toy_unet(3, num_classes=10)
    sd = wf.SdModel(unet, sdxl=True)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"crossattn": torch.randn(2, 7, 32, generator=g), "vector": torch.tensor([3, 5])}
    uncond = {"crossattn": torch.randn(2, 7, 32, generator=g), "vector": torch.tensor([0, 0])}

    def run(args):
        p = wf.P(sd, steps=6)
        outs, _ = wf.generate(webui.script, p, args, [wf.Pass(wf.KSampler(ks.sample_euler, sd), noise, cond, uncond, 6)])
        return outs[0], p

    base, _ = run([False])
    assert torch.equal(base, run([True, "all"])[0])
    par, p = run([True, "0,3"])
    torch.testing.assert_close(par, run([True, "0,3", False])[0], rtol=1e-4, atol=1e-4)
    assert reports(p)[0]["cached_calls"] == 4 and reports(p)[0]["decoder_batches"] == [3, 3]


def test_the_input_cast_is_read_from_the_host_source(webui, tmp_path):
    """ldm (SD2 release) starts with ``h = x.type(self.dtype)``; sgm has that line commented out."""
    import importlib.util
    for name, line, expected in (("fd_fake_ldm", "h = x.type(self.dtype)", True), ("fd_fake_sgm", "# h = x.type(self.dtype)", False)):
        path = tmp_path / f"{name}.py"
        path.write_text(f"class UNetModel:\n    def forward(self, x):\n        {line}\n        h = x\n        return h\n\n"
                        f"class Other:\n    def forward(self, x):\n        h = x.type(self.dtype)\n")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        try:
            assert webui.ldm.casts_input(mod.UNetModel) is expected
        finally:
            del sys.modules[name]


# ------------------------------------------------------------------------------------------------ 3. exactness through the glue

def test_all_bypass_and_off_are_bit_identical(webui, unet, ks):
    sd = wf.SdModel(unet)
    base, _, _ = generate(webui, sd, [False], ks.sample_euler)
    for args, func in (([True, "all"], ks.sample_euler), ([True, "paper"], wf.sample_lcm)):
        ref, _, _ = generate(webui, sd, [False], func)
        out, p, processed = generate(webui, sd, args, func)
        assert torch.equal(out, ref), args
        assert "FasterDiffusion" in processed.comments
    _, p, processed = generate(webui, sd, [True, "paper"], wf.sample_lcm)
    assert reports(p)[0]["bypassed"] and "lcm" in processed.comments


def test_parallel_equals_sequential_and_batches_are_independent(webui, unet, ks):
    sd = wf.SdModel(unet)
    par, p, _ = generate(webui, sd, [True, "0,1,4"], ks.sample_dpmpp_2m, steps=8, batch=2)
    seq, _, _ = generate(webui, sd, [True, "0,1,4", False], ks.sample_dpmpp_2m, steps=8, batch=2)
    torch.testing.assert_close(par, seq, rtol=1e-4, atol=1e-4)
    r = reports(p)[0]
    assert r["encoder_calls"] == 2 and r["cached_calls"] == 5 and r["decoder_batches"] == [3, 4]
    capped, p, _ = generate(webui, sd, [True, "0,1,4", True, 4], ks.sample_dpmpp_2m, steps=8, batch=2)
    torch.testing.assert_close(par, capped, rtol=1e-4, atol=1e-4)
    assert max(reports(p)[0]["decoder_batches"]) == 1      # 4 rows per call / 4 rows (2 prompts x CFG) per step
    # batch invariance: each sample of the batch of 2 equals that sample generated alone
    noise, cond, uncond = conds(2, 1)
    for i in range(2):
        p1 = wf.P(sd, steps=8)
        outs, _ = wf.generate(webui.script, p1, [True, "0,1,4"],
                              [wf.Pass(wf.KSampler(ks.sample_dpmpp_2m, sd), noise[i:i + 1], cond[i:i + 1], uncond[i:i + 1], 8)])
        torch.testing.assert_close(outs[0], par[i:i + 1], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ 4. the call patterns of hosts.md D1

def test_split_and_chunked_cond_uncond_calls(webui, unet, ks):
    sd = wf.SdModel(unet)
    for mode, ctx, calls_per_step in (("batched", (7, 7), 1), ("batched", (7, 14), 2), ("chunks", (7, 7), 2)):
        sd.unet_calls.clear()
        out, p, _ = generate(webui, sd, [True, "0,3"], ks.sample_euler, mode=mode, ctx=ctx)
        seq, _, _ = generate(webui, sd, [True, "0,3", False], ks.sample_euler, mode=mode, ctx=ctx)
        torch.testing.assert_close(out, seq, rtol=1e-4, atol=1e-4)
        r = reports(p)[0]
        assert len(sd.unet_calls) == 6 * calls_per_step * 2
        assert r["encoder_calls"] == 2 * calls_per_step and r["cached_calls"] == 4 * calls_per_step, (mode, ctx, r)


def test_heun_double_evaluation_dpm2_midpoints_and_dpm_fast(webui, unet, ks, caplog):
    sd = wf.SdModel(unet)
    _, p, _ = generate(webui, sd, [True, "0,3"], ks.sample_heun, steps=4)
    r = reports(p)[0]
    assert r["steps"] == 4 and r["off_schedule_calls"] == 0 and r["cached_calls"] >= 3     # correctors land on steps
    _, p, _ = generate(webui, sd, [True, "0,3"], ks.sample_dpm_2, steps=4)
    assert reports(p)[0]["off_schedule_calls"] == 3                                        # midpoints run in full
    ref, _, _ = generate(webui, sd, [False], ks.sample_dpm_fast, steps=4)
    out, p, processed = generate(webui, sd, [True, "paper"], ks.sample_dpm_fast, steps=4)
    assert torch.equal(out, ref) and "takes no schedule" in processed.comments and not reports(p)


def test_ddim_timestep_lists(webui, unet):
    sd = wf.SdModel(unet)
    sd.unet_calls.clear()
    base, _, _ = generate(webui, sd, [False], wf.ddim, steps=5, sampler_cls=wf.TSampler)
    ts = [t for _, t in sd.unet_calls]
    assert ts == [801.0, 601.0, 401.0, 201.0]            # range(0, 1000, 200) + 1, evaluated from the top, len - 1 of them
    allk, _, _ = generate(webui, sd, [True, "all"], wf.ddim, steps=5, sampler_cls=wf.TSampler)
    assert torch.equal(base, allk)
    _, p, _ = generate(webui, sd, [True, "0,2"], wf.ddim, steps=5, sampler_cls=wf.TSampler)
    r = reports(p)[0]
    assert r["steps"] == 4 and r["encoder_calls"] == 2 and r["cached_calls"] == 2 and r["off_schedule_calls"] == 0


def test_hires_pass_img2img_and_batch_count(webui, unet, ks):
    sd = wf.SdModel(unet)
    noise, cond, uncond = conds(1, 2)
    g = torch.Generator().manual_seed(9)
    hr_noise, hr_init = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    p = wf.P(sd, steps=6)
    passes = [wf.Pass(wf.KSampler(ks.sample_euler, sd), noise, cond, uncond, 6),
              wf.Pass(wf.KSampler(ks.sample_euler, sd), hr_noise, cond, uncond, 6, t_enc=3, init=hr_init)]
    outs, processed = wf.generate(webui.script, p, [True, "0,2"], passes)
    first, hires = reports(p)
    assert first["steps"] == 6 and hires["steps"] == 4                   # img2img/hires: t_enc + 1 evaluations
    assert first["keys"] == [0, 2] and hires["keys"] == [0, 2] and hires["encoder_calls"] == 2
    assert outs[1].shape == (1, 4, 16, 16) and processed.comments.count("FasterDiffusion [0,2]") == 2
    assert not unet._forward_pre_hooks                                   # postprocess removed the hooks
    # the same hires pass alone is the same (fresh run, nothing carried over from the first pass)
    p2 = wf.P(sd, steps=6)
    alone, _ = wf.generate(webui.script, p2, [True, "0,2"], passes[1:])
    torch.testing.assert_close(alone[0], outs[1], rtol=0, atol=0)


def test_an_exception_leaves_no_hook_behind(webui, unet, ks):
    sd = wf.SdModel(unet)
    noise, cond, uncond = conds()
    p = wf.P(sd, steps=6)
    sampler = wf.KSampler(ks.sample_euler, sd)
    orig_func = sampler.func
    _, processed = wf.generate(webui.script, p, [True, "0,3"], [wf.Pass(sampler, noise, cond, uncond, 6)], fail_at_pass=0)
    assert processed is None and unet._forward_pre_hooks                 # no postprocess: hooks still there
    assert sampler.func is not orig_func and sampler.func.__wrapped__ is orig_func
    base, _, _ = generate(webui, sd, [False], ks.sample_euler)          # the next generation cleans up first
    assert not unet._forward_pre_hooks and "forward" not in unet.input_blocks[0].__dict__
    assert sampler.func is orig_func
    ref = ks.sample_euler  # and its result is the plain UNet's
    again, _, _ = generate(webui, sd, [False], ref)
    assert torch.equal(base, again)


def test_wrapping_keeps_the_signature_and_is_idempotent(webui, unet, ks):
    import inspect
    sd = wf.SdModel(unet)
    sampler = wf.KSampler(ks.sample_dpmpp_2m, sd)
    gen = webui.glue.Generation(Settings.of("paper"))
    first = webui.glue.wrap_sampler(sampler, gen)
    second = webui.glue.wrap_sampler(sampler, gen)
    assert "sigmas" in inspect.signature(second).parameters and second.__wrapped__ is ks.sample_dpmpp_2m
    assert first._fd_orig is second._fd_orig is ks.sample_dpmpp_2m
    gen.cleanup()
    assert sampler.func is ks.sample_dpmpp_2m


def test_controlnet_style_forward_swap_falls_back_to_sequential(webui, unet, ks, capsys):
    sd = wf.SdModel(unet)
    original = type(unet).forward

    def cn_forward(self, x, timesteps=None, context=None, **kw):   # an extension's replaced forward
        return original(self, x, timesteps, context)

    unet.forward = types.MethodType(cn_forward, unet)
    try:
        out, p, processed = generate(webui, sd, [True, "0,3"], ks.sample_euler)
        seq, _, _ = generate(webui, sd, [True, "0,3", False], ks.sample_euler)
    finally:
        del unet.forward
    par, _, _ = generate(webui, sd, [True, "0,3"], ks.sample_euler)
    r = reports(p)[0]
    assert "replaced the UNet's forward" in processed.comments and r["decoder_batches"] == [1, 1]
    assert r["cached_calls"] == 4
    torch.testing.assert_close(out, seq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, par, rtol=1e-4, atol=1e-4)


def test_a_second_unet_pass_inside_one_call_turns_propagation_off(webui, unet, ks):
    """Reference-only ControlNet style: the replaced forward runs the UNet twice per call (a reference pass,
    then the real one).  Block outputs of two passes cannot be told apart, so the run goes full, with a line,
    and the image is the plain one."""
    sd = wf.SdModel(unet)
    original = type(unet).forward

    def reference_forward(self, x, timesteps=None, context=None, **kw):
        original(self, 0.5 * x, timesteps, context)           # the reference pass
        return original(self, x, timesteps, context)

    base, _, _ = generate(webui, sd, [False], ks.sample_euler)
    unet.forward = types.MethodType(reference_forward, unet)
    try:
        ref, _, _ = generate(webui, sd, [False], ks.sample_euler)
        out, p, processed = generate(webui, sd, [True, "0,3"], ks.sample_euler)
    finally:
        del unet.forward
    assert torch.equal(base, ref) and torch.equal(out, ref)
    assert "second UNet pass" in reports(p)[0]["bypassed"] and "second UNet pass" in processed.comments


def test_sd_unet_replacement_and_refiner_bypass(webui, unet, ks):
    sd = wf.SdModel(unet)
    sys.modules["modules.sd_unet"].current_unet = object()
    try:
        _, p, processed = generate(webui, sd, [True, "0,3"], ks.sample_euler)
    finally:
        sys.modules["modules.sd_unet"].current_unet = None
    assert "SD UNet replacement" in reports(p)[0]["bypassed"]


def test_prior_noise_injection(webui, unet, ks):
    sd = wf.SdModel(unet)
    plain, _, _ = generate(webui, sd, [True, "0,3"], ks.sample_euler, steps=6)
    inj, p, _ = generate(webui, sd, [True, "0,3", True, 32, 0.003], ks.sample_euler, steps=6)
    r = reports(p)[0]
    assert r["injected_steps"] and not torch.equal(plain, inj)
    _, p, _ = generate(webui, sd, [True, "0,3", True, 32, 0.003], ks.sample_heun, steps=4)
    assert "injected_steps" not in reports(p)[0]


# ------------------------------------------------------------------------------------------------ 5. settings, infotext, XYZ

def test_infotext_xyz_and_api_args(webui, unet, ks):
    glue = webui.glue
    sd = wf.SdModel(unet)
    _, p, _ = generate(webui, sd, [True, "UNIFORM:3", False, 8, 0.003], ks.sample_euler)
    info = dict(p.extra_generation_params)
    assert info.pop("FD stats") == "6 steps: encoder 2x, skipped 4x"       # written after sampling
    assert info == {"FasterDiffusion": "uniform:3", "FD parallel": False, "FD max batch": 8, "FD injection": 0.003,
                    "FD propagation": "forecast", "FD ControlNet reuse": True}
    restored = glue.settings_from_infotext({k: str(v) for k, v in info.items()})
    assert restored == dict(enabled=True, strategy="uniform:3", parallel=False, max_decoder_batch=8,
                            injection_alpha=0.003, propagation="forecast", controlnet_reuse=True)
    assert glue.settings_from_infotext({"Steps": "20"})["enabled"] is False
    # an infotext written before forecast existed was made with reuse: pasting it restores reuse
    assert glue.settings_from_infotext({"FasterDiffusion": "paper"})["propagation"] == "reuse"
    _, p, _ = generate(webui, sd, [True], ks.sample_euler)                 # API: a short args list
    assert p.extra_generation_params == {"FasterDiffusion": "paper", "FD propagation": "forecast",
                                         "FD ControlNet reuse": True, "FD stats": "6 steps: encoder 5x, skipped 1x"}
    _, p, _ = generate(webui, sd, [True, "uniform:2", True, 32, 0.0, "reuse"], ks.sample_euler)
    assert p.extra_generation_params["FD propagation"] == "reuse"
    # XYZ axes set p.fd_enabled / p.fd_strategy before process()
    p = wf.P(sd)
    p.fd_strategy = "0,2"
    assert glue.read_settings(p, [False]) == Settings.of("0,2")
    p.fd_enabled = "False"
    assert glue.read_settings(p, [True, "paper"]) is None
    p = wf.P(sd)
    p.fd_propagation = "reuse"                                              # the XYZ propagation axis
    assert glue.read_settings(p, [False]) == Settings.of("paper", propagation="reuse")
    with pytest.raises(ValueError, match="propagation"):
        glue.read_settings(wf.P(sd), [True, "paper", True, 32, 0.0, "extrapolate"])
    with pytest.raises(glue.StrategyError):
        glue.read_settings(wf.P(sd), [True, "1,2,3"])
    base, _, _ = generate(webui, sd, [False], ks.sample_euler)
    out, p, processed = generate(webui, sd, [True, "1,2,3"], ks.sample_euler)   # A1111 would swallow the error: say it
    assert torch.equal(out, base) and "FasterDiffusion" not in p.extra_generation_params
    assert "FasterDiffusion is off for this generation" in processed.comments and "step 0" in processed.comments


def test_ui_accordion_tab_xyz_and_json(webui, tmp_path):
    gr, ui = webui.gr, webui.ui
    gr.made.clear()
    components = webui.script.ui(False)
    kinds = [c.kind for c in components]
    assert kinds == ["InputAccordion", "Textbox", "Checkbox", "Slider", "Slider", "Dropdown", "Checkbox"]
    assert {k for k, *_ in [(c.kind,) for c in gr.made]} <= {"InputAccordion", "Textbox", "HTML", "Row", "Checkbox", "Slider",
                                                             "Dropdown"}
    html = next(c for c in gr.made if c.kind == "HTML").value
    assert 'data-steps-id="txt2img_steps"' in html and "fd_strategy" in html
    fields = dict((c, f) for c, f in webui.script.infotext_fields)
    assert fields[components[1]]({"FasterDiffusion": "0,1,5"}) == "0,1,5" and fields[components[0]]({}) is False
    assert fields[components[5]]({"FasterDiffusion": "paper", "FD propagation": "forecast"}) == "forecast"
    assert fields[components[6]]({"FasterDiffusion": "paper", "FD ControlNet reuse": "False"}) is False
    assert components[6].value is True and webui.script.paste_field_names[-1] == "FD ControlNet reuse"
    tabs = webui.callbacks.registered["on_ui_tabs"][0]()
    assert tabs[0][1:] == ("FasterDiffusion", "fasterdiffusion")
    # XYZ axes on a stand-in of the built-in xyz_grid module, added once
    xyz = types.ModuleType("xyz_grid.py")
    xyz.axis_options = []
    xyz.AxisOption = lambda label, type, apply, **kw: SimpleNamespace(label=label, apply=apply, **kw)
    # (no xyz.apply_field: Forge Classic's xyz_grid has none)
    sys.modules["modules.scripts"].scripts_data[:] = [SimpleNamespace(script_class=type("S", (), {"__module__": "xyz_grid.py"}), module=xyz)]
    try:
        assert ui.add_xyz_axes() and ui.add_xyz_axes()
    finally:
        sys.modules["modules.scripts"].scripts_data.clear()
    assert [o.label for o in xyz.axis_options] == ["[FasterDiffusion] Enabled", "[FasterDiffusion] Strategy",
                                                   "[FasterDiffusion] Propagation", "[FasterDiffusion] ControlNet reuse"]
    assert xyz.axis_options[2].choices() == ["forecast", "reuse"]
    target = SimpleNamespace()
    xyz.axis_options[1].apply(target, "uniform:2", None)
    assert target.fd_strategy == "uniform:2"
    with pytest.raises(Exception):
        xyz.axis_options[1].confirm(None, ["paper", "nope"])
    # JSON: the same document as the ComfyUI widget's Copy; Import reads the widget's documents back
    doc = ui.to_shareable("paper", 20, "my preset")
    assert doc["key_steps"] == [0, 1, 2, 3, 5, 10, 15] and doc["name"] == "my preset"
    assert ui.from_shareable('{"key_steps": [0, 5, 2]}') == "0,2,5" and ui.from_shareable('{"strategy": "uniform:3"}') == "uniform:3"
    for bad in ("{", "[]", '{"key_steps": [1, 2]}', '{"key_steps": [0, 1.5]}'):
        with pytest.raises(ui.StrategyError):
            ui.from_shareable(bad)
    from test_web_strategy import run_js
    js = run_js(tmp_path, 'console.log(JSON.stringify(s.toShareable("uniform:4", 30, "")));')
    assert js == ui.to_shareable("uniform:4", 30)


# ------------------------------------------------------------------------------------------------ 6. Forge

@pytest.fixture(scope="module")
def forge_host(webui, digits):
    import comfy.ldm.modules.diffusionmodules.openaimodel as comfy_oai
    webui.forge._EXTRA.append(comfy_oai.__name__)
    patcher = digits[0]
    model = wf.ForgeModel(patcher.model.diffusion_model, patcher.model.model_sampling)
    yield model
    webui.forge._EXTRA.remove(comfy_oai.__name__)


def forge_generate(webui, host, args, func, steps=6, cfg=5.0, hires=False):
    model = host
    base_patcher = wf.UnetPatcher(model)
    sd = wf.ForgeSdModel(base_patcher)
    p = wf.P(sd, steps=steps, cfg_scale=cfg)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 4, 64, generator=g)
    uncond = torch.randn(1, 4, 64, generator=g)
    passes = [wf.Pass(wf.ForgeKSampler(func, sd), noise, cond, uncond, steps)]
    if hires:
        passes.append(wf.Pass(wf.ForgeKSampler(func, sd), torch.randn(1, 4, 12, 12, generator=g), cond, uncond, steps,
                              t_enc=3, init=torch.randn(1, 4, 12, 12, generator=g)))
    outs, processed = wf.generate(webui.script, p, args, passes, forge_reset=lambda p: p.sd_model.reset())
    return outs, p, processed, base_patcher


def test_forge_patches_a_clone_and_keeps_exactness(webui, forge_host, ks):
    base, _, _, _ = forge_generate(webui, forge_host, [False], ks.sample_euler)
    allk, p, _, patcher = forge_generate(webui, forge_host, [True, "all"], ks.sample_euler)
    assert torch.equal(base[0], allk[0])
    assert not patcher.object_patches and "forward" not in forge_host.diffusion_model.__dict__   # scoped to the clone
    assert p.sd_model.forge_objects.unet is not patcher and webui.forge.PATCH_KEY in p.sd_model.forge_objects.unet.object_patches
    par, p, _, _ = forge_generate(webui, forge_host, [True, "0,3"], ks.sample_euler)
    seq, _, _, _ = forge_generate(webui, forge_host, [True, "0,3", False], ks.sample_euler)
    torch.testing.assert_close(par[0], seq[0], rtol=1e-4, atol=1e-4)
    r = reports(p)[0]
    assert r["encoder_calls"] == 2 and r["cached_calls"] == 4 and r["decoder_batches"] == [3, 3]


def test_forge_cfg1_and_hires_double_hook(webui, forge_host, ks):
    outs, p, processed, _ = forge_generate(webui, forge_host, [True, "0,2"], ks.sample_euler, cfg=1.0, hires=True)
    first, hires = reports(p)
    assert first["cached_calls"] == 4 and hires["steps"] == 4 and hires["encoder_calls"] == 2
    assert all(shape[0] == 1 for shape, _ in p.sd_model.unet_calls)        # cond rows only at CFG 1
    base, _, _, _ = forge_generate(webui, forge_host, [False], ks.sample_euler, cfg=1.0, hires=True)
    allk, _, _, _ = forge_generate(webui, forge_host, [True, "all"], ks.sample_euler, cfg=1.0, hires=True)
    assert all(torch.equal(a, b) for a, b in zip(base, allk))


def test_forge_adapter_keeps_the_contract_with_controlnet_residuals(webui, forge_host):
    """simulate/check_log through the Forge forward patch, every call carrying its own step's ControlNet
    residuals (Forge passes ``control`` into the UNet, popping and adding them): non-key steps decode the key
    step's features with their own residuals, and the cached features stay clean."""
    forge = webui.forge
    dm = forge_host.diffusion_model
    g = torch.Generator().manual_seed(8)
    ctx = torch.randn(2, 4, 64, generator=g)
    sigmas, timesteps = schedule(5, 4)
    shapes = {}

    def control(t):
        """A fresh ControlNet-style dict for a call at timestep t: one residual per skip and one middle."""
        scale = 0.05 * torch.cos(t.flatten()[0] / 150.0)
        return {"middle": [scale * torch.ones(shapes["mid"])], "output": [scale * torch.ones(s) for s in shapes["skips"]]}

    adapter = ldm.LdmSplit(dm)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        c0 = SimpleNamespace(x=x0, timesteps=torch.tensor([500.0, 500.0]), context=ctx, dtype=x0.dtype,
                             host=ldm.LdmCall(None, None, {}, {}))
        f0 = adapter.encode(c0, adapter.embed(c0))
    shapes["mid"], shapes["skips"] = tuple(f0.mid.shape), [tuple(s.shape) for s in f0.skips]

    def call_of(call):
        return ModelCall(
            call.x, call.timesteps, ctx[:call.rows], call.sigmas, call.dtype, call.slot,
            ldm.LdmCall(None, control(call.timesteps), {"cond_or_uncond": [0, 1][:call.rows]}, {}))

    def full(call):
        return type(dm).forward(dm, call.x, call.timesteps, ctx[:call.rows], None, control(call.timesteps),
                                {"cond_or_uncond": [0, 1][:call.rows]})

    def reference(key_call, call):
        k, c = call_of(key_call), call_of(call)
        feats = adapter.encode(k, adapter.embed(k))
        return adapter.decode(c, feats, adapter.embed(c))

    class Patched:                       # the runtime's calls through the patched forward, as Forge makes them
        def __init__(self, run):
            self.run, self.gen = run, SimpleNamespace(run=run, step=None)
            self.forward_fn = types.MethodType(forge.make_forward(self.gen), dm)

        def __getattr__(self, name):
            return getattr(self.run, name)

        def forward(self, _adapter, call, step, _full):
            self.gen.step = step
            return self.forward_fn(call.x, call.timesteps, ctx[:call.rows], None, control(call.timesteps),
                                   {"cond_or_uncond": [0, 1][:call.rows], "sigmas": call.sigmas})

    with torch.no_grad():
        run = Run(Settings(parse_strategy("0,3"), propagation="reuse"), sigmas, timesteps)
        log = simulate(Patched(run), adapter, full, sigmas, timesteps, lambda: torch.randn(2, 4, 8, 8, generator=g),
                       [("c",)], passes=0, corrector=False, midpoints=False)
        check_log(run, log, reference, full)
        stats = run.finish()
    assert stats["cached_calls"] == 3 and set(stats["decoder_batches"]) == {1} and "ControlNet" in stats["parallel_off"]
