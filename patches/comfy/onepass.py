"""ComfyUI glue for TiUE one-pass sampling: ComfyUI's own sampling path, one model call, the engine inside it.

The node runs ``comfy.sample.sample_custom`` with CFG 1 (guidance is distilled into a student) and a
``Sampler`` of its own that makes exactly one model evaluation at the first DDIM timestep.  So ComfyUI
still does everything around the UNet: loading (and LoRA patches), conditioning (SDXL's ADM ``y``, an
inpainting model's concat channels), ``process_latent_in``/``process_latent_out``, the noise of
``comfy.sample.prepare_noise``, interruption.  Inside that one call two wrappers on a clone of the model
(both public hooks) hand the UNet call to the engine:
  APPLY_MODEL      returns the one-pass latent z_0 as the call's "denoised" output (what a sampler returns)
  DIFFUSION_MODEL  runs ``fasterdiffusion.onepass.one_pass`` through the ldm adapter: the encoder once on
                   this call's input, the K decoders batched (split under ``max_decoder_batch``), the
                   closed-form DDIM combination
Whether the model is a TiUE student is told by its weights (``student_of``): the trainer's safetensors
metadata carries a fingerprint of a few weight tensors, and the model folders' files are searched for one
that matches, because ComfyUI's loaders drop a file's metadata.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field

import torch

import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils

from ...fasterdiffusion.onepass import MAX_K, OnePassError, ddim_timesteps, one_pass
from ...fasterdiffusion.tiue import FINGERPRINT_KEYS, fingerprint_of_weights, read_student_metadata
from .ldm import LdmUNetAdapter, make_call, unsupported_reason

KEY = "faster_diffusion_onepass"
BOX = "faster_diffusion_onepass_box"
FD_KEY = "faster_diffusion"          # FasterDiffusion Apply's wrappers: one pass already is one encoder pass
WRAP = comfy.patcher_extension.WrappersMP
STUDENT_FOLDERS = ("diffusion_models", "checkpoints")
log = logging.getLogger("FasterDiffusion")


# --------------------------------------------------------------------------------------------------
# What the model is
# --------------------------------------------------------------------------------------------------

def prediction_of(model) -> str:
    """"eps" or "v" for a ModelPatcher on a DDPM (discrete, 1000-step-style) schedule; OnePassError otherwise."""
    unet = model.get_model_object("diffusion_model")
    if reason := unsupported_reason(unet):
        raise OnePassError(f"FasterDiffusion One-Pass runs SD-architecture UNets (SD1.x, SD2.x, SDXL): {reason}")
    ms = model.get_model_object("model_sampling")
    mro = type(ms).__mro__
    discrete = (isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
                and not isinstance(ms, (comfy.model_sampling.ModelSamplingDiscreteEDM,
                                        comfy.model_sampling.StableCascadeSampling)))
    if not discrete or comfy.model_sampling.EPS not in mro or any(
            c in mro for c in (comfy.model_sampling.EDM, comfy.model_sampling.X0)):
        raise OnePassError("FasterDiffusion One-Pass needs an eps- or v-prediction model on a DDPM schedule "
                           f"(DDIM's closed form); this model samples with {type(ms).__name__}")
    return "v" if comfy.model_sampling.V_PREDICTION in mro else "eps"


@dataclass
class Schedule:
    timesteps: list
    alphas_cumprod: torch.Tensor      # float64, per train timestep
    final_alpha: float
    sigmas: list                      # ComfyUI's sigma of each timestep
    prediction: str


def schedule_of(model, k: int) -> Schedule:
    """The K leading DDIM timesteps on this model's own schedule (and its alpha-bar, sigmas, parametrisation)."""
    prediction = prediction_of(model)
    ms = model.get_model_object("model_sampling")
    sig = ms.sigmas.detach().double().cpu()
    timesteps = ddim_timesteps(k, num_train_timesteps=len(sig))
    # a replaced sampling schedule (ModelSamplingDiscrete 'lcm', a distilled table) maps sigmas elsewhere
    back = ms.timestep(ms.sigmas[timesteps]).round().long().cpu().tolist()
    if back != timesteps:
        raise OnePassError(f"FasterDiffusion One-Pass: this model's sampling schedule does not map the DDIM timesteps "
                           f"{timesteps} to themselves ({back}); use the model's own schedule")
    alphas = 1.0 / (1.0 + sig * sig)
    return Schedule(timesteps, alphas, float(alphas[0]), [float(ms.sigmas[t]) for t in timesteps], prediction)


