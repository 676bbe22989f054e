"""BEiT v2's class-token pretraining, as a decoder wrapper in the MAE frame."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mimkit.layers import Block, init_vit_weights, run_blocks
from mimkit.masking import MaskSpec
from mimkit.models.linear_head import LinearHead
from mimkit.models.mae_decoder import DecoderOutput, MAEDecoder
from mimkit.models.vit import EncoderOutput


class ClassTokenBlocks(nn.Module):
    """BEiT v2's class-token head on a BEiT-style encoder: ``depth`` transformer blocks at the encoder's width
    on ``[final class token, layer-l patch tokens]`` (every patch, hidden ones as the mask embedding), a
    LayerNorm, and the main head's prediction layer (shared, as BEiT v2's LM head).

    Args:
        pred: the shared prediction layer (the :class:`~mimkit.models.linear_head.LinearHead`'s).
        dim: the encoder's width.
        depth, num_heads, mlp_ratio, norm_eps: of the blocks (BEiT v2: 2 blocks, the encoder's heads).
    """

    def __init__(
        self, pred: nn.Linear, dim: int, depth: int = 2, num_heads: int = 12, mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
    ) -> None:  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, norm_eps=norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.apply(init_vit_weights)
        self.pred = pred  # assigned after the init: the shared layer keeps its own weights

    def forward(self, enc: EncoderOutput, mask: MaskSpec) -> DecoderOutput:
        """(B, 1 + L, D) -> predictions (B, L, out_dim) in raster order."""
        x = run_blocks(self.blocks, enc.tokens)  # (B, 1 + L, D)
        return DecoderOutput(pred=self.pred(self.norm(x))[:, enc.num_prefix_tokens :])


class ClassTokenPretraining(nn.Module):
    """A decoder plus BEiT v2's class-token head (Peng et al. 2022, Sec. 3.2), which must predict the
    hidden patches again from the final class token and early-layer patch tokens.

    BEiT v2 concatenates the last layer's class token with the patch tokens of layer ``l`` and runs two
    more blocks, so the class token must gather what the later layers would otherwise carry. With BEiT v2's
    own encoder (every patch, ``encoder_sees="all"``) and FC head (:class:`~mimkit.models.linear_head.LinearHead`)
    the head is :class:`ClassTokenBlocks`, as in BEiT v2. With an MAE encoder (visible patches only) and
    decoder, the head is a shallow :class:`MAEDecoder`: its input is ``[final class token, visible tokens of
    block layer]`` and hidden patches are its mask tokens. Either way its prediction layer is the main head's
    (BEiT v2 shares it). Its predictions come back as ``aux_pred`` and the model adds their loss under the
    same target to the main one.

    Args:
        decoder: the main head: an :class:`MAEDecoder` (its width, heads and prediction layer are shared) or a
            :class:`~mimkit.models.linear_head.LinearHead` (its prediction layer is shared).
        in_dim: the encoder's width.
        layer: index of the encoder block whose output patch tokens the head sees (BEiT v2: the 9th of 12,
            index 8).
        depth: blocks of the head (BEiT v2: 2).
        num_heads, mlp_ratio: of the head's blocks (the main decoder's, or the encoder's with a linear head).
    """

    needs_hidden_states = True  # the model asks the encoder for every block's output

    def __init__(
        self,
        decoder: MAEDecoder | LinearHead,
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
        self.head: MAEDecoder | ClassTokenBlocks
        if isinstance(decoder, LinearHead):
            self.head = ClassTokenBlocks(decoder.pred, in_dim, depth, num_heads, mlp_ratio)
            return
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
        return self.decoder.blocks  # type: ignore[return-value]

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
            early: Tensor = enc.hidden_states[self.layer]  # (B, 1 + N, D) before the final norm
            tokens = torch.cat([enc.tokens[:, :1], early[:, 1:]], dim=1)  # (B, 1 + N, D): final class token first
            out.aux_pred = self.head(EncoderOutput(tokens=tokens, num_prefix_tokens=1, grid=enc.grid), mask).pred
        return out
