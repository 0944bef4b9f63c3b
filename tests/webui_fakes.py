"""Project-written stand-ins for AUTOMATIC1111 v1.10 and Forge Classic (hosts.md D1): neither host is on a
registry, so the FasterDiffusion script is driven here through fakes that reproduce their call patterns.

  * ``install_modules`` / ``remove_modules``: a ``modules`` package with ``scripts`` (Script, AlwaysVisible,
    scripts_data), ``script_callbacks`` (a registry), ``ui_components`` (InputAccordion) and ``sd_unet``;
    ``FakeGradio`` records the components a UI builds;
  * ``Denoiser``: k-diffusion's CompVisDenoiser arithmetic (SD1.5 betas, ``sigma_to_t`` by log-sigma
    interpolation, Karras sigmas) on an A1111-style ``sd_model.apply_model``;
  * ``CFG``: A1111's CFGDenoiser call patterns: one batched UNet call ``[cond rows, uncond rows]``, cond and
    uncond as separate calls when their context lengths differ (77 vs 154 tokens), one call per chunk
    (``batch_cond_uncond`` off), cond rows only (Forge at CFG 1);
  * ``KSampler`` / ``TSampler``: ``KDiffusionSampler.sample`` / ``sample_img2img`` (``sigmas`` passed only if
    the function declares it, img2img's ``sigmas[steps - t_enc - 1:]``) and the DDIM-style timestep samplers
    (the model evaluated at ``timesteps[len-1] ... timesteps[1]``);
  * ``generate``: processing's order: ``process`` -> per pass ``process_before_every_sampling`` (twice on
    Forge's hires pass, with Forge's ``forge_objects`` reset between) -> sample -> ``postprocess`` (skipped
    when sampling raised);
  * ``ForgeModel`` / ``UnetPatcher``: Forge's patcher clone, ``add_object_patch`` (applied while "loaded"),
    ``transformer_options`` with ``cond_or_uncond`` and ``sigmas``, ``model_sampling`` for sigma -> t;
  * ``ControlNetExtension``: the call pattern of Mikubill/sd-webui-controlnet's ``UnetHook`` (scripts/hook.py):
    its replaced UNet forward (``forward_webui`` bound to the UNet, the hook in its closure), each unit's
    ``control_model(x=, hint=, timesteps=, context=, y=, control_type=)`` at every call, the unit's weighting
    (weight, soft injection, advanced weighting, ``cond_mark`` under CFG injection), the cond/uncond marks on the
    contexts, and ``guidance_stopped`` from its ``on_cfg_denoiser`` handler with A1111's ``state.sampling_step``
    (the sampler callback's step, one behind the evaluation); ``FakeControlNet``: cldm.ControlNet's shape (the
    UNet encoder's copy, a hint block, one 1x1 "zero" conv per output), counting its forwards.
"""
from __future__ import annotations

import contextlib
import copy
import enum
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "fasterdiffusion_webui.py"
FAKE_NAMES = ("modules", "modules.scripts", "modules.script_callbacks", "modules.ui_components", "modules.sd_unet")


# --------------------------------------------------------------------------------------------------
# modules.* and gradio
# --------------------------------------------------------------------------------------------------

class FakeGradio(types.ModuleType):
    """Records every component: ``made`` lists (kind, kwargs, component)."""

    def __init__(self):
        super().__init__("gradio")
        self.made = []
        for kind in ("Checkbox", "Slider", "Dropdown", "Textbox", "Number", "HTML", "Button"):
            setattr(self, kind, self._factory(kind))
        for kind in ("Blocks", "Row", "Column", "Accordion", "Group"):
            setattr(self, kind, self._factory(kind))

    def _factory(self, kind):
        gr = self

        class Component:
            def __init__(self, value=None, **kwargs):
                self.kind, self.value, self.kwargs, self.events = kind, value, kwargs, []
                gr.made.append(self)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def _event(name):
                def register(self, fn=None, inputs=None, outputs=None, **kw):
                    self.events.append((name, fn, inputs, outputs))
                return register
            change, click, input, submit = _event("change"), _event("click"), _event("input"), _event("submit")

        Component.__name__ = kind
        return Component

    @staticmethod
    def update(**kwargs):
        return {"__type__": "update", **kwargs}


