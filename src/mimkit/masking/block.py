"""Block-wise masking (BEiT's ``MaskingGenerator``), with an exact hidden count per image."""

from __future__ import annotations

import math
from typing import Any

import torch

from mimkit.masking.spec import MaskSpec, OptionError, num_hidden_patches

_ATTEMPTS_PER_BLOCK = 10  # BEiT's retries before giving up on placing one more rectangle
_CHUNK = 1024  # uniforms drawn from the generator at a time


class _Uniforms:
    """Uniform [0, 1) numbers drawn from ``generator`` in chunks, consumed one at a time.

    Drawing in chunks keeps the per-rectangle cost at Python speed while every number still comes
    from the generator, so the same seed gives the same masks.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.device = generator.device if generator is not None else torch.device("cpu")
        self.values: list[float] = []
        self.position = 0

    def next(self) -> float:
        if self.position == len(self.values):
            self.values = torch.rand(_CHUNK, generator=self.generator, device=self.device, dtype=torch.float64).tolist()
            self.position = 0
        value = self.values[self.position]
        self.position += 1
        return value

    def index(self, size: int) -> int:
        """A uniform integer in ``[0, size)``."""
        return min(int(self.next() * size), size - 1)


class BlockMasker:
    """Hide ``round(ratio * L)`` patches per image as a union of random rectangles (BEiT block-wise masking).

    Follows BEiT's ``MaskingGenerator``: while the budget ``B = round(ratio * L) - hidden`` is positive,
    draw a rectangle of area ``U(min(min_num_patches, B), B)`` and aspect ratio log-uniform in
    ``[min_aspect, max_aspect]``, place it uniformly (it must be narrower and shorter than the grid, as
    in BEiT), and hide its not-yet-hidden patches if that adds at least one and at most ``B`` patches;
    a rectangle that would overshoot is rejected and redrawn. After ``10`` rejected draws in a row,
    the remaining budget is filled one patch at a time with a random visible patch 4-adjacent to
    the mask (any visible patch if the mask is still empty), so the count is exact and the mask
    stays contiguous. BEiT-v2 instead fills that remainder with scattered random patches.

    Patches are hidden per image in a Python loop over rectangles on integer bitmasks; every random
    number comes from the given generator, so the same seed gives the same masks.

    Args:
        ratio: fraction of patches hidden, in ``[0, 1)``.
        min_num_patches: smallest rectangle area drawn (BEiT: 4); smaller only when the budget is.
        min_aspect: smallest height/width ratio of a rectangle (BEiT: 0.3).
        max_aspect: largest height/width ratio; ``None`` means ``1 / min_aspect``.
    """

    def __init__(
        self,
        ratio: float = 0.75,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        num_hidden_patches(1, ratio)  # validates the ratio
        if min_num_patches < 1:
            raise OptionError("min_num_patches", f"min_num_patches must be >= 1, got {min_num_patches}")
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not (min_aspect > 0 and max_aspect is not None and max_aspect >= min_aspect):
            raise OptionError(
                "min_aspect" if min_aspect <= 0 else "max_aspect",
                f"need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, max_aspect={max_aspect}",
            )
        self.ratio = ratio
        self.min_num_patches = min_num_patches
        self.min_aspect = min_aspect
        self.max_aspect: float = max_aspect
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    def __call__(
        self,
        batch: int,
        grid: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec:
        """Masks for ``batch`` images on a ``grid = (grid_h, grid_w)`` patch grid.

        Returns:
            A :class:`MaskSpec` on the CPU: ``mask`` (B, L) with exactly ``round(ratio * L)`` True
            per row, visible patches in raster order in ``ids_keep`` (B, L - hidden).
        """
        height, width = grid
        if height < 1 or width < 1:
            raise ValueError(f"grid must have positive height and width, got {grid}")
        num_patches = height * width
        num_hidden = num_hidden_patches(num_patches, self.ratio)
        uniforms = _Uniforms(generator)
        rows = [self._one_mask(height, width, num_hidden, uniforms) for _ in range(batch)]
        bits = torch.tensor([[(row >> index) & 1 for index in range(num_patches)] for row in rows], dtype=torch.bool)
        return MaskSpec.from_mask(bits.reshape(batch, num_patches))  # (B, L), True = hidden

    def _one_mask(self, height: int, width: int, num_hidden: int, uniforms: _Uniforms) -> int:
        """One image's mask as an integer bitmask: bit ``r * width + c`` set = patch (r, c) hidden."""
        mask = 0
        count = 0
        log_low, log_high = self.log_aspect_range
        while count < num_hidden:
            budget = num_hidden - count
            added = 0
            for _ in range(_ATTEMPTS_PER_BLOCK):
                min_area = min(self.min_num_patches, budget)
                area = min_area + uniforms.next() * (budget - min_area)
                aspect = math.exp(log_low + uniforms.next() * (log_high - log_low))
                block_h = round(math.sqrt(area * aspect))
                block_w = round(math.sqrt(area / aspect))
                top, left = uniforms.next(), uniforms.next()  # drawn always, so consumption is regular
                if not (0 < block_h < height and 0 < block_w < width):
                    continue
                top = min(int(top * (height - block_h + 1)), height - block_h)
                left = min(int(left * (width - block_w + 1)), width - block_w)
                row_bits = ((1 << block_w) - 1) << left
                block = sum(row_bits << ((top + offset) * width) for offset in range(block_h))
                new = block & ~mask
                added = new.bit_count()
                if 0 < added <= budget:
                    mask |= new
                    count += added
                    break
                added = 0
            if added == 0:
                break
        while count < num_hidden:
            mask |= 1 << self._pick_adjacent(mask, height, width, uniforms)
            count += 1
        return mask

    @staticmethod
    def _pick_adjacent(mask: int, height: int, width: int, uniforms: _Uniforms) -> int:
        """Index of a random visible patch 4-adjacent to ``mask`` (any visible patch if none is)."""
        full = (1 << (height * width)) - 1
        first_column = sum(1 << (row * width) for row in range(height))
        last_column = first_column << (width - 1)
        neighbours = (
            ((mask & ~last_column) << 1)  # right neighbour
            | ((mask & ~first_column) >> 1)  # left neighbour
            | (mask << width)  # below
            | (mask >> width)  # above
        )
        candidates = neighbours & full & ~mask
        if candidates == 0:
            candidates = full & ~mask
        choice = uniforms.index(candidates.bit_count())
        for _ in range(choice):
            candidates &= candidates - 1  # drop the lowest set bit
        return (candidates & -candidates).bit_length() - 1

    def __repr__(self) -> str:
        return (
            f"BlockMasker(ratio={self.ratio}, min_num_patches={self.min_num_patches}, "
            f"min_aspect={self.min_aspect}, max_aspect={self.max_aspect})"
        )
