"""FasterDiffusion Apply: MODEL -> MODEL with encoder propagation (arXiv 2312.09608)."""
from __future__ import annotations

from ..fasterdiffusion import StrategyError, parse_strategy
from ..fasterdiffusion.forecast import DEFAULT_PROPAGATION, PROPAGATIONS
from ..fasterdiffusion.settings import Settings
from ..patches.comfy.unet import apply_faster_diffusion
from .comfy_v3 import Choice, io, node_id

CATEGORY = "sampling/faster_diffusion"


def validate_strategy(strategy):
    """ComfyUI's queue-time check: True, or the error text (linked inputs arrive as None; checked when run).

    The nodes' validate_inputs name only ``strategy``: ComfyUI skips its own min/max/list checks for every
    input a validate_inputs names (for all of them if it takes ``**kwargs``), so it still checks the rest."""
    if isinstance(strategy, str):
        try:
            parse_strategy(strategy)
        except StrategyError as e:
            return str(e)
    return True


def controlnet_reuse_input():
    """Optional and last, so that workflows saved without it load with the default."""
    return io.Boolean.Input("controlnet_reuse", default=True, optional=True, tooltip=
            "With a ControlNet / T2I-Adapter / Control-LoRA: at the steps that skip the encoder, reuse the residuals "
            "the ControlNet gave at the group's key step instead of running it again (the paper's scheme; the "
            "ControlNet then runs only at key steps and the group's decoders batch again). Start/end percent still "
            "apply per step. Off: the ControlNet runs every step and those decoders run one step at a time.")


def propagation_input(tooltip=None):
    """Optional and last, so that workflows saved without it load with the default."""
    return Choice("propagation", options=list(PROPAGATIONS), default=DEFAULT_PROPAGATION, optional=True, tooltip=tooltip or
            "What the decoder gets at the steps that skip the encoder. 'forecast': the encoder features "
            "extrapolated from the last two key steps (same cost, much closer to the full run: +5-12 dB on the "
            "test models at equal speed); 'reuse': the last key step's features unchanged (the paper's). Ancestral "
            "and SDE samplers, multistep samplers below 20 steps and SelfAttentionGuidance reuse either way "
            "(forecasting measured worse there; the stats say so).")


def encoder_blocks_input():
    """Optional and last, so that workflows saved without it load with the default."""
    return io.Int.Input("encoder_blocks", default=0, min=0, max=200, optional=True, tooltip=
            "Transformers only (Flux, Wan; UNets ignore it): how many of the model's transformer blocks form the "
            "encoder that key steps run and other steps skip (Flux counts its double blocks, then its single ones). "
            "More blocks skipped = faster. 0 = the model's default: Flux 9 of every 10 blocks (51 of Flux.1's 57; measured "
            "best on a trained Flux-shaped model), Wan the paper's DiT split, 18 of every 28 (26 of 40).")


def strategy_inputs():
    """strategy, parallel, max_decoder_batch: the settings every encoder-propagation node shares, in this order."""
    return [
        io.String.Input("strategy", default="paper", multiline=False, tooltip=
            "Which sampling steps are key steps (run the encoder). 'paper' = 0,1,2,3,5,10,15,25,35 "
            "at 50 steps (cut at the step count when fewer); 'uniform:K' = every K-th step "
            "(uniform:4 suits community models); 'if1'/'if2'/'if3' = DeepFloyd-IF's stage I/II/III rules of "
            "the official code (at 100/50/75 steps; moved proportionally to other step counts); "
            "'all' = every step (identical to no patch); "
            "or a list of 0-based steps like 0,1,2,3,5,10. Steps count within each sampler run."),
        io.Boolean.Input("parallel", default=True, tooltip=
            "Run the decoders of a key step's whole group as one batch (exact; the main GPU speed-up). "
            "Off: one decoder call per step (less memory). With a ControlNet it needs controlnet_reuse "
            "(fresh residuals change every step)."),
        io.Int.Input("max_decoder_batch", default=32, min=0, max=4096, tooltip=
            "Memory cap: most samples in one batched decoder call (a group of 15 steps with CFG is "
            "30). Larger groups are split into several calls, with identical results. 0 = no cap."),
    ]


class FasterDiffusionApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FasterDiffusionApply",
            display_name="FasterDiffusion Apply",
            category=CATEGORY,
            description=(
                "Encoder propagation: at key steps the whole UNet runs and its encoder features are cached; "
                "at the other steps only the decoder runs, on the cached features with the step's own timestep. "
                "With 'parallel' the decoders of a key step's whole group run as one batch, which is where the "
                "GPU speed-up is. Works on SD1.x, SD2.x (eps and v-prediction), SDXL and SVD UNets, and on the "
                "Flux and Wan 2.x transformers (their first encoder_blocks blocks are the encoder); any other model "
                "passes through unchanged with a log line. Samplers that evaluate between schedule points (dpm_2, "
                "dpmpp_2s_ancestral, dpmpp_sde) run those extra evaluations in full. Stats of each run are "
                "logged and shown on this node."),
            inputs=[io.Model.Input("model", tooltip="The diffusion model to speed up (an SD1.x, SD2.x, SDXL or SVD "
                                                    "UNet, or a Flux or Wan 2.x transformer)."),
                    *strategy_inputs(), controlnet_reuse_input(), propagation_input(), encoder_blocks_input()],
            outputs=[io.Model.Output(tooltip="The model with FasterDiffusion hooked in (a clone; the input model "
                                             "is unchanged).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, strategy=None):
        return validate_strategy(strategy)

    @classmethod
    def execute(cls, model, strategy="paper", parallel=True, max_decoder_batch=32,
                controlnet_reuse=True, propagation=DEFAULT_PROPAGATION, encoder_blocks=0) -> io.NodeOutput:
        settings = Settings.of(strategy, parallel, max_decoder_batch, propagation, controlnet_reuse,
                               encoder_blocks=encoder_blocks)
        patched, _ = apply_faster_diffusion(model, settings, node_id(cls))
        return io.NodeOutput(patched)
