"""Image <-> patch conversions and the convolutional patch embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_patch_grid(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Validate an image size against a patch size and return the patch grid (grid_h, grid_w)."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    for side in (height, width):
        if side <= 0 or patch_size <= 0:
            raise ValueError(f"image size {img_size} and patch_size {patch_size} must be positive")
        if side % patch_size:
            raise ValueError(
                f"image size {side} is not divisible by patch_size {patch_size}; "
                f"use an img_size that is a multiple of {patch_size}"
            )
    return height // patch_size, width // patch_size


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Split images into flattened patches.

    Args:
        images: (B, C, H, W).
        patch_size: p, dividing H and W.

    Returns:
        (B, L, p*p*C) with L = (H/p)*(W/p), each patch flattened in (p, p, C) order as in MAE.
    """
    batch, chans, height, width = images.shape
    grid_h, grid_w = check_patch_grid((height, width), patch_size)
    x = images.reshape(batch, chans, grid_h, patch_size, grid_w, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * chans)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: (B, L, p*p*C).
        patch_size: p.
        grid: (grid_h, grid_w) with grid_h * grid_w == L.
        in_chans: C.

    Returns:
        (B, C, grid_h*p, grid_w*p).
    """
    batch, length, _ = patches.shape
    grid_h, grid_w = grid
    if grid_h * grid_w != length:
        raise ValueError(f"grid {grid} does not hold {length} patches")
    x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(batch, in_chans, grid_h * patch_size, grid_w * patch_size)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding by a strided convolution (timm's ``PatchEmbed`` layout).

    Args:
        img_size: input side (or (H, W)).
        patch_size: patch side p.
        in_chans: input channels.
        embed_dim: output width.
    """

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.grid = check_patch_grid(img_size, patch_size)
        self.img_size = (self.grid[0] * patch_size, self.grid[1] * patch_size)
        self.patch_size = patch_size
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Take images of another size from now on (the projection does not depend on it)."""
        self.grid = check_patch_grid(img_size, self.patch_size)
        self.img_size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, D)."""
        if images.shape[-2:] != self.img_size:
            raise ValueError(
                f"expected images of size {self.img_size}, got {tuple(images.shape[-2:])}; "
                "resize them or build the model with this img_size"
            )
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, L, D)