def install_modules(gradio: FakeGradio | None = None):
    """Fake ``modules.*`` (and optionally gradio) in sys.modules; returns the callbacks module."""
    modules = types.ModuleType("modules")
    modules.__path__ = []
    scripts = types.ModuleType("modules.scripts")

    class Script:
        infotext_fields = None
        paste_field_names = None
        is_img2img = False

        def elem_id(self, item_id):
            return f"script_{'img2img' if self.is_img2img else 'txt2img'}_fasterdiffusion_{item_id}"

    scripts.Script = Script
    scripts.AlwaysVisible = object()
    scripts.scripts_data = []
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.registered = {}
    for name in ("on_ui_tabs", "on_before_ui", "on_app_started", "on_script_unloaded", "on_ui_settings",
                 "on_model_loaded", "on_infotext_pasted", "on_cfg_denoiser"):
        def register(fn, *, name=None, _kind=name):
            callbacks.registered.setdefault(_kind, []).append(fn)
        setattr(callbacks, name, register)
    ui_components = types.ModuleType("modules.ui_components")
    if gradio is not None:
        class InputAccordion(gradio.Checkbox):
            def __init__(self, value, **kwargs):
                super().__init__(value, **kwargs)
                self.kind = "InputAccordion"
        ui_components.InputAccordion = InputAccordion
    sd_unet = types.ModuleType("modules.sd_unet")
    sd_unet.current_unet = None
    for mod in (modules, scripts, callbacks, ui_components, sd_unet):
        sys.modules[mod.__name__] = mod
    modules.scripts, modules.script_callbacks, modules.ui_components, modules.sd_unet = scripts, callbacks, ui_components, sd_unet
    if gradio is not None:
        sys.modules["gradio"] = gradio
    return callbacks


def remove_modules():
    for name in FAKE_NAMES:
        sys.modules.pop(name, None)
    if isinstance(sys.modules.get("gradio"), FakeGradio):
        del sys.modules["gradio"]


