"""ConvMAE's hybrid convolution-transformer encoder (Gao et al., NeurIPS 2022), masked or not."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mimkit.layers import (
    Block,
    ConvBlock,
    ConvPatchEmbed,
    check_patch_grid,
    init_vit_weights,
    masked,
    resize_pos_embed,
    run_blocks,
    sincos_2d,
)
from mimkit.masking import MaskSpec
from mimkit.models.vit import EncoderOutput


def _three(values: Sequence[int], what: str) -> tuple[int, int, int]:
    values = tuple(int(value) for value in values)
    if len(values) != 3:
        raise ValueError(f"{what} needs one value per stage (3), got {values}")
    return values[0], values[1], values[2]


class ConvViT(nn.Module):
    """ConvMAE encoder: two masked convolution stages, then a transformer on the visible 1/16 tokens.

    Stage 1 (``patch_embed1``, ``blocks1``) and stage 2 (``patch_embed2``, ``blocks2``) are
    :class:`~mimkit.layers.ConvBlock` stacks at strides ``p1`` and ``p1 * p2``; stage 3 (``patch_embed3``,
    the linear ``patch_embed4``, a fixed 2-D sin-cos ``pos_embed``, ``blocks3``, ``norm``) is a ViT on the
    grid of stride ``p1 * p2 * p3`` (:attr:`grid`, the grid masks are drawn on). There is no class token.

    Given a mask, hidden positions are zeroed before every convolution and at the end of each stage, so
    nothing computed from hidden pixels reaches a visible output; stage 3 runs on the visible tokens only.
    A mask drawn on the stage-3 grid (ConvMAE's "block-wise" masking: each hidden token hides a block of
    the input) is upsampled to stages 2 and 1; a mask drawn on the stage-1 grid (``MaskSpec.fine_mask``)
    is used there as it is and a stage-2 cell is visible when any of its stage-1 cells is. With ``fuse``,
    while pretraining (masked), the stage-1 and stage-2 maps pass strided convolutions
    (``stage1_output_decode``, ``stage2_output_decode``) to the stage-3 grid and width, and the visible
    ones are added to the stage-3 tokens after the last block and before the final norm: the multi-scale
    decoder input of the ConvMAE code. Without a mask (evaluation, probes, fine-tuning, dense transfer)
    the same stages run on all positions and the fusion is left out, as in ConvMAE's fine-tuning and
    detection models, which use the stage maps themselves.
    Parameter names follow the ConvMAE code.

    Args:
        img_size: input side.
        patch_sizes: (p1, p2, p3) downsampling of each stage's patch embedding (ConvMAE: (4, 2, 2)).
        in_chans: input channels.
        embed_dims: channels of the three stages (ConvMAE-Base: (256, 384, 768)).
        depths: blocks per stage (ConvMAE-Base: (2, 2, 11)).
        num_heads: attention heads of stage 3.
        mlp_ratio: MLP hidden width / width, all stages.
        qkv_bias: bias on stage-3 qkv projections.
        kernel_size: side of the depthwise convolution of the convolution blocks.
        fuse: add the stage-1 and stage-2 features to the output tokens handed to the decoder while
            pretraining (multi-scale fusion; never in the unmasked forward).
        drop_path_rate: stochastic depth, rising linearly over all blocks of all stages.
        norm_eps: LayerNorm epsilon.
        grad_checkpointing: recompute each transformer (stage-3) block's activations in the backward pass
            instead of keeping them (activation checkpointing, training only).
    """

    num_prefix_tokens = 0
    encoder_sees = "visible"  # masked convolution: the transformer sees the visible tokens only

    def __init__(
        self,
        img_size: int = 224,
        patch_sizes: Sequence[int] = (4, 2, 2),
        in_chans: int = 3,
        embed_dims: Sequence[int] = (256, 384, 768),
        depths: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_size: int = 5,
        fuse: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.patch_sizes = _three(patch_sizes, "patch_sizes")
        self.embed_dims = _three(embed_dims, "embed_dims")
        self.depths = _three(depths, "depths")
        self.patch_size = math.prod(self.patch_sizes)  # total stride: the side of a stage-3 patch in pixels
        self.grid = check_patch_grid(img_size, self.patch_size)
        self.img_size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.in_chans = in_chans
        self.embed_dim = self.embed_dims[2]
        self.fuse = fuse
        self.grad_checkpointing = grad_checkpointing
        # Upsampling factor from the stage-3 grid to the map of each stage.
        self.stage_factors = (self.patch_sizes[1] * self.patch_sizes[2], self.patch_sizes[2], 1)
        dim1, dim2, dim3 = self.embed_dims
        num_blocks = sum(self.depths)
        rates = iter(drop_path_rate * index / max(num_blocks - 1, 1) for index in range(num_blocks))  # as linspace

        self.patch_embed1 = ConvPatchEmbed(self.patch_sizes[0], in_chans, dim1, norm_eps)
        self.blocks1 = nn.ModuleList(
            ConvBlock(dim1, mlp_ratio, kernel_size, next(rates), norm_eps) for _ in range(self.depths[0])
        )
        self.patch_embed2 = ConvPatchEmbed(self.patch_sizes[1], dim1, dim2, norm_eps)
        self.blocks2 = nn.ModuleList(
            ConvBlock(dim2, mlp_ratio, kernel_size, next(rates), norm_eps) for _ in range(self.depths[1])
        )
        self.patch_embed3 = ConvPatchEmbed(self.patch_sizes[2], dim2, dim3, norm_eps)
        self.patch_embed4 = nn.Linear(dim3, dim3)
        self.pos_embed = nn.Parameter(sincos_2d(dim3, self.grid)[None], requires_grad=False)  # (1, L, D)
        self.blocks3 = nn.ModuleList(
            Block(dim3, num_heads, mlp_ratio, qkv_bias, drop_path=next(rates), norm_eps=norm_eps)
            for _ in range(self.depths[2])
        )
        self.norm = nn.LayerNorm(dim3, eps=norm_eps)
        if fuse:
            factor1, factor2, _ = self.stage_factors
            self.stage1_output_decode = nn.Conv2d(dim1, dim3, kernel_size=factor1, stride=factor1)
            self.stage2_output_decode = nn.Conv2d(dim2, dim3, kernel_size=factor2, stride=factor2)
        self.apply(init_vit_weights)

    def fusion_layers(self) -> list[nn.Module]:
        """The multi-scale fusion convolutions (empty without ``fuse``): they feed only the pretraining
        decoder, so downstream models freeze them (every trainable parameter then gets a gradient)."""
        return [self.stage1_output_decode, self.stage2_output_decode] if self.fuse else []

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (stage 3), where analyses and guided maskers look."""
        return self.blocks3

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Take images of another size (a multiple of the total stride) from now on: the stage-3 grid
        changes and the position table follows it (:func:`~mimkit.layers.resize_pos_embed`); the
        convolution stages do not depend on the size."""
        grid = self.grid
        self.grid = check_patch_grid(img_size, self.patch_size)
        self.img_size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, grid, self.grid), requires_grad=False)

    def set_drop_path_rate(self, drop_path_rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first block of stage 1 to ``drop_path_rate`` at the
        last block of stage 3 (as at construction)."""
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        blocks = [*self.blocks1, *self.blocks2, *self.blocks3]
        rates = torch.linspace(0, drop_path_rate, len(blocks), device="cpu").tolist()
        for block, rate in zip(blocks, rates, strict=True):
            block.drop_path.drop_prob = rate  # type: ignore[union-attr]

    def visibility_maps(self, mask: MaskSpec) -> tuple[Tensor, Tensor]:
        """The mask at stages 1 and 2 as multipliers: each (B, 1, H_i, W_i), 1.0 = visible (see
        :meth:`~mimkit.masking.MaskSpec.hidden_map`: the stage-3 mask upsampled, or the stage-1 mask and
        its reduction to stage 2)."""
        visible = [
            (~mask.hidden_map(self.grid, factor)).float()  # (B, 1, grid_h * f, grid_w * f)
            for factor in self.stage_factors[:2]
        ]
        return visible[0], visible[1]

    def _embed(self, images: Tensor, mask: MaskSpec | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Stages 1 and 2 and the stage-3 embedding: the stage-1 map (B, C1, H1, W1), the stage-2 map
        (B, C2, H2, W2), the tokens the first transformer block sees (B, N, D) and, with ``fuse`` and a
        mask, the multi-scale residual (B, N, D) added after the last block (else None); N = visible or
        all L."""
        if images.shape[-2:] != self.img_size:
            raise ValueError(
                f"expected images of size {self.img_size}, got {tuple(images.shape[-2:])}; "
                "resize them or build the model with this img_size"
            )
        visible1, visible2 = self.visibility_maps(mask) if mask is not None else (None, None)
        x1 = self.patch_embed1(images)  # (B, C1, H1, W1)
        for block in self.blocks1:
            x1 = block(x1, visible1)
        x1 = masked(x1, visible1)
        x2 = self.patch_embed2(x1)  # (B, C2, H2, W2)
        for block in self.blocks2:
            x2 = block(x2, visible2)
        x2 = masked(x2, visible2)
        x = self.patch_embed3(x2).flatten(2).transpose(1, 2)  # (B, L, D)
        x = self.patch_embed4(x) + self.pos_embed  # (B, L, D)
        if mask is None:  # downstream: the stage maps themselves, no fusion
            return x1, x2, x, None
        x = mask.gather_visible(x)  # (B, Lk, D)
        fused: Tensor | None = None
        if self.fuse:  # the pretraining decoder's multi-scale input
            fused = self.stage1_output_decode(x1).flatten(2).transpose(1, 2)  # (B, L, D)
            fused = fused + self.stage2_output_decode(x2).flatten(2).transpose(1, 2)  # (B, L, D)
            fused = mask.gather_visible(fused)  # (B, Lk, D)
        return x1, x2, x, fused

    def stem(self, images: Tensor) -> Tensor:
        """What runs before the transformer blocks, for callers that run the blocks themselves (partial
        fine-tuning), on unmasked images: the tokens the first block sees (B, L, D)."""
        return self._embed(images, None)[2]

    def forward(
        self,
        images: Tensor,
        mask: MaskSpec | None = None,
        *,
        return_attn: bool = False,
        return_hidden: bool = False,
    ) -> EncoderOutput:
        """Encode images, letting only visible regions shape the output when ``mask`` is given.

        Args:
            images: (B, C, H, W).
            mask: which stage-3 patches (or stage-1 cells) are hidden; None runs on all positions without
                the fusion (evaluation).
            return_attn: also return each stage-3 block's attention weights.
            return_hidden: also return each stage-3 block's output.

        Returns:
            An :class:`EncoderOutput` with ``tokens`` (B, N, D) (no prefix token; the visible tokens in
            ``mask.ids_keep`` order, or all L in raster order) and ``stage_features``: the stage-1 map
            (B, C1, H/p1, W/p1), the stage-2 map (B, C2, H/(p1 p2), W/(p1 p2)) and the output tokens as a
            (B, D, grid_h, grid_w) map, hidden positions zero when masked.
        """
        x1, x2, x, fused = self._embed(images, mask)
        out = EncoderOutput(tokens=x, num_prefix_tokens=0, grid=self.grid)
        x = run_blocks(
            self.blocks3,
            x,
            attentions=out.attentions if return_attn else None,
            hidden_states=out.hidden_states if return_hidden else None,
            checkpoint=self.grad_checkpointing and self.training,
        )
        if fused is not None:
            x = x + fused
        out.tokens = self.norm(x)  # (B, N, D)
        out.stage_features = [x1, x2, self._token_map(out.tokens, mask)]
        return out

    def _token_map(self, tokens: Tensor, mask: MaskSpec | None) -> Tensor:
        """Tokens (B, N, D) as a (B, D, grid_h, grid_w) map; hidden positions are zero when masked."""
        if mask is not None:
            index = mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (B, Lk, D)
            full = tokens.new_zeros(tokens.shape[0], self.num_patches, tokens.shape[-1])  # (B, L, D)
            tokens = full.scatter(1, index, tokens)  # (B, L, D) raster order
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)  # (B, D, grid_h, grid_w)

    def forward_features(self, images: Tensor, pool: str = "avg") -> Tensor:
        """Pooled features of unmasked images for evaluation: (B, C, H, W) -> (B, D), the mean of the tokens.

        Args:
            pool: ``"avg"``; ConvMAE has no class token, so ``"cls"`` is refused.
        """
        if pool == "cls":
            raise ValueError("ConvMAE (ConvViT) has no class token; use pool='avg'")
        if pool != "avg":
            raise ValueError(f"pool must be 'avg' for ConvMAE, got {pool!r}")
        return self(images).tokens.mean(dim=1)  # (B, D)
