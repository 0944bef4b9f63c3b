"""FasterDiffusion engine: host-free planning for encoder propagation (arXiv 2312.09608).

Nothing in this package imports a host (ComfyUI, A1111, Forge, diffusers); host adapters live in
``patches/`` and call into it.  Only the standard library is needed here.
"""
from .strategy import (GRAMMAR, PAPER_KEYS_50, Plan, StrategyError, make_plan, parse_strategy,
                       predicted_cost_fraction)
from .schedule import match_step
from .injection import DEFAULT_ALPHA, DEFAULT_THRESHOLD, injection_scale, injection_steps
from .calibrate import choose_keys, keys_for_cost, plan_drift

__all__ = ["GRAMMAR", "PAPER_KEYS_50", "Plan", "StrategyError", "make_plan", "parse_strategy",
           "predicted_cost_fraction", "match_step", "DEFAULT_ALPHA", "DEFAULT_THRESHOLD", "injection_scale",
           "injection_steps", "choose_keys", "keys_for_cost", "plan_drift"]
