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
milan                  a frozen teacher's features     none (the loss is cosine)   cosine
vqkd (BEiT v2)         the patch's VQ-KD code          one-hot over the codebook   cross-entropy
=====================  ==============================  ==========================  ===========
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.masking import MaskSpec
from mimkit.targets.hog import HOGFeatures
from mimkit.targets.pixel import LOSSES, masked_mean, patch_loss
from mimkit.targets.teachers import FeatureCache, LastOutput, Teacher, keep_teacher_out_of_state_dict


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
        self._last = LastOutput()

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalized images -> (B, L, dim) raw per-patch features."""
        raise NotImplementedError

    @torch.no_grad()
    def targets(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, dim) what the decoder must predict (no gradient reaches the extractor)."""
        cached = self._last.get(images)
        if cached is not None:
            return cached
        features = self.features(images).float()  # (B, L, dim)
        if self.normalize:
            features = F.layer_norm(features, (features.shape[-1],), eps=self.eps)  # zero mean, unit var per patch
        return self._last.put(images, features)

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
        cache: keep the teacher's features on disk (see :class:`~mimkit.targets.teachers.FeatureCache`).
    """

    def __init__(
        self,
        teacher: Teacher,
        grid: tuple[int, int],
        loss: str = "smooth_l1",
        normalize: bool = True,
        cache: FeatureCache | None = None,
    ) -> None:
        super().__init__(teacher.dim, loss=loss, normalize=normalize)
        self.teacher = teacher
        self.grid = (int(grid[0]), int(grid[1]))
        self.cache = cache
        keep_teacher_out_of_state_dict(self)

    def features(self, images: Tensor) -> Tensor:
        if self.cache is not None:
            return self.cache.get(images, lambda batch: self.teacher(batch, self.grid))  # (B, L, D)
        return self.teacher(images, self.grid)  # (B, L, D)


class TokenTarget(nn.Module):
    """BEiT v2's target: the code index of each hidden patch under a frozen VQ-KD tokenizer, predicted with
    cross-entropy over the codebook (the decoder's ``pred`` layer is the ``num_codes``-way classifier).

    The tokenizer is loaded from its file when a model is created, so its weights stay out of the
    model's ``state_dict``.

    Args:
        tokenizer: a trained :class:`~mimkit.targets.vqkd.VQKDTokenizer` on the student's patch grid.
        grid: the student's (grid_h, grid_w) patch grid.
        mean, std: the student's normalization, which must be the tokenizer's.

    Raises:
        ValueError: another grid or normalization than the tokenizer was trained with.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        grid: tuple[int, int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if tuple(tokenizer.grid) != tuple(grid):  # type: ignore[arg-type]
            raise ValueError(f"the tokenizer codes a {tuple(tokenizer.grid)} grid, the student has {tuple(grid)}")  # type: ignore[arg-type]
        config: dict[str, Any] = getattr(tokenizer, "config", {})
        for name, ours in (("mean", mean), ("std", std)):
            theirs = config.get(name)
            if ours is not None and theirs is not None and not torch.allclose(torch.tensor(ours), torch.tensor(theirs)):
                raise ValueError(
                    f"the student's images are normalized with {name} {tuple(ours)}, the tokenizer's with "
                    f"{tuple(theirs)}; set data.{name} to match"
                )
        tokenizer.requires_grad_(False)
        self.tokenizer = tokenizer.eval()
        self.dim = int(tokenizer.num_codes)  # type: ignore[arg-type]
        self.grid = (int(grid[0]), int(grid[1]))
        self._last = LastOutput()
        keep_teacher_out_of_state_dict(self, "tokenizer")

    def train(self, mode: bool = True) -> TokenTarget:
        super().train(mode)
        self.tokenizer.eval()  # the frozen tokenizer never updates its codebook
        return self

    @torch.no_grad()
    def targets(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L) int64 code of every patch."""
        cached = self._last.get(images)
        if cached is not None:
            return cached
        return self._last.put(images, self.tokenizer.tokenize(images))  # type: ignore[operator]

    def forward(self, images: Tensor, pred: Tensor, mask: MaskSpec) -> Tensor:
        """Cross-entropy of the (B, L, num_codes) logits against the codes, averaged over hidden patches."""
        codes = self.targets(images)  # (B, L)
        per_patch = F.cross_entropy(pred.transpose(1, 2).float(), codes, reduction="none")  # (B, L)
        return masked_mean(per_patch, mask.mask)
