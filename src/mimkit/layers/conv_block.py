"""ConvMAE's convolution stages: masked convolution blocks and convolutional patch embeddings.

Masked convolution (Gao et al., 2022): the feature map is multiplied by a visibility map (1 = visible,
0 = hidden) before every convolution, so no value computed from a hidden region ever enters a
visible one. Norms are per-position LayerNorms over channels, which do not mix positions either.
Parameter names follow the ConvMAE code (``conv1``, ``attn``, ``conv2``, ``mlp.fc1``, ``mlp.fc2``,
``proj``), so its weights load by name.
"""

from __future__ import annotations

from torch import Tensor, nn

from mimkit.layers.block import DropPath


def upsample_mask(mask: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """A patch mask drawn on a coarse grid, repeated ``factor`` times along each side.

    Args:
        mask: (B, L) bool, True = hidden, raster order on ``grid``.
        grid: (grid_h, grid_w) with ``grid_h * grid_w == L``.
        factor: upsampling factor (the stride between the finer map and ``grid``).

    Returns:
        (B, 1, grid_h * factor, grid_w * factor) bool, True = hidden.
    """
    grid_h, grid_w = grid
    if mask.shape[1] != grid_h * grid_w:
        raise ValueError(f"mask has {mask.shape[1]} patches, but grid {grid} has {grid_h * grid_w}")
    coarse = mask.reshape(mask.shape[0], 1, grid_h, grid_w)  # (B, 1, h, w)
    return coarse.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)  # (B, 1, h*f, w*f)


def masked(x: Tensor, visible: Tensor | None) -> Tensor:
    """``x`` (B, C, H, W) with hidden positions set to zero; ``visible`` (B, 1, H, W) is 1 or 0, None = all visible."""
    return x if visible is None else x * visible


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map (no mixing across positions)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        return super().forward(x).permute(0, 3, 1, 2)  # (B, C, H, W)


class ConvMlp(nn.Module):
    """Pointwise (1x1 convolution) MLP with GELU: (B, C, H, W) -> (B, C, H, W).

    Args:
        dim: channels.
        hidden_dim: hidden channels.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, kernel_size=1)

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); ``visible`` (B, 1, H, W) zeroes hidden positions before each convolution."""
        x = self.act(self.fc1(masked(x, visible)))  # (B, hidden, H, W)
        return self.fc2(masked(x, visible))  # (B, C, H, W)


class ConvBlock(nn.Module):
    """ConvMAE's convolution block: a spatial-context residual then a pointwise-MLP residual.

    ``x + conv2(attn(conv1(norm1(x))))`` with ``attn`` a depthwise ``kernel_size`` convolution (ConvMAE
    calls it attention; named as upstream), then ``x + mlp(norm2(x))``. With a visibility map, hidden
    positions are zeroed before every convolution; their residual stream keeps whatever it held, which
    no convolution reads.

    Args:
        dim: channels.
        mlp_ratio: MLP hidden channels / dim.
        kernel_size: side of the depthwise convolution (odd).
        drop_path: stochastic depth rate.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        kernel_size: int = 5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the map size, got {kernel_size}")
        self.norm1 = LayerNorm2d(dim, eps=norm_eps)
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1)
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm2 = LayerNorm2d(dim, eps=norm_eps)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W); ``visible`` (B, 1, H, W) float, 1 = visible, None = all visible."""
        context = self.conv1(masked(self.norm1(x), visible))
        context = self.conv2(masked(self.attn(masked(context, visible)), visible))
        x = x + self.drop_path(context)
        return x + self.drop_path(self.mlp(self.norm2(x), visible))


class ConvPatchEmbed(nn.Module):
    """Non-overlapping strided convolution then a per-position LayerNorm and GELU (ConvMAE's ``PatchEmbed``).

    Because kernel = stride, each output position reads one input cell of ``patch_size`` x ``patch_size``;
    a mask upsampled from a coarser grid hides whole cells, so hidden inputs reach hidden outputs only.

    Args:
        patch_size: kernel and stride.
        in_chans: input channels.
        embed_dim: output channels.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=norm_eps)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / p, W / p)."""
        return self.act(self.norm(self.proj(x)))
