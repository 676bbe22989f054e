"""The FC head of BEiT, MaskDistill and BEiT v2: one linear layer on the encoder's output at each patch."""

from __future__ import annotations

from torch import nn

from mimkit.layers import init_vit_weights
from mimkit.masking import MaskSpec
from mimkit.models.mae_decoder import DecoderOutput
from mimkit.models.vit import EncoderOutput


class LinearHead(nn.Module):
    """Predict each patch's target from the encoder's output token at that patch with one linear layer.

    MaskDistill's unified view of masked image modeling (Peng et al. 2022) writes BEiT, MaskDistill and
    BEiT v2 as an encoder that sees every patch (hidden ones as the mask embedding, see
    :class:`~mimkit.models.vit.VisionTransformer` with ``encoder_sees="all"``) followed by this FC head, where
    MAE has a transformer decoder on visible tokens plus mask tokens. The head has no tokens of its own, so
    it needs the encoder's output at every patch: ``embed_dim * out_dim + out_dim`` parameters in all.

    Args:
        in_dim: the encoder's width.
        out_dim: the target's width per patch.
        num_prefix_tokens: the encoder's prefix tokens, dropped before the prediction.
    """

    needs_hidden_states = False

    def __init__(self, in_dim: int, out_dim: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.pred = nn.Linear(in_dim, out_dim)
        self.apply(init_vit_weights)

    @property
    def blocks(self) -> nn.ModuleList:
        """No blocks: analyses of decoder attention do not apply to an FC head."""
        return nn.ModuleList()

    def forward(
        self, enc: EncoderOutput, mask: MaskSpec, *, return_attn: bool = False, return_hidden: bool = False
    ) -> DecoderOutput:
        """(B, P + L, D) encoder tokens -> (B, L, out_dim) predictions in raster order.

        Raises:
            ValueError: the encoder gave fewer than the L patch tokens of ``mask`` (it saw the visible ones
                only, as MAE's encoder does).
        """
        if return_attn:
            raise ValueError("the linear head has no attention; analyses of decoder attention need model.head=mae")
        tokens = enc.patch_tokens  # (B, N, D)
        if tokens.shape[1] != mask.num_patches:
            raise ValueError(
                f"the linear head predicts from the encoder's output at every patch, but the encoder gave "
                f"{tokens.shape[1]} of {mask.num_patches} patch tokens; build the encoder with encoder_sees='all' "
                "(model.encoder_sees=all)"
            )
        return DecoderOutput(pred=self.pred(tokens))  # (B, L, out_dim)
