"""What every teacher shares: the :class:`Teacher` base, the resampling of its features to the student's
grid, the cache of its last output and the hooks that keep a frozen network out of a student's checkpoint.

A :class:`Teacher` maps images normalized the way the student sees them to one feature vector per patch
of the student's grid, ``(B, C, H, W) -> (B, L, D)``. It undoes the student's normalization, adapts the
channels (gray is repeated to RGB, RGB becomes luma for a gray teacher), resizes to its own input size
(bilinear, antialiased), applies its own normalization, takes one stage's feature map ``(B, D, h, w)`` and
resamples that to the student's grid (see :func:`resample_to_grid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ITU-R 601 luma weights (PIL's convert("L")), for RGB students of a gray teacher.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def resample_to_grid(feature_map: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resample a feature map to the student's patch grid.

    The map is kept as it is when it already has the grid's size; it is average-pooled with
    ``F.adaptive_avg_pool2d`` when it is at least as large in both directions (exact block means when the
    sides are multiples of the grid's, overlapping windows otherwise); else (smaller in a direction) it is
    interpolated bilinearly (``align_corners=False``).

    Args:
        feature_map: (B, D, h, w).
        grid: (grid_h, grid_w).

    Returns:
        (B, D, grid_h, grid_w).
    """
    height, width = feature_map.shape[-2:]
    if (height, width) == tuple(grid):
        return feature_map
    if height >= grid[0] and width >= grid[1]:
        return F.adaptive_avg_pool2d(feature_map, grid)
    return F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)


def _channel_stats(values: Sequence[float], name: str) -> Tensor:
    stats = torch.as_tensor([float(value) for value in values], dtype=torch.float32)
    if stats.ndim != 1 or stats.numel() not in (1, 3):
        raise ValueError(f"{name} must hold 1 or 3 values (one per channel), got {list(values)}")
    return stats.view(1, -1, 1, 1)  # (1, C, 1, 1)


class LastOutput:
    """The output for the last images seen, so a second use of the same batch (a teacher-guided mask, BEiT
    v2's class-token head) does not run a teacher or tokenizer again. Keyed on the tensor itself, its
    version counter and an optional extra key."""

    def __init__(self) -> None:
        self.images: Tensor | None = None
        self.version = -1
        self.key: Any = None
        self.output: Tensor | None = None

    def get(self, images: Tensor, key: Any = None) -> Tensor | None:
        if self.images is images and images._version == self.version and self.key == key:
            return self.output
        return None

    def put(self, images: Tensor, output: Tensor, key: Any = None) -> Tensor:
        self.images, self.version, self.key, self.output = images, images._version, key, output
        return output


class Teacher(nn.Module):
    """A frozen network giving per-patch features on the student's grid; subclasses give :meth:`feature_map`.

    The teacher is always in eval mode (:meth:`train` keeps it there), its parameters do not require
    gradients, and :meth:`forward` runs under ``torch.no_grad()``.

    Args:
        backbone: the network; frozen here.
        dim: feature width D of :meth:`feature_map`.
        input_size: side of the square images the backbone sees.
        in_chans: channels the backbone expects (1 or 3).
        teacher_mean, teacher_std: the backbone's own normalization of [0, 1] pixels (1 or 3 values each).
        student_mean, student_std: the normalization of the images given to :meth:`forward`.

    Attributes:
        dim: D.
        input_size: side of the backbone's input.
    """

    backbone: nn.Module
    student_mean: Tensor  # (1, C, 1, 1), C = 1 or 3; likewise the three below
    student_std: Tensor
    teacher_mean: Tensor
    teacher_std: Tensor
    luma: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int,
        input_size: int,
        in_chans: int,
        teacher_mean: Sequence[float],
        teacher_std: Sequence[float],
        student_mean: Sequence[float],
        student_std: Sequence[float],
    ) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"teacher in_chans must be 1 or 3, got {in_chans}")
        if input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.backbone = backbone
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.in_chans = in_chans
        self.register_buffer("student_mean", _channel_stats(student_mean, "student_mean"), persistent=False)
        self.register_buffer("student_std", _channel_stats(student_std, "student_std"), persistent=False)
        self.register_buffer("teacher_mean", _channel_stats(teacher_mean, "teacher_mean"), persistent=False)
        self.register_buffer("teacher_std", _channel_stats(teacher_std, "teacher_std"), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        if self.student_mean.shape != self.student_std.shape:
            raise ValueError(f"student_mean {list(student_mean)} and student_std {list(student_std)} differ in length")
        self.requires_grad_(False)
        super().train(False)
        self._last = LastOutput()

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode whatever ``mode`` says (batch-norm statistics and dropout stay frozen)."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Student-normalized images to the backbone's input.

        Args:
            images: (B, C, H, W) normalized with the student's mean and std, C = 1 or 3.

        Returns:
            (B, in_chans, input_size, input_size) normalized the teacher's way.
        """
        channels = images.shape[1]
        if channels != self.student_mean.shape[1] and self.student_mean.shape[1] != 1:
            raise ValueError(
                f"images have {channels} channels but the student normalization has {self.student_mean.shape[1]}"
            )
        pixels = images.float() * self.student_std + self.student_mean  # (B, C, H, W) in [0, 1]
        if channels == 1 and self.in_chans == 3:
            pixels = pixels.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        elif channels == 3 and self.in_chans == 1:
            pixels = (pixels * self.luma).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        elif channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {channels}")
        if pixels.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (pixels - self.teacher_mean) / self.teacher_std  # (B, in_chans, S, S)

    def feature_map(self, inputs: Tensor) -> Tensor:
        """The chosen stage's features of preprocessed inputs: (B, in_chans, S, S) -> (B, D, h, w)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Per-patch teacher features of the student's images.

        Args:
            images: (B, C, H, W) normalized with the student's mean and std (C = 1 or 3).
            grid: the student's (grid_h, grid_w) patch grid.

        Returns:
            (B, L, D) features, L = grid_h * grid_w in raster order.
        """
        cached = self._last.get(images, tuple(grid))
        if cached is not None:  # the same batch again (e.g. a teacher-guided mask, then the loss)
            return cached
        feature_map = resample_to_grid(self.feature_map(self.preprocess(images)), grid)  # (B, D, grid_h, grid_w)
        return self._last.put(images, feature_map.flatten(2).transpose(1, 2), tuple(grid))  # (B, L, D)

    @torch.no_grad()
    def saliency(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """How much each patch matters to the teacher, for semantic-aware masking (MILAN): (B, L) >= 0.

        A transformer teacher gives its class token's attention over the patches (last block, head
        average); this default, for convolutional teachers, is the L2 norm of each patch's feature
        vector (an activation map, as class-agnostic CAMs use).
        """
        return self(images, grid).norm(dim=-1)  # (B, L)


def keep_teacher_out_of_state_dict(module: nn.Module, attribute: str = "teacher") -> None:
    """Leave ``module.<attribute>``'s weights (a frozen teacher or tokenizer, rebuilt from its spec or file)
    out of ``module.state_dict()`` and do not expect them in ``load_state_dict``: checkpoints hold the
    student only."""
    prefix = attribute + "."

    def drop(module: nn.Module, state_dict: dict[str, Any], module_prefix: str, local_metadata: Any) -> None:
        for key in [key for key in state_dict if key.startswith(module_prefix + prefix)]:
            del state_dict[key]

    def not_missing(module: nn.Module, incompatible_keys: Any) -> None:
        frozen = getattr(module, attribute, None)
        if frozen is None:
            return
        names = tuple(prefix + key for key in frozen.state_dict(keep_vars=True))
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if not key.endswith(names)]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(not_missing)
