"""AUTOMATIC1111 / Forge glue shared by both hosts: one generation's settings, its sampling runs, the
sampler-function wrapper that captures each run's schedule, and the per-evaluation model proxy.

Per generation (``Generation``, made in ``Script.process``):
  * ``before_sampling`` (from ``process_before_every_sampling``; twice on Forge's hires pass) hooks the UNet
    (A1111: ``compvis.UNetHook`` on ``p.sd_model.model.diffusion_model``; Forge: a patched clone of
    ``forge_objects.unet``, ``forge.py``) and wraps ``p.sampler.func`` with ``functools.wraps``
    (idempotent: the original is kept on the wrapper);
  * each call of the wrapped sampler function is one sampling run (txt2img, the hires pass, img2img): a
    fresh ``Run`` on the exact schedule it was given (``sigmas``, or DDIM/PLMS ``timesteps``), a model proxy
    that marks where each sampler evaluation starts (and adds prior noise injection), the stats line in
    ``p.comment`` (shown under the image) and the log, in ``finally``;
  * ``cleanup`` removes every hook: from ``postprocess``, at the start of the next generation (a run that
    raised never reaches ``postprocess``) and when the script is unloaded.
Under the ControlNet extension's replaced forward (shared mode) ``controlnet_reuse`` runs its units' models at key
steps only, for the run (``controlnet.py``); the run's line says how often they ran and were reused.
No host module is imported at module level; ``modules.sd_unet`` is looked up only when present.
"""
from __future__ import annotations

import functools
import logging
import sys

import torch

from fasterdiffusion.forecast import DEFAULT_PROPAGATION, PROPAGATIONS
from fasterdiffusion.injection import DEFAULT_THRESHOLD, Injector
from fasterdiffusion.runtime import Run, RunModel
from fasterdiffusion.settings import Settings
from fasterdiffusion.samplers import STATE_PASSING, bypass_reason, forecast_off_reason
from fasterdiffusion.strategy import StrategyError, make_plan

from . import compvis, controlnet

log = logging.getLogger("FasterDiffusion")

# infotext keys (the accordion's values; "FasterDiffusion" present means enabled)
KEY_STRATEGY = "FasterDiffusion"
KEY_PARALLEL = "FD parallel"
KEY_MAX_BATCH = "FD max batch"
KEY_ALPHA = "FD injection"
KEY_PROPAGATION = "FD propagation"   # always written when enabled: infotexts without it predate forecast (reuse)
KEY_CONTROLNET = "FD ControlNet reuse"   # always written when enabled: infotexts without it predate it (off)
KEY_STATS = "FD stats"          # written after sampling, never read back
# the accordion's values, in ``ui()`` order (and the API's positional ``alwayson_scripts`` args)
ARGS = ("enabled", "strategy", "parallel", "max_decoder_batch", "injection_alpha", "propagation", "controlnet_reuse")
DEFAULTS = dict(enabled=False, strategy="paper", parallel=True, max_decoder_batch=32, injection_alpha=0.0,
                propagation=DEFAULT_PROPAGATION, controlnet_reuse=True)


def infotext(settings: Settings) -> dict:
    """The infotext keys of a generation with FasterDiffusion (defaults left out, propagation and ControlNet
    reuse always)."""
    d = {KEY_STRATEGY: str(settings.strategy)}
    if not settings.parallel:
        d[KEY_PARALLEL] = False
    if settings.max_decoder_batch != DEFAULTS["max_decoder_batch"]:
        d[KEY_MAX_BATCH] = settings.max_decoder_batch
    if settings.injection_alpha:
        d[KEY_ALPHA] = settings.injection_alpha
    d[KEY_PROPAGATION] = settings.propagation
    d[KEY_CONTROLNET] = settings.controlnet_reuse
    return d


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes", "on")
    return bool(v)


