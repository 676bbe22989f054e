"""Pixel target (MAE): predict the hidden patches' pixels, optionally normalised per patch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.layers import patchify
from mimkit.masking import MaskSpec

LOSSES = ("mse", "l1", "smooth_l1", "cosine")


def masked_mean(per_patch: Tensor, mask: Tensor) -> Tensor:
    """Mean of a (B, L) per-patch loss over hidden patches only (mask True = hidden)."""
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def elementwise_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-element regression loss: ``"mse"``, ``"l1"`` or ``"smooth_l1"`` (beta 1)."""
    if kind == "mse":
        return (pred - target) ** 2
    if kind == "l1":
        return (pred - target).abs()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    raise ValueError(f"unknown elementwise loss {kind!r}; choose one of {LOSSES[:3]}")


def patch_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Loss of each patch, (B, L, D) x 2 -> (B, L): the mean over D of an elementwise loss, or for
    ``"cosine"`` one minus the cosine similarity of the two vectors (as BEiT v2's and MILAN's feature losses)."""
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)  # (B, L)
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    return elementwise_loss(pred, target, kind).mean(dim=-1)  # (B, L)


class PixelTarget(nn.Module):
    """Loss on hidden patches between predictions and (normalised) pixels.

    Args:
        patch_size: patch side.
        in_chans: image channels.
        norm_pix: normalise each target patch to zero mean and unit variance (MAE's ``norm_pix_loss``).
        loss: ``"mse"`` (MAE), ``"l1"``, ``"smooth_l1"`` or ``"cosine"`` (see :func:`patch_loss`).
        eps: variance epsilon of the per-patch normalisation.
    """

    def __init__(
        self, patch_size: int, in_chans: int = 3, norm_pix: bool = True, loss: str = "mse", eps: float = 1e-6
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        self.patch_size = patch_size
        self.dim = patch_size**2 * in_chans  # predicted values per patch
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

    def hidden_values(self, images: Tensor, mask: MaskSpec) -> Tensor:
        """Which predicted values are hidden pixels: (B, L, p*p*C) bool, in the order of :meth:`targets`
        (each pixel of a hidden cell of ``mask``, on its patch grid or a finer one, for every channel)."""
        _, chans, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        hidden = mask.hidden_map(grid, self.patch_size)  # (B, 1, H, W) True = hidden pixel
        per_pixel = patchify(hidden.to(images.dtype), self.patch_size)  # (B, L, p*p)
        return per_pixel.repeat_interleave(chans, dim=-1).bool()  # (B, L, p*p*C), channels innermost

    def forward(self, images: Tensor, pred: Tensor, mask: MaskSpec) -> Tensor:
        """Scalar loss averaged over hidden patches, or over hidden pixels when ``mask`` hides parts of
        patches (``mask.fine_mask``, e.g. ConvMAE's fine-grained random masking)."""
        if mask.fine_mask is None:
            per_patch = patch_loss(pred, self.targets(images), self.loss)  # (B, L)
            return masked_mean(per_patch, mask.mask)
        if self.loss == "cosine":
            raise ValueError(
                "target.loss=cosine compares whole patches; a mask that hides parts of patches needs an "
                "elementwise loss (mse, l1 or smooth_l1)"
            )
        weight = self.hidden_values(images, mask).to(pred.dtype)  # (B, L, p*p*C)
        per_value = elementwise_loss(pred, self.targets(images), self.loss)  # (B, L, p*p*C)
        return (per_value * weight).sum() / weight.sum().clamp_min(1.0)
