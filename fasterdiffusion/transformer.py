"""The transformer split (DiT, Flux, Wan): the paper's encoder propagation on a stack of transformer blocks.

The "encoder" is the input embedding and the first N blocks, run at key steps only; its features are the hidden
state(s) after block N (``Features.mid``; a second stream, Flux's text tokens, in ``Features.skips``).  The
"decoder" is the remaining blocks and the final layer, run at every step with that step's own conditioning (the
timestep / guidance / class modulation vector), batched over a group like a UNet's decoders.  The paper splits
DiT-XL/2 after 18 of its 28 blocks (Table 3).  Adapters implement the runtime's ``UNetAdapter`` protocol; this
module only decides N.
"""
from __future__ import annotations

PAPER_FRACTION = 18 / 28     # DiT-XL/2: the first 18 of 28 blocks are the encoder (arXiv 2312.09608, §4)


def default_encoder_blocks(depth: int, fraction: float = PAPER_FRACTION) -> int:
    """The default split of a ``depth``-block model: ``round(fraction * depth)``, at least 1 and at most depth - 1."""
    return min(max(1, round(fraction * depth)), depth - 1)


def encoder_blocks(setting: int, depth: int, model: str, fraction: float = PAPER_FRACTION) -> int:
    """The number of encoder blocks a run of a ``depth``-block ``model`` uses: ``setting``, or for 0 the model's
    default (``default_encoder_blocks(depth, fraction)``).  Raises ValueError naming the setting and the fix when it
    leaves no decoder block (or the model has fewer than two blocks to split)."""
    if depth < 2:
        raise ValueError(f"FasterDiffusion: {model} has {depth} transformer block(s); the split needs at least 2")
    default = default_encoder_blocks(depth, fraction)
    n = int(setting) or default
    if not 1 <= n < depth:
        raise ValueError(f"FasterDiffusion: encoder_blocks {n} does not split {model} ({depth} blocks): set it to "
                         f"1..{depth - 1}, or 0 for the model's default ({default})")
    return n