def read_settings(p, args) -> Settings | None:
    """The generation's settings from the accordion's values (``args`` in ``ARGS`` order, as positional
    ``alwayson_scripts`` args too, shorter lists take defaults) with XYZ overrides (``p.fd_enabled``,
    ``p.fd_strategy``, ``p.fd_propagation``, ``p.fd_controlnet_reuse``) applied; None where FasterDiffusion is
    off.  A bad strategy raises StrategyError, a bad propagation ValueError."""
    values = dict(DEFAULTS)
    values.update({k: v for k, v in zip(ARGS, args) if v is not None})
    if getattr(p, "fd_enabled", None) is not None:
        values["enabled"] = p.fd_enabled
    if getattr(p, "fd_strategy", None) is not None:
        values["strategy"] = p.fd_strategy
        if getattr(p, "fd_enabled", None) is None:
            values["enabled"] = True        # an XYZ strategy axis means "with FasterDiffusion"
    if getattr(p, "fd_propagation", None) is not None:
        values["propagation"] = p.fd_propagation
        if getattr(p, "fd_enabled", None) is None:
            values["enabled"] = True
    if getattr(p, "fd_controlnet_reuse", None) is not None:
        values["controlnet_reuse"] = p.fd_controlnet_reuse
        if getattr(p, "fd_enabled", None) is None:
            values["enabled"] = True
    if not _bool(values["enabled"]):
        return None
    return Settings.of(str(values["strategy"]).strip() or "paper", _bool(values["parallel"]),
                       max(0, int(float(values["max_decoder_batch"]))), str(values["propagation"]).strip(),
                       controlnet_reuse=_bool(values["controlnet_reuse"]),
                       injection_alpha=max(0.0, float(values["injection_alpha"])))


def settings_from_infotext(params: dict) -> dict:
    """The accordion's values a pasted infotext restores (plain values)."""
    on = KEY_STRATEGY in params
    return dict(enabled=on, strategy=params.get(KEY_STRATEGY, DEFAULTS["strategy"]),
                parallel=_bool(params.get(KEY_PARALLEL, True)),
                max_decoder_batch=int(float(params.get(KEY_MAX_BATCH, DEFAULTS["max_decoder_batch"]))),
                injection_alpha=float(params.get(KEY_ALPHA, 0.0)),
                propagation=params.get(KEY_PROPAGATION, "reuse" if on else DEFAULTS["propagation"]),
                controlnet_reuse=_bool(params.get(KEY_CONTROLNET, False if on else DEFAULTS["controlnet_reuse"])))


# --------------------------------------------------------------------------------------------------
# One generation
# --------------------------------------------------------------------------------------------------

_ACTIVE: list = []      # generations whose hooks are (or may still be) installed


def cleanup_all(why: str = ""):
    """Remove the hooks of every earlier generation (one that raised never reached postprocess)."""
    while _ACTIVE:
        g = _ACTIVE.pop()
        if g.hooks_installed() and why:
            log.info("FasterDiffusion: removing hooks left by an earlier generation (%s)", why)
        g.cleanup()


def is_forge(p) -> bool:
    return hasattr(getattr(p, "sd_model", None), "forge_objects")