def model_weights(model) -> dict:
    unet = model.get_model_object("diffusion_model")
    params = dict(unet.named_parameters())
    return {k: params[k] for k in FINGERPRINT_KEYS if k in params}


_HEADERS: dict = {}      # path -> ((size, mtime), student document or None)


def file_student_document(path: str) -> dict | None:
    """The TiUE student document in a safetensors file's header (only the header is read; cached)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_size, st.st_mtime_ns)
    cached = _HEADERS.get(path)
    if cached and cached[0] == stamp:
        return cached[1]
    doc = None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 0 < n < 100_000_000:
                doc = read_student_metadata(json.loads(f.read(n)).get("__metadata__"))
    except (OSError, ValueError, struct.error, AttributeError):
        doc = None
    _HEADERS[path] = (stamp, doc)
    return doc


def student_of(model, folders=STUDENT_FOLDERS) -> dict | None:
    """The student document (plus ``file``) of the file in ComfyUI's model folders whose weights fingerprint
    matches this model's weights, or None: not a student made by tools/train_tiue.py (or not in a folder)."""
    import folder_paths
    weights = model_weights(model)
    if len(weights) != len(FINGERPRINT_KEYS):
        return None
    mine = fingerprint_of_weights(weights)
    if mine is None:
        return None
    dtype, digest = mine
    for folder in folders:
        try:
            names = folder_paths.get_filename_list(folder)
        except Exception:        # an unknown folder name in this ComfyUI
            continue
        for name in names:
            if not name.lower().endswith((".safetensors", ".sft")):
                continue
            path = folder_paths.get_full_path(folder, name)
            doc = path and file_student_document(path)
            if doc and doc["fingerprint"].get(dtype) == digest:
                return dict(doc, file=name)
    return None


# --------------------------------------------------------------------------------------------------
# The sampling run
# --------------------------------------------------------------------------------------------------

@dataclass
class Request:
    """One node run: the schedule, the cap, and what the calls did (read by the node and the tests)."""
    schedule: Schedule
    max_decoder_batch: int = 32
    calls: list = field(default_factory=list)     # per UNet call: (rows, decoder batches)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """The one-pass call's "denoised" output is the one-pass latent itself."""
    if transformer_options.get(KEY) is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    box = {}
    to = dict(transformer_options)
    to[BOX] = box
    executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
    if "latent" not in box:
        raise RuntimeError("FasterDiffusion One-Pass: the UNet call did not reach the one-pass wrapper "
                           "(another pack replaced the UNet call)")
    return box["latent"].to(x.device, torch.float32)


def diffusion_model_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    to = transformer_options
    req, box = to.get(KEY), to.get(BOX)
    if req is None or box is None:
        return executor(x, timesteps, context, y, control, to, **kwargs)
    if control is not None and any(len(control.get(k) or []) for k in ("input", "middle", "output")):
        raise OnePassError("FasterDiffusion One-Pass does not take a ControlNet or T2I adapter: its decoders "
                           "all run at once on one set of encoder features")
    if to.get("patches", {}).get("middle_block_after_patch"):
        raise OnePassError("FasterDiffusion One-Pass cannot serve a model with a middle_block_after_patch (SUPIR): "
                           "that patch reads each step's latent, and One-Pass decodes every step at once from the "
                           "first; sample it with FasterDiffusion Apply and a KSampler instead")
    s = req.schedule
    call = make_call(x, timesteps, context, y, None, to, kwargs)
    res = one_pass(LdmUNetAdapter(executor.class_obj), call, s.timesteps, s.alphas_cumprod, s.final_alpha,
                   req.max_decoder_batch, s.prediction, s.sigmas)
    box["latent"] = res.latent
    req.calls.append((call.rows, res.decoder_batches))
    return res.outputs[0]


class OnePassSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler that makes one model evaluation: the input z_K at the first DDIM timestep."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        sigma = sigmas[0]
        z = noise
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            # KSampler at denoise 1 starts from latent + sigma_max * noise: the latent enters with that weight
            z = noise + latent_image / float(ms.sigma_max)
        # the UNet sees calculate_input(sigma, x) = x / sqrt(1 + sigma^2): make that z_K
        x = z * math.sqrt(1.0 + float(sigma) ** 2)
        s_in = x.new_ones([x.shape[0]])
        denoised = model_wrap(x, sigma * s_in, model_options=extra_args["model_options"], seed=extra_args.get("seed"))
        if callback is not None:
            callback(0, denoised, x, 1)
        return denoised


def one_pass_model(model, request: Request):
    """A clone of ``model`` whose UNet calls carrying ``request`` run the one-pass engine."""
    m = model.clone()
    to = m.model_options["transformer_options"]
    if FD_KEY in to:
        log.info("FasterDiffusion One-Pass: ignoring FasterDiffusion Apply on this model (one pass already runs the "
                 "encoder once)")
        for wrapper_type in (WRAP.OUTER_SAMPLE, WRAP.PREDICT_NOISE, WRAP.DIFFUSION_MODEL):
            m.remove_wrappers_with_key(wrapper_type, FD_KEY)
        del to[FD_KEY]
    to[KEY] = request
    m.add_wrapper_with_key(WRAP.APPLY_MODEL, KEY, apply_model_wrapper)
    m.add_wrapper_with_key(WRAP.DIFFUSION_MODEL, KEY, diffusion_model_wrapper)
    m.model_options.pop("disable_cfg1_optimization", None)     # no guidance: the conditional pass only
    return m


def check_conditioning(positive):
    for _, extra in positive:
        if extra.get("control") is not None:
            raise OnePassError("FasterDiffusion One-Pass does not take a ControlNet (its decoders all run at once on "
                               "one set of encoder features); remove Apply ControlNet")


def sample(model, positive, latent_image: dict, seed: int, k: int = 4, max_decoder_batch: int = 32,
           disable_pbar: bool = True, callback=None):
    """(output LATENT dict, Request, student document or None, seconds)."""
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise OnePassError(f"FasterDiffusion One-Pass: K must be 1..{MAX_K} DDIM steps, got {k!r}")
    check_conditioning(positive)
    schedule = schedule_of(model, k)
    request = Request(schedule, max_decoder_batch)
    t0 = time.perf_counter()
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    sigmas = torch.tensor([schedule.sigmas[0], 0.0])
    m = one_pass_model(model, request)
    samples = comfy.sample.sample_custom(m, noise, 1.0, OnePassSampler(schedule), sigmas, positive, positive, latent,
                                         callback=callback, disable_pbar=disable_pbar, seed=seed)
    out = latent_image.copy()
    out.pop("noise_mask", None)
    out["samples"] = samples
    return out, request, student_of(model), time.perf_counter() - t0


def report(request: Request, student: dict | None, seconds: float) -> str:
    """The node's UI text (and log line)."""
    s = request.schedule
    batches = [w for _, widths in request.calls for w in widths]
    text = (f"FasterDiffusion One-Pass (TiUE): K={len(s.timesteps)} DDIM steps {s.timesteps} ({s.prediction}), "
            f"encoder ran {len(request.calls)}x, decoder batches {batches}; {seconds:.2f}s. ")
    if student is None:
        text += ("This model is not a recognised TiUE student: only distilled students give good images in one pass "
                 "(distil one with tools/train_tiue.py; its file in ComfyUI's models folders is recognised by its "
                 "weights).")
    elif student.get("timesteps") != s.timesteps:
        text += (f"Student {student['file']} was distilled for K={student.get('k')} {student.get('timesteps')}: "
                 f"set K to {student.get('k')}; other K give poor images.")
    else:
        text += f"TiUE student {student['file']} (distilled for these timesteps)."
    return text
