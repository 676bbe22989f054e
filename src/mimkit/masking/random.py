"""Uniform random masking: MAE's on the patch grid (on ConvMAE's stage-3 grid, its "block-wise" masking), and
ConvMAE's fine-grained ablation on its stage-1 grid."""

from __future__ import annotations

from typing import Any

import torch

from mimkit.masking.spec import MaskSpec, OptionError, num_hidden_patches


class RandomMasker:
    """Hide ``round(ratio * L)`` patches per image, uniformly at random and independently per image.

    Args:
        ratio: fraction of patches hidden (MAE default 0.75).
    """

    def __init__(self, ratio: float = 0.75) -> None:
        num_hidden_patches(1, ratio)  # validates the ratio
        self.ratio = ratio

    def __call__(
        self,
        batch: int,
        grid: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec:
        num_patches = grid[0] * grid[1]
        num_visible = num_patches - num_hidden_patches(num_patches, self.ratio)
        noise = torch.rand(batch, num_patches, generator=generator)  # (B, L), on the generator's device
        return MaskSpec.from_noise(noise, num_visible)

    def __repr__(self) -> str:
        return f"RandomMasker(ratio={self.ratio})"


class FineRandomMasker:
    """Random masking on a grid ``factor`` times finer than the patch grid: ConvMAE's stage-1 grid.

    MAE-style fine-grained masking for a multi-stage encoder (ConvMAE's "random masking" ablation): the
    mask is drawn on the first convolution stage's cells, not on the transformer's patches. The rule:
    inside the ``factor x factor`` cells of every patch, ``round(ratio * factor**2)`` cells are hidden,
    chosen uniformly at random and independently per patch and image. So exactly the ratio is hidden
    in every patch and every patch keeps some visible cells: the transformer sees all tokens, each
    partly. The spec's ``mask`` (whole patches hidden) is therefore all False and its ``fine_mask``
    holds the cells; the loss is taken on the hidden cells only.

    Args:
        ratio: fraction of cells hidden in each patch (0.75: 12 of ConvMAE's 16 stage-1 cells).
        factor: cells per patch side, the stride of the patch grid over the masked grid (ConvMAE:
            ``p2 * p3``, 4; set by the model it is built for).
    """

    def __init__(self, ratio: float = 0.75, factor: int = 4) -> None:
        if factor < 2:
            raise OptionError("factor", f"factor must be at least 2 cells per patch side, got {factor}")
        cells = factor * factor
        self.num_hidden = num_hidden_patches(cells, ratio)  # validates the ratio
        if self.num_hidden >= cells:
            raise OptionError(
                "ratio",
                f"ratio {ratio} hides all {cells} cells of a patch, so no token stays partly visible; "
                f"use a ratio below {1 - 0.5 / cells:.3f}",
            )
        self.ratio = ratio
        self.factor = factor

    def __call__(
        self,
        batch: int,
        grid: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec:
        grid_h, grid_w = grid
        factor = self.factor
        noise = torch.rand(batch, grid_h * grid_w, factor * factor, generator=generator)  # (B, L, f*f)
        rank = noise.argsort(dim=-1).argsort(dim=-1)  # (B, L, f*f) each cell's rank within its patch
        hidden = rank < self.num_hidden  # (B, L, f*f) the lowest-noise cells are hidden
        cells = hidden.reshape(batch, grid_h, grid_w, factor, factor).permute(0, 1, 3, 2, 4)  # (B, h, f, w, f)
        return MaskSpec.from_fine_mask(cells.reshape(batch, grid_h * factor, grid_w * factor), grid)

    def __repr__(self) -> str:
        return f"FineRandomMasker(ratio={self.ratio}, factor={self.factor})"
