"""Vision Transformer encoder: on the visible tokens only when given a mask (MAE), or on every patch with the
hidden ones replaced by a learned mask embedding (BEiT)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mimkit.layers import Block, PatchEmbed, init_vit_weights, resize_pos_embed, run_blocks, sincos_2d
from mimkit.masking import MaskSpec

ENCODER_SEES = ("visible", "all")


@dataclass
class EncoderOutput:
    """What an encoder hands to a decoder, a head or an analysis.

    Attributes:
        tokens: (B, P + N, D) normalised output tokens: P prefix (class) tokens, then N patch tokens
            (the visible ones in ``mask.ids_keep`` order when masked, all L in raster order otherwise).
        num_prefix_tokens: P.
        grid: (grid_h, grid_w) patch grid of the full image.
        attentions: per block (B, heads, P + N, P + N) when requested.
        hidden_states: per block output (B, P + N, D) before the final norm, when requested.
        stage_features: per stage (B, C_i, H_i, W_i) feature maps of a multi-stage encoder (ConvViT),
            finest first, for dense tasks; empty for single-stage encoders.
    """

    tokens: Tensor
    num_prefix_tokens: int
    grid: tuple[int, int]
    attentions: list[Tensor] = field(default_factory=list)
    hidden_states: list[Tensor] = field(default_factory=list)
    stage_features: list[Tensor] = field(default_factory=list)

    @property
    def patch_tokens(self) -> Tensor:
        return self.tokens[:, self.num_prefix_tokens :]  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT encoder with a class token and a fixed 2-D sin-cos positional embedding (MAE's encoder).

    Parameter names follow timm and the original MAE code (``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.N.*``, ``norm``), so weights move between them by renaming only.

    Args:
        img_size: input side.
        patch_size: patch side.
        in_chans: input channels.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: bias on qkv projections.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        norm_eps: LayerNorm epsilon.
        grad_checkpointing: recompute each block's activations in the backward pass instead of keeping them
            (activation checkpointing, training only): less memory for about one more forward pass.
        encoder_sees: what a masked forward pass encodes. ``"visible"`` (MAE): the visible patches only.
            ``"all"`` (BEiT, MaskDistill, BEiT v2): every patch, the hidden ones' embeddings replaced by a
            learned ``mask_token`` before the position embedding is added; the output then has all L patch
            tokens in raster order. Unmasked (evaluation) the two are the same network: ``mask_token`` is
            unused.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        grad_checkpointing: bool = False,
        encoder_sees: str = "visible",
    ) -> None:
        super().__init__()
        if encoder_sees not in ENCODER_SEES:
            raise ValueError(f"encoder_sees must be one of {ENCODER_SEES}, got {encoder_sees!r}")
        self.encoder_sees = encoder_sees
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = self.patch_embed.grid
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # BEiT's [MASK] embedding; only a BEiT-style encoder has one, so MAE checkpoints keep their keys
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if encoder_sees == "all" else None
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.grid, 1)[None], requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=rate, norm_eps=norm_eps) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)  # BEiT: trunc_normal_(std=0.02)
        self.apply(init_vit_weights)

    def embed_tokens(self, images: Tensor, mask: MaskSpec | None = None) -> Tensor:
        """The tokens the first block sees: (B, C, H, W) -> (B, 1 + N, D), class token first, then the
        N visible patches (all L without a mask, or BEiT-style with the hidden ones as the mask embedding), with
        positional embeddings added."""
        return self.tokens_from_patches(self.patch_embed(images), mask)

    def tokens_from_patches(self, patches: Tensor, mask: MaskSpec | None = None) -> Tensor:
        """:meth:`embed_tokens` from patch embeddings made elsewhere (MIMDet's ConvStem in place of
        ``patch_embed``): (B, L, D) in raster order -> (B, 1 + N, D)."""
        if patches.shape[1:] != (self.num_patches, self.embed_dim):
            raise ValueError(
                f"expected patch embeddings of shape (B, {self.num_patches}, {self.embed_dim}), "
                f"got {tuple(patches.shape)}"
            )
        x = patches
        if mask is not None and self.mask_token is not None:  # BEiT: hidden patches become [MASK], then positions
            hidden = mask.mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
            x = x * (1.0 - hidden) + self.mask_token.to(x.dtype) * hidden  # (B, L, D)
        x = x + self.pos_embed[:, 1:]  # (B, L, D)
        if mask is not None and self.mask_token is None:
            x = mask.gather_visible(x)  # (B, Lk, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1)  # (B, 1 + N, D)

    def stem(self, images: Tensor) -> Tensor:
        """What runs before the blocks, for callers that run the blocks themselves (partial fine-tuning):
        the tokens the first block sees (B, 1 + L, D)."""
        return self.embed_tokens(images)

    def drop_mask_token(self) -> None:
        """Forget BEiT's mask embedding for downstream use: masked calls then drop the hidden tokens as MAE's
        encoder does (MIMDet's token sampling), and the state dict is the plain ViT's."""
        if self.mask_token is not None:
            del self.mask_token
            self.mask_token = None
        self.encoder_sees = "visible"

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Take images of another size (a multiple of the patch) from now on, for transfer at another
        resolution: the patch grid changes and the position table follows it
        (:func:`~mimkit.layers.resize_pos_embed`: recomputed exactly for the fixed sin-cos table)."""
        grid = self.grid
        self.patch_embed.set_img_size(img_size)
        self.grid, self.num_patches = self.patch_embed.grid, self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, grid, self.grid, 1), requires_grad=False)

    def set_drop_path_rate(self, drop_path_rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first block to ``drop_path_rate`` at the last
        (as at construction); fine-tuning turns it on for a pretrained encoder."""
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        rates = torch.linspace(0, drop_path_rate, len(self.blocks), device="cpu").tolist()
        for block, rate in zip(self.blocks, rates, strict=True):
            block.drop_path.drop_prob = rate  # type: ignore[union-attr]

    def forward(
        self,
        images: Tensor,
        mask: MaskSpec | None = None,
        *,
        return_attn: bool = False,
        return_hidden: bool = False,
    ) -> EncoderOutput:
        """Encode images, seeing only the visible patches when ``mask`` is given (or, with
        ``encoder_sees="all"``, every patch with the hidden ones as the mask embedding).

        Args:
            images: (B, C, H, W).
            mask: which patches are hidden; None runs on all patches (evaluation).
            return_attn: also return each block's attention weights.
            return_hidden: also return each block's output.
        """
        return self.forward_patches(
            self.patch_embed(images), mask, return_attn=return_attn, return_hidden=return_hidden
        )

    def forward_patches(
        self,
        patches: Tensor,
        mask: MaskSpec | None = None,
        *,
        return_attn: bool = False,
        return_hidden: bool = False,
    ) -> EncoderOutput:
        """:meth:`forward` on patch embeddings (B, L, D) made elsewhere instead of by ``patch_embed``
        (MIMDet's ConvStem): position embeddings, the class token and the blocks as for images."""
        x = self.tokens_from_patches(patches, mask)  # (B, 1 + N, D)
        out = EncoderOutput(tokens=x, num_prefix_tokens=1, grid=self.grid)
        x = run_blocks(
            self.blocks,
            x,
            attentions=out.attentions if return_attn else None,
            hidden_states=out.hidden_states if return_hidden else None,
            checkpoint=self.grad_checkpointing and self.training,
        )
        out.tokens = self.norm(x)
        return out

    def forward_features(self, images: Tensor, pool: str = "cls") -> Tensor:
        """Pooled features of unmasked images for evaluation: (B, C, H, W) -> (B, D).

        Args:
            pool: ``"cls"`` (class token) or ``"avg"`` (mean of patch tokens).
        """
        out = self(images)
        if pool == "cls":
            return out.tokens[:, 0]
        if pool == "avg":
            return out.patch_tokens.mean(dim=1)
        raise ValueError(f"pool must be 'cls' or 'avg', got {pool!r}")
