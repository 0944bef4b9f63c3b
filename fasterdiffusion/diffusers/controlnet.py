"""ControlNet at non-key steps in diffusers pipelines (``controlnet_reuse``): the ControlNet runs at key steps only.

The ControlNet pipelines call ``self.controlnet(...)`` (a ``ControlNetModel``, or a ``MultiControlNetModel`` that
calls each of its nets and sums their residuals) every iteration before the UNet, with ``conditioning_scale`` =
the user's scale x ``controlnet_keep[i]`` (1 inside ``[control_guidance_start, control_guidance_end]``, else 0).
With ``controlnet_reuse`` each net's forward is a diffusers ``ModelHook`` (``faster_diffusion``) during a pipeline
call, with ComfyUI's semantics (``patches/comfy/controlnet.py``):
  * a key step (or any step the UNet runs in full): the net runs; its forward's own output goes to the pipeline,
    and its *unscaled* residuals (the outputs of ``controlnet_down_blocks`` / ``controlnet_mid_block``, captured
    as they leave them) are kept, per net;
  * a non-key step of a group whose key step the UNet encoded: the net does not run; it returns the kept
    residuals through the forward's own tail (``tail``: the scale, guess mode's per-block scales, global pooling)
    at *this* step's ``conditioning_scale``, so a net that has ended is zero-scaled as the pipeline does, and the
    result is what the forward would return on those residuals;
  * a net whose keep goes 0 -> 1 inside a group (``control_guidance_start``) makes that step a key step
    (``Run.add_keys``, "late keys"), so a step never gets residuals of a net that was off at its key.
The UNet then serves the step from the group's features (``ReusingAdapter``): the decoders of a group batch again,
each step with the residuals the pipeline will pass at that step, predicted from the pipeline call's
``controlnet_conditioning_scale`` / ``control_guidance_start`` / ``control_guidance_end`` exactly as the pipeline
computes them (``scale_plan``).  Every prediction is checked where the pipeline shows it: the key step's UNet
residuals must equal (bit for bit) what the prediction gives for that step (this checks the tail, the multi-net
sum and guess mode's zero rows for the unconditional half), and each non-key step's ControlNet call must come
with the predicted scale; where either fails, or a net ran fresh (its inputs changed: a callback's new control
image), that step's decoder runs on its own with the residuals the pipeline passed (``parallel_off`` says so).
A non-key UNet call that the run computes in full after its ControlNet was served raises (never stale residuals
in a full forward).  Only diffusers' own ``ControlNetModel`` is served (alone or in a ``MultiControlNetModel``);
anything else runs at every step, as with reuse off.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, replace

import torch

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.controlnets.controlnet import ControlNetModel, ControlNetOutput
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from .unet import row_timesteps

log = logging.getLogger("FasterDiffusion")

_FORWARD_SIGNATURE = inspect.signature(ControlNetModel.forward)
# what a served call may differ in from its key step's: the rest (prompt, control image, shapes ...) must match
PER_STEP = ("sample", "timestep", "conditioning_scale", "return_dict")


# --------------------------------------------------------------------------------------------------
# Which ControlNets, and the hooks on them
# --------------------------------------------------------------------------------------------------

def served_nets(pipe) -> tuple[list, str | None]:
    """The ``ControlNetModel``s of ``pipe.controlnet`` in the order the pipeline sums them, or ([], why not)."""
    cn = getattr(pipe, "controlnet", None)
    nets = list(cn.nets) if type(cn) is MultiControlNetModel else [cn]
    odd = sorted({type(n).__name__ for n in nets if type(n) is not ControlNetModel})
    if odd:
        return [], f"ControlNet reuse serves diffusers' ControlNetModel only, not {', '.join(odd)}"
    return nets, None


class _ControlNetHook(ModelHook):
    """One net's forward: during a pipeline call with reuse, its ``ControlReuse`` decides; otherwise the original."""

    def __init__(self, handle, index: int):
        super().__init__()
        self.handle, self.index = handle, index

    def new_forward(self, module, *args, **kwargs):
        active = self.handle._active
        reuse = None if active is None else active.controls
        if reuse is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return reuse.controlnet_call(self.index, self.fn_ref.original_forward, args, kwargs)


