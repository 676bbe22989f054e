"""The mask as data: :class:`MaskSpec`, produced by a masker and read by encoder, decoder and target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


class OptionError(ValueError):
    """A masker refused one of its options: ``option`` names the constructor argument, so a config can name
    the key it came from."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def num_hidden_patches(num_patches: int, ratio: float) -> int:
    """Patches hidden per image: ``round(ratio * L)``, the same count for every image of a batch."""
    if not 0.0 <= ratio < 1.0:
        raise OptionError("ratio", f"mask ratio must be in [0, 1), got {ratio}")
    return round(ratio * num_patches)


def mae_num_visible(num_patches: int, ratio: float) -> int:
    """Patches MAE and HuggingFace ``ViTMAE`` keep: ``int(L * (1 - ratio))``.

    Used when a caller passes ``noise``, so the same noise gives the same mask as in those
    peers; it can differ from ``L - round(ratio * L)`` by one for ratios that do not divide ``L``.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return int(num_patches * (1 - ratio))


@dataclass
class MaskSpec:
    """Which patches are hidden.

    A mask is drawn on the encoder's patch grid. A multi-stage encoder (ConvMAE) may also take a mask
    drawn on a finer grid, ``fine_mask``: it hides parts of patches. A patch is then hidden (``mask``,
    dropped from the encoder's tokens) only when every one of its fine cells is, and the loss is taken
    on the hidden cells (:meth:`hidden_map`) instead of whole patches.

    Attributes:
        ids_keep: (B, Lk) indices of visible patches, in the order the encoder sees them.
        ids_restore: (B, L) inverse permutation: position of patch ``l`` in ``[ids_keep, hidden]``.
        mask: (B, L) bool, True = hidden. Patch indices never count class/prefix tokens.
        fine_mask: optional (B, grid_h * f, grid_w * f) bool, True = hidden, on a grid ``f`` times finer
            than the patch grid; None when whole patches are hidden or shown.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor
    fine_mask: Tensor | None = None

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_patches(self) -> int:
        return self.ids_restore.shape[1]

    def gather_visible(self, x: Tensor) -> Tensor:
        """The visible entries of per-patch values: (B, L, D) in raster order -> (B, Lk, D) in ``ids_keep`` order."""
        index = self.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, Lk, D)
        return torch.gather(x, 1, index)

    def rows(self, index: slice) -> MaskSpec:
        """The masks of a slice of the batch (e.g. a micro-batch under gradient accumulation)."""
        fine = None if self.fine_mask is None else self.fine_mask[index]
        return MaskSpec(self.ids_keep[index], self.ids_restore[index], self.mask[index], fine)

    def to(self, device: torch.device | str) -> MaskSpec:
        fine = None if self.fine_mask is None else self.fine_mask.to(device)
        return MaskSpec(self.ids_keep.to(device), self.ids_restore.to(device), self.mask.to(device), fine)

    def hidden_map(self, grid: tuple[int, int], factor: int) -> Tensor:
        """The hidden cells of a map ``factor`` times finer than the patch grid.

        Without a fine mask, each patch's flag repeated over its ``factor x factor`` cells. With one, the
        fine mask repeated to a finer map, or reduced to a coarser one where a cell is hidden only when
        all the fine cells it covers are (a cell with any visible part is visible).

        Args:
            grid: (grid_h, grid_w) patch grid, ``grid_h * grid_w == L``.
            factor: cells per patch side of the map wanted (1: the patch grid itself).

        Returns:
            (B, 1, grid_h * factor, grid_w * factor) bool, True = hidden.
        """
        grid_h, grid_w = grid
        if self.mask.shape[1] != grid_h * grid_w:
            raise ValueError(f"mask has {self.mask.shape[1]} patches, but grid {grid} has {grid_h * grid_w}")
        if self.fine_mask is None:
            hidden, cells = self.mask.reshape(-1, 1, grid_h, grid_w), 1  # (B, 1, h, w)
        else:
            hidden = self.fine_mask.unsqueeze(1)  # (B, 1, h * f, w * f)
            cells = hidden.shape[-1] // grid_w
            if hidden.shape[-2:] != (grid_h * cells, grid_w * cells):
                raise ValueError(f"fine mask of shape {tuple(hidden.shape[-2:])} does not refine grid {grid}")
        if factor < cells:
            if cells % factor:
                raise ValueError(f"factor {factor} does not divide the fine mask's {cells} cells per patch side")
            window = cells // factor
            visible = F.max_pool2d((~hidden).float(), window)  # (B, 1, h * factor, w * factor) 1 = any visible
            return visible == 0
        if factor % cells:
            raise ValueError(f"factor {factor} is not a multiple of the fine mask's {cells} cells per patch side")
        repeat = factor // cells
        return hidden.repeat_interleave(repeat, dim=2).repeat_interleave(repeat, dim=3)  # (B, 1, h*f, w*f)

    @classmethod
    def unmasked(cls, batch: int, num_patches: int, device: torch.device | str | None = None) -> MaskSpec:
        """The mask that hides nothing: every patch visible, in raster order."""
        ids = torch.arange(num_patches, device=device).expand(batch, -1)  # (B, L)
        return cls(ids_keep=ids, ids_restore=ids, mask=torch.zeros(batch, num_patches, dtype=torch.bool, device=device))

    def scoring_all_patches(self) -> MaskSpec:
        """The same visible set, with every patch marked as scored: a target given it computes its loss on all
        patches (MAE's ablation of the loss on visible and hidden patches alike)."""
        return MaskSpec(self.ids_keep, self.ids_restore, torch.ones_like(self.mask))

    @classmethod
    def from_noise(cls, noise: Tensor, num_visible: int) -> MaskSpec:
        """MAE's rule: sort ``noise`` (B, L) ascending, keep the first ``num_visible`` patches.

        This is exactly how MAE and HuggingFace ``ViTMAE`` turn noise into a mask, so the same
        noise gives the same mask in all three.
        """
        ids_shuffle = torch.argsort(noise, dim=1)  # (B, L) ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
        ids_keep = ids_shuffle[:, :num_visible]  # (B, Lk)
        mask = ids_restore >= num_visible  # (B, L) True = hidden
        return cls(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)

    @classmethod
    def from_mask(cls, mask: Tensor, generator: torch.Generator | None = None) -> MaskSpec:
        """Build a spec from a boolean mask (B, L) with the same hidden count in every row.

        Visible patches are kept in ascending index order (stable, so convolutional encoders can
        rely on raster order); hidden ones follow.
        """
        counts = mask.sum(dim=1)
        if (counts != counts[0]).any():
            raise ValueError(f"every image must hide the same number of patches, got {counts.tolist()}")
        num_visible = mask.shape[1] - int(counts[0])
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, then hidden
        ids_restore = torch.argsort(order, dim=1)
        return cls(ids_keep=order[:, :num_visible], ids_restore=ids_restore, mask=mask.bool())

    @classmethod
    def from_fine_mask(cls, fine_mask: Tensor, grid: tuple[int, int]) -> MaskSpec:
        """Build a spec from a mask (B, grid_h * f, grid_w * f) on a grid ``f`` times finer than ``grid``:
        a patch is hidden when all its ``f x f`` cells are (the same number of such patches in every row)."""
        grid_h, grid_w = grid
        cells = fine_mask.shape[-1] // grid_w
        if fine_mask.dim() != 3 or fine_mask.shape[-2:] != (grid_h * cells, grid_w * cells) or cells < 1:
            raise ValueError(f"fine mask of shape {tuple(fine_mask.shape)} does not refine grid {grid}")
        blocks = fine_mask.reshape(-1, grid_h, cells, grid_w, cells)  # (B, h, f, w, f)
        mask = blocks.all(dim=4).all(dim=2).flatten(1)  # (B, L) hidden where every cell is
        spec = cls.from_mask(mask)
        spec.fine_mask = fine_mask.bool()
        return spec


@runtime_checkable
class Masker(Protocol):
    """Anything that makes a :class:`MaskSpec` for a batch on a patch grid.

    Attributes:
        ratio: the fraction of patches it hides (MAE's noise-driven masks in
            :meth:`~mimkit.models.mim.MaskedImageModel.make_mask` keep the same number visible).
    """

    ratio: float

    def __call__(
        self,
        batch: int,
        grid: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec: ...