def load_script(name="fasterdiffusion_webui_script"):
    """Import scripts/fasterdiffusion_webui.py as A1111 does (by path; the fake modules must be installed)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------
# A1111 sampling
# --------------------------------------------------------------------------------------------------

class Denoiser:
    """k-diffusion's CompVisDenoiser maths for an eps model with SD1.5's scaled-linear betas."""

    def __init__(self, sd_model):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.inner_model = sd_model

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def get_sigmas(self, n, rho=7.0):
        lo, hi = float(self.sigmas[0]), float(self.sigmas[-1])
        ramp = torch.linspace(0, 1, n)
        s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        return torch.cat([s, s.new_zeros(1)])

    def __call__(self, x, sigma, cond):
        c_out = -sigma.view(-1, 1, 1, 1)
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        eps = self.inner_model.apply_model(x * c_in.view(-1, 1, 1, 1), self.sigma_to_t(sigma), cond)
        return x + eps * c_out


class TimestepDenoiser:
    """A1111's CompVisTimestepsDenoiser: the UNet's eps at a model timestep."""

    def __init__(self, sd_model, alphas_cumprod):
        self.inner_model, self.alphas_cumprod = sd_model, alphas_cumprod

    def __call__(self, x, t, cond):
        return self.inner_model.apply_model(x, t, cond)


class SdModel:
    """``p.sd_model``: SD1-style ``apply_model(x, t, cond)`` -> ``diffusion_model(x, t, context=cond)``; with
    ``sdxl`` the cond is a dict and the call is ``diffusion_model(x, timesteps=t, context=..., y=...)``."""

    def __init__(self, unet, sdxl=False):
        self.model = types.SimpleNamespace(diffusion_model=unet)
        self.sdxl = sdxl
        self.parameterization = "eps"
        self.unet_calls = []

    def apply_model(self, x, t, cond):
        dm = self.model.diffusion_model
        self.unet_calls.append((tuple(x.shape), t.flatten()[0].item()))
        if self.sdxl:
            return dm(x, timesteps=t, context=cond["crossattn"], y=cond["vector"])
        return dm(x, t, context=cond)


def _cat_cond(conds):
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _rows_of(cond):
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]


def _ctx_len(cond):
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


STATE = types.SimpleNamespace(sampling_step=0, sampling_steps=0)   # modules.shared.state
CFG_DENOISER_CALLBACKS: list = []      # script_callbacks.on_cfg_denoiser's handlers (the ControlNet extension's)


class CFG:
    """A1111's CFGDenoiser: ``mode`` "batched" (one call when context lengths match), "chunks" (one call per
    batch-size chunk), "cond_only" (no uncond rows: Forge at CFG 1).  Different context lengths always split.
    Before the model calls it runs the ``on_cfg_denoiser`` handlers with ``state.sampling_step``/``sampling_steps``."""

    def __init__(self, inner, mode="batched"):
        self.inner_model, self.mode = inner, mode
        self.evaluations = 0

    def __call__(self, x, sigma, cond=None, uncond=None, cond_scale=5.0, **_):
        self.evaluations += 1
        for handler in list(CFG_DENOISER_CALLBACKS):
            handler(types.SimpleNamespace(x=x, sampling_step=STATE.sampling_step, total_sampling_steps=STATE.sampling_steps))
        b = x.shape[0]
        if self.mode == "cond_only":
            return self.inner_model(x, sigma, cond)
        x_in, s_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        if _ctx_len(cond) != _ctx_len(uncond):
            out_c = self.inner_model(x, sigma, cond)
            out_u = self.inner_model(x, sigma, uncond)
        elif self.mode == "chunks":
            outs = [self.inner_model(x_in[i:i + b], s_in[i:i + b], c) for i, c in ((0, cond), (b, uncond))]
            out_c, out_u = outs
        else:
            out = self.inner_model(x_in, s_in, _cat_cond([cond, uncond]))
            out_c, out_u = out[:b], out[b:]
        return out_u + (out_c - out_u) * cond_scale


class KSampler:
    """A1111's KDiffusionSampler (sample / sample_img2img) around a k-diffusion sampler function."""

    def __init__(self, func, sd_model, mode="batched"):
        self.func = func
        self.model_wrap = Denoiser(sd_model)
        self.model_wrap_cfg = CFG(self.model_wrap, mode)

    def _kwargs(self, sigmas, steps):
        params = inspect.signature(self.func).parameters
        kw = {}
        if "sigmas" in params:
            kw["sigmas"] = sigmas
        if "n" in params:
            kw["n"] = steps
        if "sigma_min" in params:
            kw["sigma_min"], kw["sigma_max"] = float(sigmas[-2]), float(sigmas[0])
        return kw

    @staticmethod
    def callback_state(d):
        STATE.sampling_step = d["i"]          # sd_samplers_common.Sampler.callback_state

    def sample(self, p, x, cond, uncond, steps=None):
        steps = steps or p.steps
        sigmas = self.model_wrap.get_sigmas(steps)
        extra = {"cond": cond, "uncond": uncond, "cond_scale": p.cfg_scale}
        STATE.sampling_steps, STATE.sampling_step = steps, 0          # launch_sampling
        return self.func(self.model_wrap_cfg, x * sigmas[0], extra_args=extra, disable=True, callback=self.callback_state,
                         **self._kwargs(sigmas, steps))

    def sample_img2img(self, p, x, noise, cond, uncond, steps, t_enc):
        sigmas = self.model_wrap.get_sigmas(steps)
        sched = sigmas[steps - t_enc - 1:]
        extra = {"cond": cond, "uncond": uncond, "cond_scale": p.cfg_scale}
        STATE.sampling_steps, STATE.sampling_step = t_enc + 1, 0
        return self.func(self.model_wrap_cfg, x + noise * sched[0], extra_args=extra, disable=True,
                         callback=self.callback_state, **self._kwargs(sched, len(sched) - 1))


