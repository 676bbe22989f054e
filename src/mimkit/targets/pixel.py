"""Pixel target (MAE): predict the hidden patches' pixels, optionally normalised per patch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.layers import patchify
from mimkit.masking import MaskSpec

LOSSES = ("mse", "l1", "smooth_l1")


def masked_mean(per_patch: Tensor, mask: Tensor) -> Tensor:
    """Mean of a (B, L) per-patch loss over hidden patches only (mask True = hidden)."""
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def elementwise_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-element regression loss of one of :data:`LOSSES`."""
    if kind == "mse":
        return (pred - target) ** 2
    if kind == "l1":
        return (pred - target).abs()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


class PixelTarget(nn.Module):
    """Loss on hidden patches between predictions and (normalised) pixels.

    Args:
        patch_size: patch side.
        norm_pix: normalise each target patch to zero mean and unit variance (MAE's ``norm_pix_loss``).
        loss: ``"mse"`` (MAE), ``"l1"`` or ``"smooth_l1"``.
        eps: variance epsilon of the per-patch normalisation.
    """

    def __init__(self, patch_size: int, norm_pix: bool = True, loss: str = "mse", eps: float = 1e-6) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.loss = loss
        self.eps = eps

    def patch_stats(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Patches and their per-patch mean and std: each (B, L, p*p*C), (B, L, 1), (B, L, 1)."""
        patches = patchify(images, self.patch_size)  # (B, L, p*p*C)
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + self.eps) ** 0.5  # unbiased var, as MAE and HF
        return patches, mean, std

    def targets(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, p*p*C) what the decoder must predict."""
        patches, mean, std = self.patch_stats(images)
        return (patches - mean) / std if self.norm_pix else patches

    def to_pixels(self, pred: Tensor, images: Tensor) -> Tensor:
        """Map predictions (B, L, p*p*C) back to pixel patches, undoing norm_pix with each original
        patch's own mean and std so a reconstruction is faithful to look at."""
        if not self.norm_pix:
            return pred
        _, mean, std = self.patch_stats(images)
        return pred * std + mean

    def forward(self, images: Tensor, pred: Tensor, mask: MaskSpec) -> Tensor:
        """Scalar loss averaged over hidden patches."""
        per_patch = elementwise_loss(pred, self.targets(images), self.loss).mean(dim=-1)  # (B, L)
        return masked_mean(per_patch, mask.mask)
