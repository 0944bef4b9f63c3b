"""FasterDiffusion for diffusers: ``handle = apply(pipe)`` on a Stable Diffusion pipeline.

The integration a ``pip install`` user imports (``from fasterdiffusion.diffusers import apply``); ``import
fasterdiffusion`` never imports diffusers.  The method itself is the engine's ``Run`` (``fasterdiffusion.runtime``);
this package is the diffusers adapters and thin glue: one adapter per denoiser class (``unet.py``:
``DiffusersUNetAdapter`` for ``UNet2DConditionModel``, its split and what it refuses; ``motion.py``:
``MotionUNetAdapter`` for AnimateDiff's ``UNetMotionModel``; ``video.py``: ``SpatioTemporalUNetAdapter`` for Stable
Video Diffusion's ``UNetSpatioTemporalConditionModel`` and ``UNet3DAdapter`` for ModelScope's ``UNet3DConditionModel``,
frames folded into the batch as the forwards do; Text2Video-Zero runs on ``DiffusersUNetAdapter``, its cross-frame
attention regrouped per stacked step; ``dit.py``: ``DiTAdapter`` for DiT's ``DiTTransformer2DModel``, the transformer
split of ``fasterdiffusion.transformer``, patch embedding and the first ``encoder_blocks`` blocks as the encoder),
``pipeline.py`` (``apply``: one run per pipeline call; ``ADAPTERS`` says which adapter serves which UNet or transformer
class, ``denoiser_of`` finds a pipeline's, its ``unet`` or its ``transformer``), ``controlnet.py``
(``controlnet_reuse``: a ControlNet runs at key steps only, its residuals reused at the other steps' own scale),
``onepass.py`` (TiUE one-pass sampling).

How it hooks, and why
  * **The denoiser's forward** (the UNet's, or DiT's transformer's): a diffusers ``ModelHook`` named
    ``faster_diffusion`` in its ``HookRegistry`` (diffusers' public hook system, as its own cache hooks use).  Its
    ``new_forward`` hands every call made during a pipeline call to that call's ``Run``; anything else (a direct
    ``unet(...)`` call, an unsupported feature) goes to the original forward unchanged.
  * **Run boundaries = one pipeline call.**  Python looks ``pipe(...)`` up on ``type(pipe)``, so a
    per-instance wrapper of ``__call__`` needs a per-instance subclass: ``apply`` swaps ``pipe.__class__``
    to a subclass with the same name, module and signature whose ``__call__`` opens a call state, runs the
    original ``__call__`` and finishes the run in ``finally`` (one ``handle.reports`` entry per call that
    ran the UNet); ``remove`` swaps the class back.  Nothing is stored on the pipeline instance.
  * **The schedule** is only known once the pipeline has set the scheduler's timesteps (and, for img2img,
    its begin index), so the ``Run`` is made at the first UNet call of a pipeline call: the schedule is the
    slice of ``pipe.scheduler.timesteps`` the loop iterates, ``[begin, begin + pipe.num_timesteps)``, with
    ``begin`` from ``scheduler.begin_index`` where the scheduler has one (set by img2img's ``strength`` and
    SDXL's ``denoising_start``), else ``len(timesteps) - num_timesteps`` (img2img on DDIM/PNDM, which have
    no begin index), else 0 (SDXL ``denoising_end``) -- each candidate only if its timestep is the one the
    first call carries.  Key steps count within each call, from that begin.
  * **Step placement is by position in the loop.**  During a pipeline call the scheduler's ``step`` is
    wrapped (an instance attribute with the original signature, so the pipelines' ``inspect`` checks for
    ``eta``/``generator`` see the same parameters; removed when the call ends, so a scheduler swapped in by
    the user is picked up at the next call).  Each ``scheduler.step`` ends one loop iteration: the position
    advances and the run starts a new sampler evaluation (``Run.begin_evaluation``), so a second UNet call
    in one iteration is a pass of its own.  A UNet call whose timestep is not the one its position expects
    (PLMS repeats a timestep value: the position tells them apart), or that comes after the schedule's end,
    runs the full UNet (counted as off-schedule).  The position belongs to the scheduler object: a deep copy of
    the scheduler carries its position, so Text2Video-Zero's loop in parts (steps 0..t1 on the first frame, a
    copy of the scheduler taken after the first part, steps t1..t0 again, then every frame from step t1 on the
    copy) places each call on its step; each part's calls are their own call slots (other shapes, other prompt
    embeddings), so no part is served another's features.
  * **Sigmas**: placement does not use them; the run gets the scheduler's own sigmas where they line up with
    its timesteps (SVD's EDM timesteps are 0.25 log sigma), else the VE sigma sqrt((1 - a)/a) of each step's
    timestep (``alphas_cumprod`` interpolated at fractional timesteps) plus a final 0, for its records.
  * **A step** is one UNet evaluation of the loop: schedulers of order 2 (Heun, KDPM2) and PNDM (whose
    timesteps have one more entry than ``num_inference_steps``) count each of their evaluations.
"""
from .unet import (FRAME_GROUPED_PROCESSORS, MIRRORED_VERSION, ROW_WISE_PROCESSORS, DiffusersCall, DiffusersUNetAdapter,
                   forward_arguments, make_call, row_timesteps, scheduler_bypass_reason, scheduler_forecast_off_reason,
                   unsupported_call_reason, unsupported_processor_reason)
from .pipeline import (ADAPTERS, DENOISER_ATTRS, HANDLE_ATTR, HOOK_NAME, SUPPORTED_PIPELINES, FasterDiffusionHandle,
                       adapter_class, apply, denoiser_attr, denoiser_of, schedule_sigmas, unsupported_unet_reason)
from .motion import MotionUNetAdapter
from .video import SpatioTemporalUNetAdapter, UNet3DAdapter
from .dit import DiTAdapter
from .onepass import one_pass

__all__ = ["apply", "one_pass", "FasterDiffusionHandle", "DiffusersUNetAdapter", "DiffusersCall", "forward_arguments",
           "make_call", "row_timesteps", "schedule_sigmas", "scheduler_bypass_reason", "scheduler_forecast_off_reason",
           "unsupported_call_reason", "unsupported_processor_reason", "unsupported_unet_reason", "HOOK_NAME",
           "HANDLE_ATTR", "SUPPORTED_PIPELINES", "MIRRORED_VERSION", "ROW_WISE_PROCESSORS", "ADAPTERS", "adapter_class",
           "MotionUNetAdapter", "SpatioTemporalUNetAdapter", "UNet3DAdapter", "FRAME_GROUPED_PROCESSORS", "DiTAdapter",
           "DENOISER_ATTRS", "denoiser_attr", "denoiser_of"]