def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    """A DDIM loop with A1111's call pattern: ``timesteps`` ascending, evaluated at index len-1 ... 1."""
    extra_args = extra_args or {}
    ac = model.inner_model.alphas_cumprod
    s_in = x.new_ones(x.shape[0])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t, t_prev = int(timesteps[index]), int(timesteps[index - 1])
        e_t = model(x, float(t) * s_in, **extra_args)
        a_t, a_prev = ac[t], ac[t_prev]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
    return x


class TSampler:
    """A1111's CompVisSampler (DDIM/PLMS): ``timesteps = range(0, 1000, 1000 // steps) + 1``."""

    def __init__(self, func, sd_model, mode="batched"):
        self.func = func
        self.model_wrap = TimestepDenoiser(sd_model, Denoiser(sd_model).alphas_cumprod)
        self.model_wrap_cfg = CFG(self.model_wrap, mode)

    def sample(self, p, x, cond, uncond, steps=None):
        steps = steps or p.steps
        ts = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
        extra = {"cond": cond, "uncond": uncond, "cond_scale": p.cfg_scale}
        return self.func(self.model_wrap_cfg, x, extra_args=extra, disable=True, callback=None, timesteps=ts)


@dataclass
class P:
    """StableDiffusionProcessing: what the script reads and writes."""
    sd_model: object
    steps: int = 6
    cfg_scale: float = 5.0
    sampler: object = None
    extra_generation_params: dict = field(default_factory=dict)
    comments: dict = field(default_factory=dict)
    refiner_checkpoint: object = None

    def comment(self, text):
        self.comments[text] = 1


@dataclass
class Pass:
    """One sampling pass: its sampler, latent/noise, conds; ``t_enc`` for img2img / hires (else txt2img)."""
    sampler: object
    noise: torch.Tensor
    cond: object
    uncond: object
    steps: int
    t_enc: int | None = None
    init: torch.Tensor | None = None


def generate(script, p, args, passes, forge_reset=None, fail_at_pass=None):
    """One generation in processing's order; returns (latents per pass, processed or None if it raised)."""
    script.process(p, *args)
    outs = []
    try:
        for k, ps in enumerate(passes):
            p.sampler = ps.sampler
            script.process_before_every_sampling(p, *args, x=ps.noise if ps.init is None else ps.init,
                                                 noise=ps.noise, c=ps.cond, uc=ps.uncond)
            if forge_reset is not None and ps.t_enc is not None:   # Forge's hires pass: reset, then the hook again
                forge_reset(p)
                script.process_before_every_sampling(p, *args, x=ps.init, noise=ps.noise, c=ps.cond, uc=ps.uncond)
            if fail_at_pass == k:
                raise RuntimeError("sampling failed")
            with torch.no_grad():
                if ps.t_enc is None:
                    outs.append(ps.sampler.sample(p, ps.noise, ps.cond, ps.uncond, ps.steps))
                else:
                    outs.append(ps.sampler.sample_img2img(p, ps.init, ps.noise, ps.cond, ps.uncond, ps.steps, ps.t_enc))
    except RuntimeError:
        if fail_at_pass is None:
            raise
        return outs, None             # A1111 skips postprocess when sampling raised
    processed = types.SimpleNamespace(comments="".join(f"{c}\n" for c in p.comments))
    script.postprocess(p, processed, *args)
    return outs, processed


# --------------------------------------------------------------------------------------------------
# Forge
# --------------------------------------------------------------------------------------------------

class UnetPatcher:
    """Forge's UnetPatcher: ``clone`` (shares the model, copies patches), ``add_object_patch``; the patches
    are applied only while ``loaded()`` (Forge's load_models_gpu / unpatch)."""

    def __init__(self, model, object_patches=None):
        self.model = model
        self.object_patches = dict(object_patches or {})
        self.model_options = {"transformer_options": {}}

    def clone(self):
        return UnetPatcher(self.model, self.object_patches)

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    @contextlib.contextmanager
    def loaded(self):
        saved = {}
        for name, obj in self.object_patches.items():
            owner_path, attr = name.rsplit(".", 1)
            owner = self.model
            for part in owner_path.split("."):
                owner = getattr(owner, part)
            saved[name] = (owner, attr, owner.__dict__.get(attr))
            setattr(owner, attr, obj)
        try:
            yield
        finally:
            for owner, attr, old in saved.values():
                if old is None:
                    owner.__dict__.pop(attr, None)
                else:
                    setattr(owner, attr, old)


