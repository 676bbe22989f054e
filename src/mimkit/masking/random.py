"""Uniform random masking (MAE)."""

from __future__ import annotations

from typing import Any

import torch

from mimkit.masking.spec import MaskSpec, num_hidden_patches


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
