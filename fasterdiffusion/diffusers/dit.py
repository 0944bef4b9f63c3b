"""The diffusers split of ``DiTTransformer2DModel`` (DiT, ``DiTPipeline``): ``DiTAdapter``, the transformer split
(``fasterdiffusion.transformer``) line for line with the forward of diffusers 0.42.1
(models/transformers/dit_transformer_2d.py), and what it refuses, with the reason.

The encoder is the patch embedding (``pos_embed``) and the first N transformer blocks; the features are the hidden
state after block N (``Features.mid``); the decoder is the remaining blocks, the final adaLN layer and the
unpatchify.  The paper splits DiT-XL/2 after 18 of its 28 blocks (``transformer.default_encoder_blocks``: the same
fraction of any depth); ``apply(pipe, encoder_blocks=N)`` picks another split.

Every block is an adaLN-Zero ``BasicTransformerBlock`` that embeds (timestep, class label) itself, with embedding
weights of its own, and the final layer embeds them again with block 0's: no embedding is shared, so the per-step
conditioning (``embed``) is the pair itself, one entry per row, which the blocks take as the forward gives it.  A
batched decoder call stacks the steps' rows step-major (every block treats rows independently: adaLN, self-attention
within a row's tokens, the MLP).  A learned-sigma model (out_channels = 2 x in_channels) only has a wider output.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from ..ldm import forward_outline
from ..runtime import Features, ModelCall, repeat_rows
from ..transformer import encoder_blocks as split_point
from .unet import AdapterBase, row_timesteps

# What the mirrored forward (diffusers 0.42.1) uses, by ``ldm.forward_outline``: a forward that uses anything else
# is another forward, and the model is refused with what it uses.
KNOWN = {"self": {"patch_size", "pos_embed", "transformer_blocks", "gradient_checkpointing",
                  "_gradient_checkpointing_func", "norm_out", "proj_out_1", "proj_out_2", "out_channels"},
         "calls": {"Transformer2DModelOutput"}, "keys": set()}


@functools.lru_cache(maxsize=None)
def forward_difference(forward) -> str | None:
    """What ``forward`` (a DiTTransformer2DModel.forward) uses that the mirror does not know, in words, or None."""
    try:
        outline = forward_outline(ast.parse(textwrap.dedent(inspect.getsource(forward))))
    except (OSError, TypeError, SyntaxError) as e:
        return f"its forward's source cannot be read ({e})"
    unknown = [f"{kind} {', '.join(sorted(outline[kind] - KNOWN[kind]))}" for kind in KNOWN
               if outline[kind] - KNOWN[kind]]
    if not unknown:
        return None
    return f"its forward uses {'; '.join(unknown)}, which the split (diffusers 0.42.1's) does not mirror"


def unsupported_reason(transformer) -> str | None:
    """Why the split cannot serve this model (its class or its forward), or None if it can."""
    if type(transformer) is not DiTTransformer2DModel:
        return (f"{type(transformer).__name__} is not diffusers' DiTTransformer2DModel "
                "(a subclass may change the forward)")
    return forward_difference(DiTTransformer2DModel.forward)


class Conditioning(NamedTuple):
    """What every block (and the final layer) embeds anew: the per-row timesteps and class labels."""
    timestep: torch.Tensor
    class_labels: torch.Tensor


class DiTAdapter(AdapterBase):
    """The runtime's UNetAdapter (and the pipeline glue's, see ``unet.DiffusersUNetAdapter``) for
    ``DiTTransformer2DModel``.  ``call.host`` is the class labels, one per row; ``self.unet`` (the base's name for
    the denoiser) is the transformer; ``self.blocks`` the number of encoder blocks."""
    unet_class = DiTTransformer2DModel

    def __init__(self, transformer, encoder_blocks: int = 0):
        super().__init__(transformer)
        depth = len(transformer.transformer_blocks)
        self.blocks = split_point(encoder_blocks, depth, type(transformer).__name__)

    @classmethod
    def for_run(cls, transformer, settings) -> "DiTAdapter":
        return cls(transformer, settings.encoder_blocks)

    # ---- the pipeline glue's side

    @staticmethod
    def unsupported_reason(transformer) -> str | None:
        return unsupported_reason(transformer)

    def call_reason(self, a: dict) -> str | None:
        labels, rows = a["class_labels"], a["hidden_states"].shape[0]
        if a["timestep"] is None or labels is None:
            return "a DiT call without timestep or class_labels (every block embeds both)"
        if not torch.is_tensor(labels) or labels.dim() != 1 or labels.shape[0] != rows:
            return (f"class_labels {tuple(getattr(labels, 'shape', ()))} are not one label per row of the "
                    f"{rows}-row sample")
        if a["cross_attention_kwargs"]:
            return (f"cross_attention_kwargs {sorted(a['cross_attention_kwargs'])} may depend on the step or the "
                    "batch layout")
        return None

    def conditioning(self, a: dict) -> tuple:
        return (a["class_labels"],)

    def make_call(self, a: dict, slot=()) -> ModelCall:
        sample = a["hidden_states"]
        return ModelCall(sample, row_timesteps(a["timestep"], sample), None, None, sample.dtype, slot,
                         a["class_labels"])

    def output(self, sample: torch.Tensor, return_dict: bool):
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    # ---- the runtime's side

    def embed(self, call: ModelCall) -> Conditioning:
        return Conditioning(call.timesteps, call.host)

    def _block(self, block, hidden_states: torch.Tensor, emb: Conditioning) -> torch.Tensor:
        """One block as the forward calls it (cross_attention_kwargs are refused, so None)."""
        t = self.unet
        if torch.is_grad_enabled() and t.gradient_checkpointing:
            return t._gradient_checkpointing_func(block, hidden_states, None, None, None, emb.timestep, None,
                                                  emb.class_labels)
        return block(hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                     timestep=emb.timestep, cross_attention_kwargs=None, class_labels=emb.class_labels)

    def encode(self, call: ModelCall, emb: Conditioning) -> Features:
        t = self.unet
        # 1. Input (the forward's height and width here are unused: the unpatchify reads the token count)
        hidden_states = t.pos_embed(call.x)
        # 2. Blocks, the encoder's
        for block in t.transformer_blocks[:self.blocks]:
            hidden_states = self._block(block, hidden_states, emb)
        return Features([], hidden_states)

    def decode(self, call: ModelCall, features: Features, emb: Conditioning) -> torch.Tensor:
        t = self.unet
        hidden_states = features.mid
        # 2. Blocks, the decoder's (each returns a new tensor: the cached features stay as they are)
        for block in t.transformer_blocks[self.blocks:]:
            hidden_states = self._block(block, hidden_states, emb)
        # 3. Output
        conditioning = t.transformer_blocks[0].norm1.emb(emb.timestep, emb.class_labels,
                                                         hidden_dtype=hidden_states.dtype)
        shift, scale = t.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = t.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = t.proj_out_2(hidden_states)
        # unpatchify
        height = width = int(hidden_states.shape[1] ** 0.5)
        hidden_states = hidden_states.reshape(shape=(-1, height, width, t.patch_size, t.patch_size, t.out_channels))
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        return hidden_states.reshape(shape=(-1, t.out_channels, height * t.patch_size, width * t.patch_size))

    def tile(self, call: ModelCall, n: int, timesteps: torch.Tensor, sigmas) -> ModelCall:
        return replace(call, x=None, timesteps=timesteps, sigmas=sigmas, host=repeat_rows(call.host, n))

    def own_step_reason(self, call: ModelCall) -> str | None:
        return None