class ForgeModel:
    """``forge_objects.unet.model``: a diffusion_model plus ComfyUI-like model_sampling."""

    def __init__(self, diffusion_model, model_sampling):
        self.diffusion_model, self.model_sampling = diffusion_model, model_sampling


class ForgeSdModel:
    def __init__(self, unet_patcher):
        self.forge_objects_after_applying_lora = types.SimpleNamespace(unet=unet_patcher)
        self.forge_objects = types.SimpleNamespace(unet=unet_patcher)
        self.unet_calls = []

    def reset(self):
        self.forge_objects = types.SimpleNamespace(unet=self.forge_objects_after_applying_lora.unet)


class ForgeDenoiser:
    """Forge's CFG path: cond (and uncond unless CFG 1) in one ``calc_cond_uncond_batch``-style call with
    ``transformer_options`` {cond_or_uncond, sigmas}; the UNet sees ``model_sampling.timestep(sigma)``."""

    def __init__(self, sd_model):
        self.sd_model = sd_model
        patcher = sd_model.forge_objects.unet
        ms = patcher.model.model_sampling
        self.sigmas_table = ms.sigmas
        self.inner_model = types.SimpleNamespace(inner_model=sd_model)

    def get_sigmas(self, n, rho=7.0):
        ms = self.sd_model.forge_objects.unet.model.model_sampling
        lo, hi = float(ms.sigma_min), float(ms.sigma_max)
        ramp = torch.linspace(0, 1, n)
        s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        return torch.cat([s, s.new_zeros(1)])

    def __call__(self, x, sigma, cond=None, uncond=None, cond_scale=5.0, **_):
        patcher = self.sd_model.forge_objects.unet
        ms, dm = patcher.model.model_sampling, patcher.model.diffusion_model
        b = x.shape[0]
        with_uncond = cond_scale != 1.0
        rows = [x, x] if with_uncond else [x]
        ctx = torch.cat([cond, uncond]) if with_uncond else cond
        to = {"cond_or_uncond": [0, 1] if with_uncond else [0], "sigmas": sigma}
        x_in, s_in = torch.cat(rows), torch.cat([sigma] * len(rows))
        with patcher.loaded():
            self.sd_model.unet_calls.append((tuple(x_in.shape), float(s_in[0])))
            out = dm(ms.calculate_input(s_in, x_in), ms.timestep(s_in).float(), context=ctx, control=None,
                     transformer_options=to)
        den = ms.calculate_denoised(s_in, out.float(), x_in)
        if not with_uncond:
            return den
        return den[b:] + (den[:b] - den[b:]) * cond_scale


class ForgeKSampler(KSampler):
    def __init__(self, func, sd_model):
        self.func = func
        self.model_wrap = ForgeDenoiser(sd_model)
        self.model_wrap_cfg = self.model_wrap


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """An LCM-style loop (re-noises the whole latent every step), with k-diffusion's function name: one of
    the samplers FasterDiffusion runs in full."""
    extra_args = extra_args or {}
    g = torch.Generator().manual_seed(0)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] > 0:
            x = x + torch.randn(x.shape, generator=g) * sigmas[i + 1]
    return x


# --------------------------------------------------------------------------------------------------
# The ControlNet extension (Mikubill/sd-webui-controlnet 56cec5b, scripts/hook.py and scripts/cldm.py): call pattern
# --------------------------------------------------------------------------------------------------

POSITIVE_MARK_TOKEN = 1024           # hook.py's marks on the contexts (process_sample marks cond / uncond)
MARK_EPS = 1e-3


def mark_context(ctx, positive):
    """A context of the extension's marked conds: one extra first token of +-1024 (``mark_prompt_context``)."""
    mark = torch.full_like(ctx[:, :1], POSITIVE_MARK_TOKEN if positive else -POSITIVE_MARK_TOKEN)
    return torch.cat([mark, ctx], dim=1)


