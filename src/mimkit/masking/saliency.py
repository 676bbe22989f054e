"""How much attention each patch draws: what attention-guided masking reads from an encoder or a teacher."""

from __future__ import annotations

from torch import Tensor


def patch_saliency(attention: Tensor, num_prefix_tokens: int) -> Tensor:
    """How much attention each patch draws, from head-averaged weights (B, P + N, P + N) -> (B, N).

    With a class token (P > 0) it is the class token's attention to the patches, as in DINO's maps and
    the attention-guided maskers of AttMask/SemMAE; without one (ConvMAE) it is the attention each
    patch receives averaged over all queries.
    """
    if num_prefix_tokens > 0:
        return attention[:, 0, num_prefix_tokens:]  # (B, N)
    return attention.mean(dim=1)  # (B, N)