class _Installed:
    """One module's hook in its diffusers ``HookRegistry``, removable leaving nothing behind."""

    def __init__(self, module, hook, name):
        self.module, self.name = module, name
        self.had_registry = hasattr(module, "_diffusers_hook")
        self.had_forward = "forward" in vars(module)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)
        self.forward = vars(module)["forward"]

    def wrapped_after(self) -> bool:
        """Whether something (accelerate's CPU offload) wrapped the forward after ours: removing would drop it."""
        registry = self.module._diffusers_hook
        return vars(self.module).get("forward") is not self.forward and registry._hook_order[-1:] == [self.name]

    def remove(self):
        registry = self.module._diffusers_hook
        registry.remove_hook(self.name, recurse=False)
        if not registry.hooks:
            if not self.had_forward:
                vars(self.module).pop("forward", None)
            if not self.had_registry:
                del self.module._diffusers_hook


class ControlNetHooks:
    """The hooks ``apply`` puts on a pipeline's ControlNets (``install``: None where there is nothing to serve)."""

    def __init__(self, handle, controlnet, nets, name):
        self.controlnet = controlnet          # pipe.controlnet as it was at apply()
        self.nets = nets
        self.installed = [_Installed(net, _ControlNetHook(handle, i), name) for i, net in enumerate(nets)]

    @classmethod
    def install(cls, handle, pipe, name):
        if getattr(pipe, "controlnet", None) is None:
            return None
        nets, why = served_nets(pipe)
        if why:
            log.warning("FasterDiffusion: %s; it runs at every step and its steps' decoders one at a time", why)
            return None
        return cls(handle, pipe.controlnet, nets, name)

    def reuse_for(self, call, pipe_signature, args, kwargs) -> "ControlReuse | None":
        """The per-call state of one pipeline call (None where pipe.controlnet was replaced after apply)."""
        if call.pipe.controlnet is not self.controlnet:
            log.warning("FasterDiffusion: pipe.controlnet was replaced after apply(); it runs at every step")
            return None
        try:
            bound = pipe_signature.bind(call.pipe, *args, **kwargs)
        except TypeError:
            return None                          # the pipeline says what is wrong with the call
        bound.apply_defaults()
        return ControlReuse(call, self.nets, bound.arguments)

    def check_removable(self):
        if any(i.wrapped_after() for i in self.installed):
            raise RuntimeError("FasterDiffusion: controlnet.forward was wrapped after apply() (CPU offload?); remove "
                               "that first (pipe.remove_all_hooks()), then call remove()")

    def remove(self):
        for i in self.installed:
            i.remove()


# --------------------------------------------------------------------------------------------------
# The pipeline's arithmetic, mirrored (diffusers 0.42.1 pipelines/controlnet/*, models/controlnets/*)
# --------------------------------------------------------------------------------------------------

def scale_plan(arguments: dict, nets: int, multi: bool, num_steps: int) -> list:
    """Each step's ``conditioning_scale`` of each net, as the pipeline computes it: its alignment of
    ``control_guidance_start``/``_end``, ``controlnet_keep`` and ``cond_scale`` (StableDiffusion(XL)ControlNet(Img2Img)
    Pipeline.__call__)."""
    start, end = arguments["control_guidance_start"], arguments["control_guidance_end"]
    scale = arguments["controlnet_conditioning_scale"]
    if not isinstance(start, list) and isinstance(end, list):
        start = len(end) * [start]
    elif not isinstance(end, list) and isinstance(start, list):
        end = len(start) * [end]
    elif not isinstance(start, list) and not isinstance(end, list):
        start, end = (nets if multi else 1) * [start], (nets if multi else 1) * [end]
    if multi and isinstance(scale, float):
        scale = [scale] * nets
    plan = []
    for i in range(num_steps):
        keeps = [1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(start, end)]
        if multi:
            plan.append([c * k for c, k in zip(scale, keeps)])
        else:
            plan.append([(scale[0] if isinstance(scale, list) else scale) * keeps[0]])
    return plan