def unmark_context(x):
    """``unmark_prompt_context``: (cond_mark per row, the context without the mark token)."""
    mark = x[:, 0, :]
    marked = float(torch.mean(torch.abs(torch.abs(mark) - POSITIVE_MARK_TOKEN))) < MARK_EPS
    if not marked:
        return torch.ones(x.shape[0], 1, 1, 1, dtype=x.dtype), x
    m = (torch.mean(torch.abs(mark + POSITIVE_MARK_TOKEN), dim=1) > MARK_EPS).float()
    return m[:, None, None, None].to(x.dtype), x[:, 1:, :]


class ControlModelType(enum.Enum):
    ControlNet = "ControlNet, Lvmin Zhang"
    T2I_StyleAdapter = "T2I_StyleAdapter, Chong Mou"

    @property
    def is_controlnet(self) -> bool:
        return self is ControlModelType.ControlNet


class FakeControlNet(torch.nn.Module):
    """cldm.ControlNet's forward on a toy scale: a copy of ``unet``'s encoder (time_embed, input blocks, middle
    block; re-randomised from ``seed``), the hint block's output added after input block 0, one 1x1 conv per input
    block and one for the middle block (random, not zero, so that every residual matters); returns the 13 raw
    residuals.  ``forwards`` counts its forwards."""

    def __init__(self, unet, seed, context_dim=32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.model_channels = unet.model_channels
        self.timestep_embedding = sys.modules[type(unet).__module__].timestep_embedding
        self.time_embed = copy.deepcopy(unet.time_embed)
        self.input_blocks = copy.deepcopy(unet.input_blocks)
        self.middle_block = copy.deepcopy(unet.middle_block)
        with torch.no_grad():
            for w in self.parameters():
                if w.dim() > 1:
                    w.copy_(torch.randn(w.shape, generator=g) * w[0].numel() ** -0.5)
            emb = self.time_embed(self.timestep_embedding(torch.zeros(1), self.model_channels, repeat_only=False))
            h, ctx, chans = torch.zeros(1, unet.in_channels, 8, 8), torch.zeros(1, 1, context_dim), []
            for module in self.input_blocks:
                h = module(h, emb, ctx)
                chans.append(h.shape[1])
            chans.append(self.middle_block(h, emb, ctx).shape[1])
        self.hint_block = torch.nn.Conv2d(3, chans[0], 8, stride=8)
        self.zero_convs = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 1) for c in chans)
        with torch.no_grad():
            for conv in (self.hint_block, *self.zero_convs):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * conv.weight[0].numel() ** -0.5)
                conv.bias.zero_()
        self.forwards = 0

    def forward(self, x, hint, timesteps, context, y=None, **kwargs):
        self.forwards += 1
        emb = self.time_embed(self.timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        guided_hint = self.hint_block(hint.to(x.dtype))
        outs, h = [], x
        for i, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = module(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.zero_convs[-1](h))
        return outs


class PlugableControlModel(torch.nn.Module):
    """cldm.PlugableControlModel: what ``param.control_model`` is (the net in ``.control_model``)."""

    def __init__(self, net):
        super().__init__()
        self.control_model = net

    def forward(self, *args, **kwargs):
        return self.control_model(*args, **kwargs)


class ControlParams:
    """hook.ControlParams: one enabled unit (the fields the forward reads)."""

    def __init__(self, control_model, hint_cond, weight=1.0, start=0.0, end=1.0, soft_injection=False,
                 cfg_injection=False, advanced_weighting=None, control_model_type=ControlModelType.ControlNet,
                 hr_option="both"):
        self.control_model, self.hint_cond, self.weight = control_model, hint_cond, weight
        self.guidance_stopped = False
        self.start_guidance_percent, self.stop_guidance_percent = start, end
        self.soft_injection, self.cfg_injection, self.advanced_weighting = soft_injection, cfg_injection, advanced_weighting
        self.global_average_pooling = False
        self.control_model_type, self.hr_option = control_model_type, hr_option
        self.used_hint_cond = None

    def disabled_by_hr_option(self, is_in_high_res_fix):
        return (self.hr_option == "low_res_only" and is_in_high_res_fix) or \
               (self.hr_option == "high_res_only" and not is_in_high_res_fix)


class ControlNetExtension:
    """hook.UnetHook: ``hook`` replaces the UNet's forward (the bound ``forward_webui``, this object in its
    closure) and registers ``guidance_schedule_handler`` with on_cfg_denoiser; ``restore`` undoes both.
    ``step_weights``: optional {unit index: callable(sampling_step) -> weight}, a per-step weight set by the
    handler (as an extension scheduling ``param.weight`` would)."""

    def __init__(self):
        self.model = None
        self.control_params = None
        self.is_in_high_res_fix = False
        self.step_weights = {}
        self.stopped_log = []          # per handler call: [guidance_stopped of each unit]

    def guidance_schedule_handler(self, x):
        if not self.control_params:
            return
        for i, param in enumerate(self.control_params):
            current_sampling_percent = (x.sampling_step / x.total_sampling_steps)
            param.guidance_stopped = current_sampling_percent < param.start_guidance_percent or \
                current_sampling_percent > param.stop_guidance_percent
            if i in self.step_weights:
                param.weight = self.step_weights[i](x.sampling_step)
        self.stopped_log.append([p.guidance_stopped for p in self.control_params])

    def hook(self, model, control_params):
        self.model, self.control_params = model, control_params
        outer = self

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            total_controlnet_embedding = [0.0] * 13
            cond_mark, context = unmark_context(context)
            for param in outer.control_params:
                if param.used_hint_cond is None:
                    param.used_hint_cond = param.hint_cond
            outer.is_in_high_res_fix = False
            for param in outer.control_params:
                if param.guidance_stopped or param.disabled_by_hr_option(outer.is_in_high_res_fix):
                    continue
                if not param.control_model_type.is_controlnet:
                    continue
                control = param.control_model(x=x, hint=param.used_hint_cond, timesteps=timesteps, context=context,
                                              y=y, control_type=None)
                control_scales = [param.weight] * 13
                if param.cfg_injection or param.global_average_pooling:
                    control = [c * cond_mark for c in control]
                if param.soft_injection:
                    control_scales = [param.weight * (0.825 ** float(12 - i)) for i in range(13)]
                if param.advanced_weighting is not None:
                    control_scales = param.advanced_weighting
                control = [c * scale for c, scale in zip(control, control_scales)]
                for idx, item in enumerate(control):
                    total_controlnet_embedding[idx] = item + total_controlnet_embedding[idx]
            hs = []
            with torch.no_grad():
                emb = self.time_embed(sys.modules[type(self).__module__].timestep_embedding(
                    timesteps, self.model_channels, repeat_only=False))
                h = x
                for module in self.input_blocks:
                    h = module(h, emb, context)
                    hs.append(h)
                h = self.middle_block(h, emb, context)
            h = aligned_adding(h, total_controlnet_embedding.pop())
            for module in self.output_blocks:
                h = torch.cat([h, aligned_adding(hs.pop(), total_controlnet_embedding.pop())], dim=1)
                h = module(h, emb, context)
            return self.out(h.type(x.dtype))

        def forward_webui(*args, **kwargs):
            try:
                return forward(*args, **kwargs)
            finally:
                if outer.model is None:
                    pass

        model._original_forward = model.forward
        model.forward = forward_webui.__get__(model, type(model))
        CFG_DENOISER_CALLBACKS.append(self.guidance_schedule_handler)
        return self

    def restore(self):
        if self.guidance_schedule_handler in CFG_DENOISER_CALLBACKS:
            CFG_DENOISER_CALLBACKS.remove(self.guidance_schedule_handler)
        self.control_params = None
        if self.model is not None and "forward" in self.model.__dict__:
            del self.model.forward
            del self.model._original_forward


def aligned_adding(base, x):
    if isinstance(x, float):
        return base if x == 0.0 else base + x
    return base + x
