"""The mask as data: :class:`MaskSpec`, produced by a masker and read by encoder, decoder and target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


def num_hidden_patches(num_patches: int, ratio: float) -> int:
    """Patches hidden per image: ``round(ratio * L)``, the same count for every image of a batch."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
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

    Attributes:
        ids_keep: (B, Lk) indices of visible patches, in the order the encoder sees them.
        ids_restore: (B, L) inverse permutation: position of patch ``l`` in ``[ids_keep, hidden]``.
        mask: (B, L) bool, True = hidden. Patch indices never count class/prefix tokens.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor

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
        return MaskSpec(self.ids_keep[index], self.ids_restore[index], self.mask[index])

    def to(self, device: torch.device | str) -> MaskSpec:
        return MaskSpec(self.ids_keep.to(device), self.ids_restore.to(device), self.mask.to(device))

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


class Masker(Protocol):
    """Anything that makes a :class:`MaskSpec` for a batch on a patch grid."""

    def __call__(
        self,
        batch: int,
        grid: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec: ...