def tail(net, down: list, mid: torch.Tensor, conditioning_scale, guess_mode: bool):
    """The end of ``ControlNetModel.forward`` on its unscaled residuals, line for line."""
    if guess_mode and not net.config.global_pool_conditions:
        scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device)  # 0.1 to 1.0
        scales = scales * conditioning_scale
        down = [sample * scale for sample, scale in zip(down, scales)]
        mid = mid * scales[-1]  # last one
    else:
        down = [sample * conditioning_scale for sample in down]
        mid = mid * conditioning_scale
    if net.config.global_pool_conditions:
        down = [torch.mean(sample, dim=(2, 3), keepdim=True) for sample in down]
        mid = torch.mean(mid, dim=(2, 3), keepdim=True)
    return down, mid


def merge(outputs: list):
    """``MultiControlNetModel.forward``'s sum of its nets' outputs (one net: its own)."""
    down, mid = outputs[0]
    for d, m in outputs[1:]:
        down = [samples_prev + samples_curr for samples_prev, samples_curr in zip(down, d)]
        mid = mid + m
    return down, mid


def unet_side(down: list, mid: torch.Tensor, rows: int):
    """What the pipeline hands the UNet: the ControlNet's residuals, or under guess mode with CFG (the ControlNet
    ran on the conditional half only) zeros for the unconditional rows first; None for another layout."""
    if mid.shape[0] == rows:
        return list(down), mid
    if 2 * mid.shape[0] == rows:
        return [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])
    return None


def signature(value):
    """What tells a ControlNet input apart from another (tensors by storage, shape and in-place version; the key
    step's inputs are held, so a new tensor never reuses a kept one's storage)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), tuple(value.shape), value.stride(), value.dtype, str(value.device),
                value._version)
    if isinstance(value, dict):
        return ("dict", tuple((k, signature(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(signature(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ("object", id(value))


def inputs_of(a: dict) -> tuple:
    """The signature of everything a served call must share with its key step's call."""
    sample = a["sample"]
    return ((tuple(sample.shape), sample.dtype, str(sample.device)),
            tuple((k, signature(v)) for k, v in a.items() if k not in PER_STEP))


# --------------------------------------------------------------------------------------------------
# One pipeline call
# --------------------------------------------------------------------------------------------------

@dataclass
class Kept:
    """One net's residuals at a key step, unscaled, with the call's arguments (held: see ``signature``)."""
    key: int
    down: list
    mid: torch.Tensor
    arguments: dict
    inputs: tuple


@dataclass
class Seen:
    """One net's call at one loop position: how it was served and at which scale."""
    how: str              # "key" (ran, residuals kept), "served" (kept residuals), "fresh" (ran, nothing kept)
    scale: float
    guess_mode: bool
    rows: int


