"""Regular grid masking (the MAE paper's "grid-wise sampling" ablation)."""

from __future__ import annotations

import math
from typing import Any

import torch

from mimkit.masking.spec import MaskSpec, OptionError

GRID_RATIO = 0.75  # one visible patch per 2x2 cell fixes the ratio


class GridMasker:
    """Keep one patch in every 2x2 cell of the patch grid and hide the other three.

    The kept patch is the top-left one of each cell, or, with ``random_offset=True``, the same
    position (one of the four) for every cell of an image, drawn per image from the generator.

    Args:
        ratio: must be 0.75; the pattern fixes it (accepted so ``create_masker(kind, ratio)`` works).
        random_offset: draw the kept position within the 2x2 cell per image instead of top-left.
    """

    def __init__(self, ratio: float = GRID_RATIO, random_offset: bool = False) -> None:
        if not math.isclose(ratio, GRID_RATIO, abs_tol=1e-9):
            raise OptionError(
                "ratio",
                f"grid masking keeps one patch per 2x2 cell, so its ratio is {GRID_RATIO}; got {ratio}. "
                f"Set the ratio to {GRID_RATIO} or use another mask type",
            )
        self.ratio = GRID_RATIO
        self.random_offset = random_offset

    @staticmethod
    def check_grid(grid: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless the patch grid splits into 2x2 cells (even height and width)."""
        height, width = grid
        if height < 2 or width < 2 or height % 2 or width % 2:
            raise ValueError(
                f"grid masking needs an even patch grid (2x2 cells), got {height}x{width}; "
                "choose img_size / patch_size even"
            )

    def __call__(
        self,
        batch: int,
        grid: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec:
        """Masks for ``batch`` images on a ``grid = (grid_h, grid_w)`` patch grid with even sides.

        Returns:
            A :class:`MaskSpec` on the CPU hiding exactly ``3 L / 4`` patches per image, visible
            patches in raster order.
        """
        self.check_grid(grid)
        height, width = grid
        if self.random_offset:
            device = generator.device if generator is not None else torch.device("cpu")
            offsets = torch.randint(0, 2, (batch, 2), generator=generator, device=device).cpu()  # (B, 2): (dy, dx)
        else:
            offsets = torch.zeros(batch, 2, dtype=torch.long)
        row_parity = (torch.arange(height) % 2).view(1, height, 1)  # (1, H, 1)
        col_parity = (torch.arange(width) % 2).view(1, 1, width)  # (1, 1, W)
        visible = (row_parity == offsets[:, 0].view(batch, 1, 1)) & (col_parity == offsets[:, 1].view(batch, 1, 1))
        mask = ~visible.reshape(batch, height * width)  # (B, L) True = hidden
        return MaskSpec.from_mask(mask)

    def __repr__(self) -> str:
        return f"GridMasker(ratio={self.ratio}, random_offset={self.random_offset})"
