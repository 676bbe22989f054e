"""Feature targets: predict, at hidden patches, features of the image computed by a frozen extractor.

The unified view of masked feature prediction (MaskDistill, Peng et al. 2022, "A Unified View of Masked
Image Modeling"): an encoder sees the visible patches, a decoder and a linear head (the decoder's
``pred`` layer, ``dim`` wide) predict one vector per patch, the target is a feature of the whole image
per patch, normalized or not, and the loss runs on the hidden patches only.

=====================  ==============================  ==========================  ===========
target                 feature per patch               normalization               loss
=====================  ==============================  ==========================  ===========
pixel (MAE)            the patch's pixels              per patch (``norm_pix``)    MSE
hog (MaskFeat)         HOG of the patch's cells        L2 per patch                MSE
maskdistill            a frozen teacher's features     LayerNorm, no affine        smooth-L1
=====================  ==============================  ==========================  ===========
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.masking import MaskSpec
from mimkit.targets.hog import HOGFeatures
from mimkit.targets.pixel import LOSSES, masked_mean, patch_loss
from mimkit.targets.teacher import Teacher, keep_teacher_out_of_state_dict


class FeatureTarget(nn.Module):
    """Loss on hidden patches between predictions and per-patch features; subclasses give :meth:`features`.

    Args:
        dim: features per patch (the decoder's prediction width).
        loss: one of :data:`~mimkit.targets.LOSSES` (see :func:`~mimkit.targets.patch_loss`).
        normalize: LayerNorm without affine over each patch's features (MaskDistill's and MILAN's
            target normalization), else the features as they come.
        eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, loss: str = "smooth_l1", normalize: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        self.dim = int(dim)
        self.loss = loss
        self.normalize = normalize
        self.eps = eps

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalized images -> (B, L, dim) raw per-patch features."""
        raise NotImplementedError

    @torch.no_grad()
    def targets(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, dim) what the decoder must predict (no gradient reaches the extractor)."""
        features = self.features(images).float()  # (B, L, dim)
        if self.normalize:
            features = F.layer_norm(features, (features.shape[-1],), eps=self.eps)  # zero mean, unit var per patch
        return features

    def forward(self, images: Tensor, pred: Tensor, mask: MaskSpec) -> Tensor:
        """Scalar loss averaged over hidden patches."""
        target = self.targets(images)  # (B, L, dim)
        if pred.shape != target.shape:
            raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
        return masked_mean(patch_loss(pred, target.to(pred.dtype), self.loss), mask.mask)


class HOGTarget(FeatureTarget):
    """MaskFeat's target: HOG of each patch (:class:`~mimkit.targets.HOGFeatures`), L2-normalized per patch,
    MSE by default; no teacher.

    Args:
        patch_size: the student's patch side in pixels.
        in_chans: image channels.
        loss: regression loss.
        **hog_options: ``cell_size``, ``num_bins``, ``gaussian_weight``, ``pixel_std`` of :class:`HOGFeatures`.
    """

    def __init__(self, patch_size: int, in_chans: int, loss: str = "mse", **hog_options: Any) -> None:
        hog = HOGFeatures(patch_size, in_chans=in_chans, **hog_options)
        super().__init__(hog.dim, loss=loss, normalize=False)
        self.hog = hog

    def features(self, images: Tensor) -> Tensor:
        return self.hog(images)  # (B, L, dim)


class TeacherTarget(FeatureTarget):
    """MaskDistill's target: a frozen teacher's features of the whole image at each patch of the student's
    grid, LayerNorm-normalized without affine, smooth-L1 by default.

    The teacher is rebuilt from its spec when a model is created, so its weights are left out of the
    model's ``state_dict`` (checkpoints hold the student only) and not expected when loading one.

    Args:
        teacher: a frozen :class:`~mimkit.targets.Teacher`.
        grid: the student's (grid_h, grid_w) patch grid.
        loss: regression loss.
        normalize: per-patch LayerNorm of the teacher's features.
    """

    def __init__(
        self, teacher: Teacher, grid: tuple[int, int], loss: str = "smooth_l1", normalize: bool = True
    ) -> None:
        super().__init__(teacher.dim, loss=loss, normalize=normalize)
        self.teacher = teacher
        self.grid = (int(grid[0]), int(grid[1]))
        keep_teacher_out_of_state_dict(self)

    def features(self, images: Tensor) -> Tensor:
        return self.teacher(images, self.grid)  # (B, L, D)
