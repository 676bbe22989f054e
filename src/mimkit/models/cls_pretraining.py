"""BEiT v2's class-token pretraining, as a decoder wrapper in the MAE frame."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mimkit.masking import MaskSpec
from mimkit.models.mae_decoder import DecoderOutput, MAEDecoder
from mimkit.models.vit import EncoderOutput


class ClassTokenPretraining(nn.Module):
    """A decoder plus BEiT v2's class-token head (Peng et al. 2022, Sec. 3.2), which must predict the
    hidden patches again from the final class token and early-layer patch tokens.

    BEiT v2 concatenates the last layer's class token with the patch tokens of layer ``l`` and runs two
    more blocks, so the class token must gather what the later layers would otherwise carry. Here the
    encoder sees the visible patches only (MAE), so the head is a shallow :class:`MAEDecoder`: its input
    is ``[final class token, visible tokens of block layer]``, hidden patches are its mask tokens, and its
    prediction layer is the main decoder's (BEiT v2 shares the head). Its predictions come back as
    ``aux_pred`` and the model adds their loss under the same target to the main one.

    Args:
        decoder: the main decoder (an :class:`MAEDecoder`; its width, heads and head are shared).
        in_dim: the encoder's width.
        layer: index of the encoder block whose output patch tokens the head sees (BEiT v2: the 9th of 12,
            index 8).
        depth: blocks of the head (BEiT v2: 2).
        num_heads, mlp_ratio: of the head's blocks (the main decoder's).
    """

    needs_hidden_states = True  # the model asks the encoder for every block's output

    def __init__(
        self,
        decoder: MAEDecoder,
        in_dim: int,
        layer: int,
        depth: int = 2,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if decoder.num_prefix_tokens != 1:
            raise ValueError("class-token pretraining needs an encoder with a class token (not ConvMAE)")
        self.decoder = decoder
        self.layer = layer
        self.head = MAEDecoder(
            decoder.grid,
            in_dim=in_dim,
            out_dim=decoder.pred.out_features,
            embed_dim=decoder.embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            norm_eps=decoder.norm.eps,
        )
        self.head.pred = decoder.pred  # one prediction layer for both, as BEiT v2's shared LM head

    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.blocks

    @property
    def num_prefix_tokens(self) -> int:
        return self.decoder.num_prefix_tokens

    def forward(
        self, enc: EncoderOutput, mask: MaskSpec, *, return_attn: bool = False, return_hidden: bool = False
    ) -> DecoderOutput:
        """The main decoder's output, with the class-token head's predictions as ``aux_pred`` (B, L, out_dim)
        when the encoder's block outputs are there."""
        out = self.decoder(enc, mask, return_attn=return_attn, return_hidden=return_hidden)
        if len(enc.hidden_states) > self.layer:
            early: Tensor = enc.hidden_states[self.layer]  # (B, 1 + Lk, D) before the final norm
            tokens = torch.cat([enc.tokens[:, :1], early[:, 1:]], dim=1)  # (B, 1 + Lk, D): final class token first
            out.aux_pred = self.head(EncoderOutput(tokens=tokens, num_prefix_tokens=1, grid=enc.grid), mask).pred
        return out