class ControlReuse:
    """The ControlNet side of one pipeline call: kept residuals per net, the scale plan, what each call got."""

    def __init__(self, call, nets: list, arguments: dict):
        self.call = call                  # the pipeline glue's _PipelineCall: pos, run, step_of
        self.nets = nets
        self.arguments = arguments        # the pipeline call's, defaults applied
        self.kept: dict = {}              # net index -> Kept
        self.seen: dict = {}              # loop position -> {net index: Seen}
        self.plan: list | None = None     # per step, each net's predicted conditioning_scale
        self.encoded: int | None = None   # the newest key step whose encoder features the UNet kept
        self.checked: dict = {}           # key step -> None (its group's residuals are as predicted) or why not
        self.table: dict = {}             # the checked key step's group: row timestep -> its steps' scales
        self.adapter = None

    # ---- the run

    def begin(self, run):
        """The run exists (the first UNet call): plan the scales and make the steps where a net starts key steps."""
        multi = type(self.call.pipe.controlnet) is MultiControlNetModel
        self.plan = scale_plan(self.arguments, len(self.nets), multi, run.plan.num_steps)
        if run.bypass:
            return
        late, on_at_key = [], set()
        for s, scales in enumerate(self.plan):
            on = {i for i, c in enumerate(scales) if c != 0}
            if run.plan.is_key(s):
                on_at_key = on
            elif not on <= on_at_key:
                late.append(s)
                on_at_key = on
        if run.add_keys(late):
            log.info("FasterDiffusion: a ControlNet starts inside a group (its control_guidance_start); steps %s run "
                     "as key steps, so that every step gets residuals of its own ControlNets", late)

    def unet_adapter(self, base):
        if self.adapter is None or self.adapter.base is not base:
            self.adapter = ReusingAdapter(base, self)
        return self.adapter

    # ---- the ControlNet's calls

    def controlnet_call(self, index: int, original, args, kwargs):
        try:
            bound = _FORWARD_SIGNATURE.bind(self.nets[index], *args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)          # let the host say what is wrong with the call
        bound.apply_defaults()
        a = dict(bound.arguments)
        del a["self"]
        pos, net = self.call.pos, self.nets[index]
        how = self._how(index, a)
        self.seen.setdefault(pos, {})[index] = Seen(how, a["conditioning_scale"], bool(a["guess_mode"]),
                                                    int(a["sample"].shape[0]))
        if how == "served":
            k = self.kept[index]
            down, mid = tail(net, k.down, k.mid, a["conditioning_scale"], a["guess_mode"])
            return ControlNetOutput(down, mid) if a["return_dict"] else (down, mid)
        if how == "fresh":
            return original(*args, **kwargs)
        out, down, mid = run_capturing(net, original, args, kwargs)
        self.kept[index] = Kept(pos, down, mid, a, inputs_of(a))
        return out

    def _how(self, index: int, a: dict) -> str:
        run = self.call.run
        if run is None:                            # before the first UNet call: step 0, always a key step
            return "key" if self.call.pos == 0 else "fresh"
        if run.bypass:
            return "fresh"
        step = self.call.step_of(row_timesteps(a["timestep"], a["sample"]))
        if step is None:
            return "fresh"
        if run.plan.is_key(step):
            return "key"
        key = run.plan.group_of(step)[0]
        k = self.kept.get(index)
        if k is None or k.key != key or self.encoded != key or k.inputs != inputs_of(a):
            return "fresh"
        return "served"

    # ---- the UNet's side

    def served_here(self) -> bool:
        return any(s.how == "served" for s in self.seen.get(self.call.pos, {}).values())

    def check_full(self):
        """The UNet call at this position runs the host's forward: its residuals must not be reused ones."""
        if self.served_here():
            raise RuntimeError(f"FasterDiffusion: the UNet call at step {self.call.pos} ran in full with reused "
                               "ControlNet residuals; set controlnet_reuse=False and report this")

    def expected(self, scales: list, guess_mode: bool, rows: int):
        """The residuals the pipeline passes the UNet at a step with ``scales``, from the kept ones."""
        outs = [tail(net, self.kept[i].down, self.kept[i].mid, c, guess_mode)
                for i, (net, c) in enumerate(zip(self.nets, scales))]
        return unet_side(*merge(outs), rows)

    def unbatched_reason(self, call) -> str | None:
        """None where this UNet call's step, and at a key step every step of its group, gets the residuals the
        plan predicts (so the group's decoders can run as one batch); else why its steps decode one at a time."""
        pos, run = self.call.pos, self.call.run
        seen = self.seen.get(pos, {})
        if self.plan is None or pos >= len(self.plan) or sorted(seen) != list(range(len(self.nets))):
            return "ControlNet residuals change every step"
        if any(s.how == "fresh" for s in seen.values()):
            return "a ControlNet ran at a non-key step (its inputs changed) and its residuals change every step"
        if [s.scale for _, s in sorted(seen.items())] != self.plan[pos]:
            return "a ControlNet's conditioning_scale differs from the one its pipeline's arguments give"
        key = run.plan.group_of(pos)[0]
        if key not in self.checked:
            self.checked[key] = self._check_key(call, seen) if pos == key else "no ControlNet at its key step"
        return self.checked[key]

    def _check_key(self, call, seen) -> str | None:
        """The key step's UNet residuals equal the predicted ones bit for bit (tail, sum and layout mirrored), and
        the rows of each step of its group tell its scales apart (``group_scales``)."""
        first = seen[0]
        if any(s.guess_mode != first.guess_mode or s.rows != first.rows for s in seen.values()):
            return "its ControlNets ran on different rows"
        h = call.host
        got = self.expected(self.plan[self.call.pos], first.guess_mode, call.rows)
        if got is None or len(got[0]) != len(h.down_residuals) or not all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip([*got[0], got[1]], [*h.down_residuals,
                                                                                         h.mid_residual])):
            return "the ControlNet residuals reached the UNet in a form FasterDiffusion does not mirror"
        self.table = self.group_scales(call)
        return None if self.table else "steps of one group share a timestep but not their ControlNet scales"

    def group_scales(self, call) -> dict:
        """Each step's scales of the key ``call``'s group by the timestep value of its rows (as ``Run.rows_for``
        makes them); {} where two steps share a value but not their scales."""
        run = self.call.run
        group = run.plan.group_of(self.call.pos)
        table = {float(call.timesteps[0]): self.plan[group[0]]}
        for s in group[1:]:
            t = float(run.timesteps[s].to(call.timesteps.dtype))
            if table.setdefault(t, self.plan[s]) != self.plan[s]:
                return {}
        return table

    def stacked(self, call, n: int, timesteps):
        """The residuals of a batched decoder call of ``n`` steps of the key step's group, stacked step-major."""
        guess = self.seen[self.call.pos][0].guess_mode
        by_scales: dict = {}
        per_step = []
        for t in timesteps.view(n, -1)[:, 0].tolist():
            scales = self.table[float(t)]
            if tuple(scales) not in by_scales:
                by_scales[tuple(scales)] = self.expected(scales, guess, call.rows)
            per_step.append(by_scales[tuple(scales)])
        down = tuple(torch.cat([d[j] for d, _ in per_step]) for j in range(len(per_step[0][0])))
        return down, torch.cat([m for _, m in per_step])


