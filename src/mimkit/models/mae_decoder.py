"""MAE's light decoder: shared mask token, its own sin-cos positions, transformer blocks, pixel head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mimkit.layers import Block, init_vit_weights, resize_pos_embed, run_blocks, sincos_2d
from mimkit.masking import MaskSpec
from mimkit.models.vit import EncoderOutput


@dataclass
class DecoderOutput:
    """Decoder predictions and, on request, its token relations.

    Attributes:
        pred: (B, L, out_dim) one prediction per patch, raster order, prefix tokens removed.
        attentions: per block (B, heads, P + L, P + L) when requested; P is the decoder's
            ``num_prefix_tokens`` (1, the class token, for ViT encoders; 0 for ConvMAE).
        hidden_states: per block (B, P + L, D) when requested.
        aux_pred: (B, L, out_dim) a second prediction scored by the same target and added to the loss
            (BEiT v2's class-token head, :class:`~mimkit.models.cls_pretraining.ClassTokenPretraining`).
    """

    pred: Tensor
    attentions: list[Tensor] = field(default_factory=list)
    hidden_states: list[Tensor] = field(default_factory=list)
    aux_pred: Tensor | None = None


class MAEDecoder(nn.Module):
    """The MAE decoder.

    It keeps the encoder's class token with its own decoder position (MAE), or, built with
    ``num_prefix_tokens=0`` for an encoder without a class token (ConvMAE), runs on the L patch tokens
    only, with a sin-cos position table of L rows, as the ConvMAE code does.

    Args:
        grid: (grid_h, grid_w) patch grid.
        in_dim: encoder width.
        out_dim: prediction width per patch (``patch_size**2 * in_chans`` for pixels).
        embed_dim: decoder width.
        depth: decoder blocks.
        num_heads: decoder heads.
        mlp_ratio: MLP ratio.
        norm_eps: LayerNorm epsilon.
        num_prefix_tokens: 1 (the encoder's class token is kept, extra prefix tokens dropped) or 0 (the
            encoder has no prefix token).
        grad_checkpointing: recompute each block's activations in the backward pass instead of keeping them
            (activation checkpointing, training only): less memory for about one more forward pass.
    """

    needs_hidden_states = False  # the encoder's output tokens are all it reads

    def __init__(
        self,
        grid: tuple[int, int],
        in_dim: int,
        out_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        num_prefix_tokens: int = 1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f"num_prefix_tokens must be 0 or 1, got {num_prefix_tokens}")
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid, num_prefix_tokens)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, norm_eps=norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.pred = nn.Linear(embed_dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_vit_weights)

    def set_grid(self, grid: tuple[int, int]) -> None:
        """Decode another patch grid from now on (the encoder's after
        :meth:`~mimkit.models.vit.VisionTransformer.set_img_size`); the position table follows it."""
        old, self.grid = self.grid, tuple(grid)  # type: ignore[assignment]
        table = resize_pos_embed(self.pos_embed.data, old, self.grid, self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(table, requires_grad=False)

    def forward(
        self,
        enc: EncoderOutput,
        mask: MaskSpec,
        *,
        return_attn: bool = False,
        return_hidden: bool = False,
    ) -> DecoderOutput:
        """Predict every patch from the visible tokens plus one shared mask token per hidden patch."""
        prefix, visible, mask_tokens = self.embed_tokens(enc, mask)
        x = torch.cat([visible, mask_tokens], dim=1)  # (B, L, Dd) in [kept, hidden] order
        index = mask.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, index)  # (B, L, Dd) back to raster order
        x = torch.cat([prefix, x], dim=1) + self.pos_embed  # (B, P + L, Dd)
        out = DecoderOutput(pred=x)
        x = run_blocks(
            self.blocks,
            x,
            attentions=out.attentions if return_attn else None,
            hidden_states=out.hidden_states if return_hidden else None,
            checkpoint=self.grad_checkpointing and self.training,
        )
        out.pred = self.pred(self.norm(x))[:, self.num_prefix_tokens :]  # (B, L, out_dim)
        return out

    def embed_tokens(self, enc: EncoderOutput, mask: MaskSpec) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder's inputs before positions: its prefix tokens (B, P, Dd), the embedded visible tokens
        (B, Lk, Dd) in ``ids_keep`` order and one mask token per hidden patch (B, L - Lk, Dd)."""
        if (enc.num_prefix_tokens == 0) != (self.num_prefix_tokens == 0):
            raise ValueError(
                f"the encoder gives {enc.num_prefix_tokens} prefix token(s) but this decoder was built with "
                f"num_prefix_tokens={self.num_prefix_tokens}; build it with "
                f"num_prefix_tokens={min(enc.num_prefix_tokens, 1)}"
            )
        x = self.embed(enc.tokens)  # (B, P_enc + Lk, Dd)
        # Only the class token keeps its decoder position; extra prefix tokens are dropped (MAE has one).
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, enc.num_prefix_tokens :]
        batch, length = mask.ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, length - visible.shape[1], -1)  # (B, L - Lk, Dd)
        return prefix, visible, mask_tokens
