"""Histograms of oriented gradients per patch: MaskFeat's prediction target.

MaskFeat (Wei et al., "Masked Feature Prediction for Self-Supervised Visual Pre-Training", CVPR 2022)
predicts HOG features of the hidden patches. :class:`HOGFeatures` computes them in torch, on the device of
the images, without gradients:

1. image gradients with the centered ``[-1, 0, 1]`` filters (Dalal & Triggs' best choice) in x and y, for
   each channel separately, reflect-padding the border by one pixel;
2. magnitudes ``hypot(g_x, g_y)``, optionally weighted by a Gaussian window centered in each patch (std
   half the patch side, as MaskFeat's ``gaussian_window`` equal to the patch size);
3. unsigned orientations ``atan2(g_y, g_x) mod 180 degrees`` hard-assigned to ``num_bins`` equal bins:
   bin 0 holds horizontal gradients (vertical edges), bin ``num_bins // 2`` about vertical ones;
4. per-channel histograms summed over square cells of ``cell_size`` pixels;
5. for each patch, the histograms of its cells (all channels: MaskFeat computes HOG per RGB channel) are
   concatenated and L2-normalized.

It follows PySlowFast's ``HOGLayerC`` (``slowfast/models/operators.py``) with two differences: that code
takes Sobel filters and L2-normalizes each cell's histogram, where this takes the ``[-1, 0, 1]`` filters
and normalizes each patch's vector (the paper's description: histograms of the cells of a patch are
concatenated and normalized locally). Its bins count orientation from the y axis; here from the x axis.

Images arrive normalized, ``x' = (x - mean_c) / std_c`` per channel. The mean cancels in the gradients and
``1 / std_c`` scales every gradient of channel c, so orientations are unchanged and, for one channel, the
normalized features are exactly those of the raw pixels. With several channels of different std the
channels' relative weights within a patch change; pass ``pixel_std`` to undo that scaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gaussian_window(size: int, std: float) -> Tensor:
    """(size, size) separable Gaussian centered in the square, summing to 1."""
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    profile = torch.exp(-0.5 * (offsets / std) ** 2)  # (size,)
    window = torch.outer(profile, profile)  # (size, size)
    return window / window.sum()


class HOGFeatures(nn.Module):
    """Per-patch HOG features (MaskFeat); see the module docstring for the algorithm.

    Args:
        patch_size: patch side in pixels (the student's).
        cell_size: cell side in pixels, dividing ``patch_size``; default half the patch (MaskFeat's 8-pixel
            cells in 16-pixel patches), or the whole patch when its side is odd.
        num_bins: unsigned orientation bins over 0-180 degrees.
        in_chans: image channels; each gets its own histograms.
        gaussian_weight: weight gradient magnitudes by a Gaussian window centered in each patch.
        pixel_std: the per-channel std the images were normalized with, to compute gradients on the pixel
            scale (matters only when channels' stds differ); None uses the images as given.

    Attributes:
        dim: features per patch, ``in_chans * num_bins * (patch_size // cell_size) ** 2``.
    """

    window: Tensor  # (p, p) magnitude weights of one patch
    pixel_scale: Tensor  # (1, C or 1, 1, 1)

    def __init__(
        self,
        patch_size: int,
        cell_size: int | None = None,
        num_bins: int = 9,
        in_chans: int = 1,
        gaussian_weight: bool = False,
        pixel_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if cell_size is None:
            cell_size = patch_size // 2 if patch_size % 2 == 0 else patch_size
        if patch_size <= 0 or cell_size <= 0 or patch_size % cell_size:
            raise ValueError(f"cell_size {cell_size} must be positive and divide patch_size {patch_size}")
        if num_bins <= 0:
            raise ValueError(f"num_bins must be positive, got {num_bins}")
        if pixel_std is not None and len(pixel_std) not in (1, in_chans):
            raise ValueError(f"pixel_std needs 1 or {in_chans} values, got {list(pixel_std)}")
        self.patch_size = patch_size
        self.cell_size = cell_size
        self.num_bins = num_bins
        self.in_chans = in_chans
        self.gaussian_weight = gaussian_weight
        self.cells_per_side = patch_size // cell_size
        self.dim = in_chans * num_bins * self.cells_per_side**2
        window = gaussian_window(patch_size, patch_size / 2) if gaussian_weight else torch.ones(patch_size, patch_size)
        self.register_buffer("window", window, persistent=False)  # (p, p)
        scale = torch.ones(1) if pixel_std is None else torch.tensor([float(value) for value in pixel_std])
        self.register_buffer("pixel_scale", scale.view(1, -1, 1, 1), persistent=False)  # (1, C or 1, 1, 1)

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, cell_size={self.cell_size}, num_bins={self.num_bins}, "
            f"in_chans={self.in_chans}, gaussian_weight={self.gaussian_weight}, dim={self.dim}"
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """HOG features of every patch.

        Args:
            images: (B, C, H, W), H and W multiples of ``patch_size``, C = ``in_chans``.

        Returns:
            (B, L, dim) in raster patch order, L = (H / patch_size) * (W / patch_size); each row has unit
            L2 norm, or is zero where the patch has no gradient. Per patch the layout is
            (channel, bin, cell row, cell column).
        """
        batch, channels, height, width = images.shape
        if channels != self.in_chans:
            raise ValueError(f"HOGFeatures expects {self.in_chans} channels, got images of {channels}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size {self.patch_size}")
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        cells_h, cells_w, per_side = height // self.cell_size, width // self.cell_size, self.cells_per_side

        pixels = images.float() * self.pixel_scale  # (B, C, H, W)
        padded = F.pad(pixels, (1, 1, 1, 1), mode="reflect")  # (B, C, H + 2, W + 2)
        grad_x = padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]  # (B, C, H, W)
        grad_y = padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]  # (B, C, H, W)
        magnitude = torch.hypot(grad_x, grad_y) * self.window.repeat(grid_h, grid_w)  # (B, C, H, W)
        orientation = torch.atan2(grad_y, grad_x).remainder(math.pi)  # (B, C, H, W) in [0, pi]
        bins = (orientation * (self.num_bins / math.pi)).long().clamp_(max=self.num_bins - 1)  # (B, C, H, W)

        rows = torch.arange(height, device=images.device) // self.cell_size  # (H,)
        cols = torch.arange(width, device=images.device) // self.cell_size  # (W,)
        cell = rows[:, None] * cells_w + cols[None, :]  # (H, W) raster cell index
        index = bins * (cells_h * cells_w) + cell  # (B, C, H, W) into (bin, cell row, cell column)
        hist = magnitude.new_zeros(batch * channels, self.num_bins * cells_h * cells_w)
        hist.scatter_add_(1, index.view(batch * channels, -1), magnitude.reshape(batch * channels, -1))
        hist = hist.view(batch, channels, self.num_bins, grid_h, per_side, grid_w, per_side)
        features = hist.permute(0, 3, 5, 1, 2, 4, 6)  # (B, grid_h, grid_w, C, bins, per_side, per_side)
        features = features.reshape(batch, grid_h * grid_w, self.dim)  # (B, L, dim)
        return F.normalize(features, dim=-1)
