"""Every FasterDiffusion setting, one name each, the same on every host: the ComfyUI nodes' inputs, the A1111/Forge
accordion (and its infotext and API arguments) and diffusers' ``apply`` all make one ``Settings`` with
``Settings.of``, which parses the strategy text once and checks the rest; the run and every host read that object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .forecast import DEFAULT_PROPAGATION, Forecast, forecast_settings
from .injection import DEFAULT_THRESHOLD
from .strategy import Strategy, parse_strategy


@dataclass(frozen=True)
class Settings:
    """Immutable, shared by every run made from it.

    strategy            which steps are key steps (run the encoder), parsed
    parallel            a key step runs its group's decoders as one batch
    max_decoder_batch   most rows in one batched decoder call; 0 = no cap
    propagation         what non-key decoders get: "forecast", "reuse" (the paper's), or a ``Forecast``
    controlnet_reuse    non-key steps reuse the key step's ControlNet residuals (ComfyUI, diffusers)
    injection_alpha     prior noise injection strength (0 = off; the sampler nodes, A1111/Forge)
    injection_threshold inject at steps whose model timestep is below this
    encoder_blocks      transformers (DiT, Flux, Wan): how many blocks form the encoder; 0 = the model's default
    """
    strategy: Strategy
    parallel: bool = True
    max_decoder_batch: int = 32
    propagation: str | Forecast = DEFAULT_PROPAGATION
    controlnet_reuse: bool = True
    injection_alpha: float = 0.0
    injection_threshold: float = DEFAULT_THRESHOLD
    encoder_blocks: int = 0

    @classmethod
    def of(cls, strategy: str | Strategy = "paper", parallel: bool = True, max_decoder_batch: int = 32,
           propagation: str | Forecast = DEFAULT_PROPAGATION, controlnet_reuse: bool = True,
           injection_alpha: float = 0.0, injection_threshold: float = DEFAULT_THRESHOLD,
           encoder_blocks: int = 0) -> "Settings":
        """Settings from a user's values: a bad strategy raises StrategyError (with the grammar), any other bad
        value ValueError naming the setting and what it takes."""
        if isinstance(strategy, str):
            strategy = parse_strategy(strategy)
        if int(max_decoder_batch) < 0:
            raise ValueError(f"FasterDiffusion: max_decoder_batch must be >= 0 (0 = no cap), not {max_decoder_batch}")
        forecast_settings(propagation)       # raises ValueError naming the choices
        if not (math.isfinite(float(injection_alpha)) and float(injection_alpha) >= 0):
            raise ValueError(f"FasterDiffusion: injection_alpha must be >= 0 (0 = off), not {injection_alpha}")
        if int(encoder_blocks) < 0:
            raise ValueError(f"FasterDiffusion: encoder_blocks must be >= 0 (0 = the model's default), not {encoder_blocks}")
        return cls(strategy, bool(parallel), int(max_decoder_batch), propagation, bool(controlnet_reuse),
                   float(injection_alpha), float(injection_threshold), int(encoder_blocks))

    @property
    def forecast(self) -> Forecast:
        """``propagation`` as the run uses it (REUSE for "reuse")."""
        return forecast_settings(self.propagation)