def run_capturing(net, original, args, kwargs):
    """The net's forward, unchanged, and its unscaled residuals: what ``controlnet_down_blocks`` and
    ``controlnet_mid_block`` return on the way (before the forward's tail)."""
    down = [None] * len(net.controlnet_down_blocks)
    mid = []
    hooks = [block.register_forward_hook(lambda m, i, o, j=j: down.__setitem__(j, o))
             for j, block in enumerate(net.controlnet_down_blocks)]
    hooks.append(net.controlnet_mid_block.register_forward_hook(lambda m, i, o: mid.append(o)))
    try:
        out = original(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out, down, mid[-1]


class ReusingAdapter:
    """The UNet adapter during a pipeline call with ControlNet reuse: the base adapter, except that a call whose
    residuals are the predicted ones is not an "own step" and a batched decoder call carries each step's residuals."""

    def __init__(self, base, reuse: ControlReuse):
        self.base, self.reuse = base, reuse

    def __getattr__(self, name):
        return getattr(self.base, name)

    def encode(self, call, emb):
        self.reuse.encoded = self.reuse.call.pos       # only a key step's call encodes
        return self.base.encode(call, emb)

    def own_step_reason(self, call):
        if self.base.own_step_reason(call) is None:
            return None
        return self.reuse.unbatched_reason(call)

    def tile(self, call, n, timesteps, sigmas):
        big = self.base.tile(call, n, timesteps, sigmas)
        if self.base.own_step_reason(call) is None:
            return big
        down, mid = self.reuse.stacked(call, n, timesteps)
        return replace(big, host=replace(big.host, down_residuals=down, mid_residual=mid))
