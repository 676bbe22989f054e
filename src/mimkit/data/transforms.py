"""Batched augmentation of uint8 image batches on their own device (CPU or GPU).

In-memory square data sets (Fashion-MNIST, evaluation views) hold uint8 squares; these transforms turn a
whole batch into normalized float32 in a few tensor operations, so a 2-core machine spends its time on the
model, not on per-image Python. Photos are cropped per sample from their originals
(:class:`~mimkit.data.crops.CropDataset`) and only normalized here (:class:`Normalize`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)


def default_normalization(in_chans: int, dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of pixels in [0, 1]) for a data set.

    * ``fashion_mnist``: its training-set statistics, 0.2860 and 0.3530, repeated when ``in_chans`` is 3.
    * ``folder`` with 3 channels: ImageNet's mean and std, the usual choice for natural photos.
    * ``folder`` with 1 channel: 0.5 and 0.5 (maps [0, 1] to [-1, 1]); gray folders (scans, sketches,
      X-rays) have no common statistics, so this neutral choice assumes none. Override with
      ``data.mean``/``data.std`` when the statistics are known.

    Args:
        in_chans: 1 or 3.
        dataset: ``"fashion_mnist"``, ``"folder"`` or ``"shards"`` (as ``"folder"``).

    Returns:
        (mean, std), each a tuple of ``in_chans`` floats.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if dataset == "fashion_mnist":
        return FASHION_MNIST_MEAN * in_chans, FASHION_MNIST_STD * in_chans
    if dataset in ("folder", "shards"):
        return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GRAY_MEAN, GRAY_STD)
    raise ValueError(f"unknown dataset {dataset!r}; choose 'fashion_mnist', 'folder' or 'shards'")


def _channel_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must be non-empty and of equal length")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _check_channels(images: Tensor, mean: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (0..255), got {images.dtype}")
    if mean.numel() not in (1, images.shape[1]):
        raise ValueError(f"{mean.numel()} normalization channels for images with {images.shape[1]} channels")


def _normalize_uint8_scale(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """In place: float pixels in 0..255 to ``(x / 255 - mean) / std``."""
    scale = (1.0 / (255.0 * std)).to(images.device).view(1, -1, 1, 1)
    shift = (-mean / std).to(images.device).view(1, -1, 1, 1)
    return images.mul_(scale).add_(shift)


def random_resized_crop_params(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> Tensor:
    """Crop boxes with torchvision's ``RandomResizedCrop.get_params`` semantics, for a whole batch.

    Per image: up to ``attempts`` draws of an area fraction (uniform in ``scale``) and an aspect ratio
    (log-uniform in ``ratio``); the first draw whose rounded box fits is placed uniformly at random. If
    none fits, the central crop of the largest box with an aspect ratio clamped to ``ratio``.

    Args:
        batch: number of images.
        height, width: image size.
        scale: range of the crop area as a fraction of the image.
        ratio: range of the crop aspect ratio (width / height).
        generator: source of randomness; draws happen on its device (CPU when None).
        attempts: draws before the central fallback.

    Returns:
        (B, 4) int64 boxes ``(top, left, crop_height, crop_width)`` on the generator's device.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand(batch, 2 * attempts + 2, generator=generator, device=device, dtype=torch.float64)
    u_scale, u_ratio, u_top, u_left = draws[:, :attempts], draws[:, attempts:-2], draws[:, -2], draws[:, -1]
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u_scale)  # (B, A)
    aspect = torch.exp(log_low + (log_high - log_low) * u_ratio)  # (B, A)
    widths = torch.round(torch.sqrt(target_area * aspect))  # (B, A), half to even like Python's round
    heights = torch.round(torch.sqrt(target_area / aspect))
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)  # (B, A)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1) index of the first fitting draw
    found = fits.any(dim=1)  # (B,)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    crop_w = torch.where(found, widths.gather(1, first).squeeze(1), float(fallback_w))  # (B,)
    crop_h = torch.where(found, heights.gather(1, first).squeeze(1), float(fallback_h))
    top = torch.where(found, torch.floor(u_top * (height - crop_h + 1)), float((height - fallback_h) // 2))
    left = torch.where(found, torch.floor(u_left * (width - crop_w + 1)), float((width - fallback_w) // 2))
    return torch.stack((top, left, crop_h, crop_w), dim=1).to(torch.int64)  # (B, 4)


def resized_crop(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop each image to its box and resize it to ``size x size`` (bilinear), optionally mirrored.

    One ``grid_sample`` for the batch. Sampling positions are those of
    ``F.interpolate(crop, size, mode="bilinear", align_corners=False)``; at crop borders the neighbours
    outside the crop are blended in rather than repeating the border pixel, and image borders are
    clamped. Downscaling is not antialiased, which is fine for random-resized crops of images stored
    at (or near) the output size.

    Args:
        images: (B, C, H, W) float.
        boxes: (B, 4) ``(top, left, crop_height, crop_width)`` in pixels, any device.
        size: output side.
        flip: (B,) bool, mirror those outputs horizontally.

    Returns:
        (B, C, size, size) float on ``images.device``.
    """
    batch, _, height, width = images.shape
    boxes = boxes.to(torch.float64)
    top, left, crop_h, crop_w = boxes.unbind(dim=1)  # each (B,)
    centers = (torch.arange(size, dtype=torch.float64, device=boxes.device) + 0.5) / size  # (S,) in (0, 1)
    # Pixel x = left + centers * crop_w - 0.5, normalized for align_corners=False as (2x + 1) / W - 1.
    grid_x = (2 * left[:, None] + 2 * centers[None] * crop_w[:, None]) / width - 1  # (B, S)
    grid_y = (2 * top[:, None] + 2 * centers[None] * crop_h[:, None]) / height - 1  # (B, S)
    if flip is not None:
        grid_x = torch.where(flip.to(boxes.device)[:, None], grid_x.flip(1), grid_x)
    grid_x = grid_x.to(device=images.device, dtype=images.dtype)
    grid_y = grid_y.to(device=images.device, dtype=images.dtype)
    grid = torch.stack(
        (grid_x[:, None, :].expand(batch, size, size), grid_y[:, :, None].expand(batch, size, size)), dim=-1
    )  # (B, S, S, 2) as (x, y)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class MAEAugment:
    """MAE's pretraining augmentation for a uint8 batch: RandomResizedCrop, horizontal flip, normalize.

    Crop boxes follow torchvision's sampling (see :func:`random_resized_crop_params`), drawn
    independently per image; the whole batch is then cropped, resized and flipped by one
    ``grid_sample`` on the images' device.

    Args:
        img_size: output side.
        scale: crop area range, as a fraction of the input image.
        ratio: crop aspect-ratio range (width / height).
        hflip: mirror each image with probability 0.5.
        mean, std: per-channel normalization of pixels in [0, 1] (one value broadcasts to all channels);
            see :func:`default_normalization`.
    """

    def __init__(
        self,
        img_size: int,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mean: Sequence[float] = GRAY_MEAN,
        std: Sequence[float] = GRAY_STD,
    ) -> None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {tuple(ratio)}")
        self.img_size = img_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.mean, self.std = _channel_stats(mean, std)

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, *, part: tuple[int, int] | None = None
    ) -> Tensor:
        """Augment a batch.

        Args:
            images: (B, C, H, W) uint8 on any device.
            generator: source of the crop and flip draws (made on its device, then moved); the global
                RNG when None. The same generator state gives the same output.
            part: ``(offset, total)``: these images are rows ``offset .. offset + B`` of a batch of ``total``
                (one rank's share of a distributed batch). The draws are made for all ``total`` rows and
                this part's rows used, so N ranks augment exactly as one process does the whole batch.

        Returns:
            (B, C, img_size, img_size) float32 normalized, on ``images.device``.
        """
        _check_channels(images, self.mean)
        batch, _, height, width = images.shape
        offset, total = (0, batch) if part is None else part
        if not 0 <= offset <= total - batch:
            raise ValueError(f"part {part} does not hold {batch} rows")
        rows = slice(offset, offset + batch)
        boxes = random_resized_crop_params(total, height, width, self.scale, self.ratio, generator)[rows]  # (B, 4)
        flip = None
        if self.hflip:
            flip = (torch.rand(total, generator=generator, device=boxes.device) < 0.5)[rows]  # (B,)
        out = resized_crop(images.float(), boxes, self.img_size, flip)  # (B, C, S, S) in 0..255
        return _normalize_uint8_scale(out, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"MAEAugment(img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
            f"mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())})"
        )


class Normalize:
    """Normalization of a uint8 batch whose crops were already made per sample (by
    :class:`~mimkit.data.crops.CropDataset`); takes the arguments of :class:`MAEAugment` and ignores the
    random ones, so the training loop calls either the same way.

    Args:
        mean, std: per-channel normalization of pixels in [0, 1].
    """

    def __init__(self, mean: Sequence[float] = GRAY_MEAN, std: Sequence[float] = GRAY_STD) -> None:
        self.mean, self.std = _channel_stats(mean, std)

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, *, part: tuple[int, int] | None = None
    ) -> Tensor:
        """Args: images (B, C, H, W) uint8. Returns: (B, C, H, W) float32 normalized on their device."""
        _check_channels(images, self.mean)
        return _normalize_uint8_scale(images.float(), self.mean, self.std)

    def __repr__(self) -> str:
        return f"Normalize(mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())})"


class EvalTransform:
    """Deterministic evaluation transform: center square, resize (bilinear, antialiased), normalize.

    Args:
        img_size: output side.
        mean, std: per-channel normalization of pixels in [0, 1].
    """

    def __init__(self, img_size: int, mean: Sequence[float] = GRAY_MEAN, std: Sequence[float] = GRAY_STD) -> None:
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.img_size = img_size
        self.mean, self.std = _channel_stats(mean, std)

    def __call__(self, images: Tensor) -> Tensor:
        """Args: images (B, C, H, W) uint8. Returns: (B, C, img_size, img_size) float32 normalized."""
        _check_channels(images, self.mean)
        height, width = images.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        out = images[..., top : top + side, left : left + side].float()  # (B, C, side, side)
        if side != self.img_size:
            out = F.interpolate(
                out, size=(self.img_size, self.img_size), mode="bilinear", antialias=True, align_corners=False
            )
        return _normalize_uint8_scale(out, self.mean, self.std)

    def __repr__(self) -> str:
        mean, std = tuple(self.mean.tolist()), tuple(self.std.tolist())
        return f"EvalTransform(img_size={self.img_size}, mean={mean}, std={std})"


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo normalization for pictures: ``x * std + mean``, clamped to [0, 1].

    Args:
        images: (..., C, H, W) normalized float.
        mean, std: the normalization used (one value broadcasts to all channels).

    Returns:
        Same shape, float in [0, 1].
    """
    mean_t, std_t = _channel_stats(mean, std)
    mean_t = mean_t.to(device=images.device, dtype=images.dtype).view(-1, 1, 1)
    std_t = std_t.to(device=images.device, dtype=images.dtype).view(-1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)
