"""FasterDiffusion engine: encoder propagation and parallel decoders (arXiv 2312.09608), for every host.

Planning (``strategy``, ``calibrate``, ``schedule``, ``samplers``, ``settings``) is plain Python; the method
itself (``runtime``: one run's state, the per-call decision and its lifecycle; ``forecast``; ``injection``;
``drift``; ``onepass``) works on torch tensors through a small UNet-adapter protocol.  ``ldm`` is the split of the
ldm-family ``UNetModel`` (ComfyUI, Forge Classic), looked up in the UNet's own module, so nothing in this package
imports a host.  Host glue lives in ``patches/comfy/`` and ``patches/webui/``; the diffusers integration, the one a
``pip install`` user imports, is ``fasterdiffusion.diffusers`` (imported only when asked for).
"""
from .strategy import (GRAMMAR, PAPER_KEYS_50, Plan, StrategyError, make_plan, parse_strategy,
                       predicted_cost_fraction, predicted_gpu_fraction)
from .schedule import match_step
from .injection import DEFAULT_ALPHA, DEFAULT_THRESHOLD, injection_scale, injection_steps
from .calibrate import choose_keys, keys_for_cost, keys_for_gpu_time, plan_drift, plans_by_count

__all__ = ["GRAMMAR", "PAPER_KEYS_50", "Plan", "StrategyError", "make_plan", "parse_strategy",
           "predicted_cost_fraction", "match_step", "DEFAULT_ALPHA", "DEFAULT_THRESHOLD", "injection_scale",
           "injection_steps", "choose_keys", "keys_for_cost", "keys_for_gpu_time", "plan_drift", "plans_by_count",
           "predicted_gpu_fraction"]