class Generation:
    def __init__(self, settings: Settings, p=None):
        self.settings = settings
        self.p = p
        self.run: Run | None = None
        self.step: int | None = None
        self.evaluation = 0             # sampler evaluations so far (ControlNet reuse counts call slots per evaluation)
        self.reports: list[dict] = []
        self.lines: list[str] = []
        self.z_T = None
        self._hooks: list = []          # compvis.UNetHook (A1111)
        self._samplers: list = []       # sampler objects whose func we wrapped
        self.forge = None               # the forge module when serving Forge
        _ACTIVE.append(self)

    # --------------------------------------------------------------------------- hooks
    def before_sampling(self, p, noise=None, **kwargs):
        """``process_before_every_sampling``: hook the UNet and wrap this pass's sampler (idempotent)."""
        if isinstance(noise, torch.Tensor):
            self.z_T = noise
        if is_forge(p):
            from . import forge
            self.forge = forge
            forge.patch_unet(p, self)
        else:
            unet = p.sd_model.model.diffusion_model
            if not any(h.unet is unet for h in self._hooks) and compvis.unsupported_reason(unet) is None:
                self._hooks.append(compvis.UNetHook(unet, lambda: self.run, lambda: self.step).install())
        sampler = getattr(p, "sampler", None)
        if sampler is not None and hasattr(sampler, "func"):
            wrap_sampler(sampler, self)

    def hooks_installed(self) -> bool:
        return any(h.installed for h in self._hooks)

    def cleanup(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for s in self._samplers:
            orig = getattr(s.func, "_fd_orig", None)
            if orig is not None:
                s.func = orig
        self._samplers = []
        self.run = None
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    # --------------------------------------------------------------------------- one sampling run
    def unet(self, p):
        if self.forge is not None:
            return self.forge.diffusion_model(p)
        return p.sd_model.model.diffusion_model

    def bypass_for(self, p, func_name) -> str | None:
        reason = bypass_reason(func_name)
        if reason:
            return reason
        if getattr(p, "refiner_checkpoint", None) and getattr(p, "refiner_switch_at", 1.0) < 1.0:
            return "the refiner swaps the UNet during sampling: every step ran in full"
        if self.forge is not None:
            return self.forge.unsupported_reason(p)
        unet = self.unet(p)
        reason = compvis.unsupported_reason(unet)
        if reason:
            return f"passing the model through unchanged: {reason}"
        sd_unet = sys.modules.get("modules.sd_unet")
        if sd_unet is not None and getattr(sd_unet, "current_unet", None) is not None:
            return "an SD UNet replacement (TensorRT, ...) is active: every step ran in full"
        return None

    def schedule(self, p, sampler, kwargs):
        """(schedule, model timesteps, kind) of this call of the sampler function, or None."""
        if isinstance(kwargs.get("sigmas"), torch.Tensor):
            sigmas = kwargs["sigmas"].detach().flatten().float().cpu()
            head = sigmas[:-1]
            if self.forge is not None:
                t = self.forge.timesteps(p, head)
            else:
                t = sampler.model_wrap.sigma_to_t(head.to(sampler.model_wrap.sigmas.device))
            t = torch.cat([torch.as_tensor(t, dtype=torch.float32).flatten().cpu(), torch.zeros(1)])
            return sigmas.tolist(), t, "sigmas"
        if isinstance(kwargs.get("timesteps"), torch.Tensor) and self.forge is None:
            # DDIM/PLMS: the model is evaluated at timesteps[len-1], ..., timesteps[1]; timesteps[0] is the end
            ts = [float(v) for v in kwargs["timesteps"].flatten().tolist()][::-1]
            return ts, torch.tensor(ts), "timesteps"
        return None

    def sample(self, orig, sampler, p, model, x, args, kwargs):
        name = getattr(orig, "__name__", "")
        sched = self.schedule(p, sampler, kwargs)
        why = self.bypass_for(p, name)
        if sched is None:
            why = why or (f"{name} takes no schedule to place steps on (DPM fast/adaptive"
                          f"{', or a timestep sampler on Forge' if self.forge is not None else ''}): every step ran in full")
            self._say(f"FasterDiffusion [{self.settings.strategy}]: {why}", warn=True)
            return orig(model, x, *args, **kwargs)
        schedule, timesteps, kind = sched
        run = Run(self.settings, schedule, timesteps, why, forecast_off_reason(name, len(schedule) - 1))
        reuses = []
        for h in self._hooks:
            h.shared = "forward" in h.unet.__dict__ and not getattr(h.unet.__dict__["forward"], "_fd_hook", None)
            if h.shared and not run.bypass:
                reuse = self.controlnet_reuse(run, h)
                if reuse is not None:
                    reuses.append(reuse)
                self._say("FasterDiffusion: another extension (ControlNet?) replaced the UNet's forward; "
                          "propagating sequentially (no parallel decoders) under its forward"
                          + ("; ControlNet runs at key steps only (controlnet_reuse)" if reuse is not None else ""),
                          warn=False)
        injector = self.injector(p, sampler, run, name, kind)
        self.run, self.step = run, None
        try:
            return orig(RunModel(model, run, injector, on_step=self._on_step), x, *args, **kwargs)
        finally:
            self.run = self.step = None
            for reuse in reuses:
                reuse.remove()
                reuse.hook.controls = None
            report = run.close(self.reports, self._say)
            for reuse in reuses:
                report["controlnet"] = reuse.counts.as_dict()
                self._say(reuse.summary())
            if self.p is not None and hasattr(self.p, "extra_generation_params"):
                # in the images' infotext (written after sampling; params.txt, written before, lacks it)
                self.p.extra_generation_params[KEY_STATS] = "; ".join(map(short_report, self.reports))

    def _on_step(self, step):
        self.step = step            # the UNet hooks place this evaluation's calls on it
        self.evaluation += 1

    def controlnet_reuse(self, run, hook):
        """ControlNet reuse for this run under the extension's forward on ``hook``'s UNet, or None (the setting is
        off, or the forward is not the ControlNet extension's, or it has no served unit)."""
        if not self.settings.controlnet_reuse:
            return None
        outer = controlnet.extension_hook(hook.unet)
        if outer is None:
            return None
        reuse = controlnet.ControlReuse(run, hook, outer.control_params, lambda: self.evaluation)
        if not reuse.units:
            return None
        hook.controls = reuse.install()
        return reuse

    def injector(self, p, sampler, run, name, kind):
        a = self.settings.injection_alpha
        if a <= 0 or run.bypass:
            return None
        short = name.removeprefix("sample_")
        if kind != "sigmas" or short not in STATE_PASSING or self.z_T is None:
            log.warning("FasterDiffusion: prior noise injection needs one of the samplers %s; not applied with %s",
                        ", ".join(s for s in STATE_PASSING if s != "lcm"), name or "this sampler")
            return None
        shift = (self.forge.denoised_shift(p) if self.forge is not None else
                 _v_shift if type(getattr(sampler, "model_wrap", None)).__name__ == "CompVisVDenoiser" else _eps_shift)
        inj = Injector(run.sigmas, run.timesteps.tolist(), self.z_T, a, DEFAULT_THRESHOLD, shift)
        run.stats.injected_steps = inj.steps
        return inj

    def _say(self, text, warn=False):
        print(text)          # A1111/Forge show a script's print in the console; the logger would repeat it
        log.debug(text)
        self.lines.append(text)
        if self.p is not None and hasattr(self.p, "comment"):
            self.p.comment(text)


def short_report(r: dict) -> str:
    """One run's stats for the infotext: "20 steps: encoder 7x, skipped 13x" (or why it ran in full), and with
    ControlNet reuse ", ControlNet 9x, reused 11x" (the units' model runs and reuses)."""
    if r.get("bypassed"):
        return f"{r['steps']} steps: full ({r['bypassed'].split(':')[0]})"
    text = f"{r['steps']} steps: encoder {r['encoder_calls'] + r['full_calls']}x, skipped {r['cached_calls']}x"
    c = r.get("controlnet")
    if c:
        text += f", ControlNet {c['key'] + c['fresh']}x, reused {c['reused']}x"
    return text


def _eps_shift(sigma, dx):
    return dx


def _v_shift(sigma, dx):
    # k-diffusion's CompVisVDenoiser: denoised = c_skip * x + c_out * v, c_skip = 1 / (sigma^2 + 1)
    s = sigma.reshape(-1, *([1] * (dx.ndim - 1))).to(dx)
    return dx / (s * s + 1)


def wrap_sampler(sampler, gen: Generation):
    """``sampler.func`` wrapped so each call is one FasterDiffusion run; ``functools.wraps`` keeps its
    signature (A1111 passes ``sigmas`` only to functions that declare it).  Idempotent."""
    orig = getattr(sampler.func, "_fd_orig", sampler.func)

    @functools.wraps(orig)
    def fd_sampler_func(model, x, *args, **kwargs):
        return gen.sample(orig, sampler, gen.p, model, x, args, kwargs)

    fd_sampler_func._fd_orig = orig
    sampler.func = fd_sampler_func
    if sampler not in gen._samplers:      # cleanup puts the original back
        gen._samplers.append(sampler)
    return fd_sampler_func


def describe(strategy: str, steps: int) -> str:
    """One line on a strategy for a step count (the tab's "Check"), or the error."""
    try:
        plan = make_plan(strategy, int(steps))
    except StrategyError as e:
        return str(e).split("\n", 1)[0]
    from fasterdiffusion.strategy import predicted_cost_fraction
    flops = predicted_cost_fraction(plan, 0.31)
    return f"{plan.describe()}; UNet FLOPs {flops:.0%} of the full run (SD1.5 encoder share 31 %)"
