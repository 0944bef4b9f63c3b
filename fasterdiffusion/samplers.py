"""Which k-diffusion samplers encoder propagation can serve, and how (shared by every k-diffusion host:
ComfyUI, A1111, Forge).  Names are k-diffusion's ``sample_*`` function names without the prefix.

Found by sampling the digits test model with every stock sampler (tools/sampler_survey.py): the rest keep
their digit accuracy within 10 points under the paper strategy; the bypassed ones fell 20-70 points.  ComfyUI
0.33's exp_heun_2_x0 (deterministic) and exp_heun_2_x0_sde (SEEDS-2 with r=1) kept 100 % under ``uniform:2``
(docs/quality/sampler_survey_comfyui_0.33.md): served; the _sde one reuses features like every noisy sampler.
"""
from __future__ import annotations

RENOISING = ("{} re-noises the whole latent every step, so a decoder run on another latent's encoder "
             "features cannot stand in for a step")
STOCHASTIC_HIGH_ORDER = ("{} extrapolates from past predictions while adding fresh noise every step; "
                         "propagated steps throw that off (on the test model digits became unrecognisable)")

# sampler -> why every step of it runs in full
BYPASSED = {
    "lcm": RENOISING.format("lcm"),
    **{name: STOCHASTIC_HIGH_ORDER.format(name) for name in (
        "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "dpmpp_2m_sde_heun",
        "dpmpp_2m_sde_heun_gpu", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "sa_solver",
        "sa_solver_pece")},
}

# Samplers that choose their own evaluation points and never step on the given schedule (they take no
# sigmas): calibration cannot measure them, and A1111 does not pass them a schedule either.
OFF_SCHEDULE_ONLY = ("dpm_fast", "dpm_adaptive")

# Samplers whose model calls all land on the schedule, once per step, with the sampler's own latent tensor
# (so prior noise injection can act on the sampler's state in place).  lcm is listed because users pair it
# with LCM models, but it runs every step in full (BYPASSED).
STATE_PASSING = ("euler", "euler_ancestral", "ddim", "dpmpp_2m", "lms", "lcm")
# On the schedule too, but they call the model on a rescaled copy of their latent: no injection.
COPYING = ("uni_pc", "uni_pc_bh2")


def bypass_reason(sampler_function_name: str) -> str | None:
    """Why a sampler (its k-diffusion function name, with or without ``sample_``) runs in full, or None."""
    name = sampler_function_name.removeprefix("sample_")
    if name in BYPASSED:
        return f"the {BYPASSED[name]}: every step ran in full"
    return None


# Forecast propagation extrapolates the encoder features along the schedule.  Measured (tools/forecast_study.py,
# docs/quality/forecast_digits_steps.md, image PSNR to the full run on the digits model):
#  * where the latent gets fresh noise every step (ancestral and SDE samplers, ddpm, SEEDS) the features do not
#    move smoothly and forecasting lost to reusing them (docs/quality/sampler_survey.md: euler_ancestral 25.5 vs
#    29.9 dB, ddpm 25.5 vs 29.9, seeds_2 33.4 vs 33.8);
#  * multistep samplers (which extrapolate from their own past predictions) lost below 20 steps (dpmpp_2m at 12
#    steps, uniform:3: 13.5 dB forecast vs 20.6 reuse; uni_pc at 15, uniform:2: 14.6 vs 24.4) and won from 20
#    on (dpmpp_2m 20, uniform:3: 31.0 vs 22.2; uni_pc 20: 24.9 vs 14.7); one-step samplers (euler, ddim, their
#    cfg_pp forms) won at every step count from 8.
# Such runs reuse, with one line in their stats.  lms, deis, ipndm, res_multistep and gradient_estimation
# are multistep by construction and follow the measured ones.
NOISY_STEPS = ("ancestral", "sde", "ddpm", "seeds")
MULTISTEP = ("dpmpp_2m", "dpmpp_2m_cfg_pp", "unipc", "unipc_bh2", "uni_pc", "uni_pc_bh2", "lms", "deis", "ipndm",
             "ipndm_v", "res_multistep", "res_multistep_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
             "plms")
MULTISTEP_FORECAST_MIN_STEPS = 20


def forecast_off_reason(sampler_function_name: str, steps: int, shown_as: str | None = None) -> str | None:
    """Why forecast propagation runs as reuse for this sampler and step count, or None.  ``shown_as``: the
    name the reason gives (a host's own, e.g. a diffusers scheduler standing for a k-diffusion sampler)."""
    name = sampler_function_name.removeprefix("sample_")
    shown = shown_as or name
    if any(part in name for part in NOISY_STEPS):
        return f"{shown} adds fresh noise every step, where forecasting measured worse: features were reused"
    if name in MULTISTEP and steps < MULTISTEP_FORECAST_MIN_STEPS:
        return (f"{shown} is a multistep sampler, and below {MULTISTEP_FORECAST_MIN_STEPS} steps forecasting measured "
                f"worse with it: features were reused")
    return None
