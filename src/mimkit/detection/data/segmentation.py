"""Semantic segmentation: class-mask folders, a UperNet head on the multi-scale backbones, mIoU.

Data: a folder of images with class-index PNG masks of the same stem, in one of three layouts:

* mimkit / shapes: ``images/`` and ``masks/``;
* Pascal VOC: ``JPEGImages/`` and ``SegmentationClass/`` (palette PNGs; 255 marks object borders, ignored);
* ADE20K: ``images/<split>/`` and ``annotations/<split>/`` (class 0 is "other": pass ``reduce_zero_label``).

The head (Xiao et al., UperNet, 2018): a pyramid pooling module on the coarsest level, an FPN
top-down path, and the fusion of all levels at the finest one, then a per-pixel classifier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mimkit.data.folder import IMAGE_EXTENSIONS, load_image

IGNORE_INDEX = 255
LAYOUTS = (("images", "masks"), ("JPEGImages", "SegmentationClass"))


def find_layout(root: Path, split: str | None = None) -> tuple[Path, Path]:
    """The (images, masks) folders of a segmentation folder (see the module docstring)."""
    candidates = list(LAYOUTS)
    if split is not None:
        candidates.insert(0, (f"images/{split}", f"annotations/{split}"))
    for images, masks in candidates:
        if (root / images).is_dir() and (root / masks).is_dir():
            return root / images, root / masks
    names = ", ".join(f"{images}/ + {masks}/" for images, masks in candidates)
    raise FileNotFoundError(f"{root} holds no segmentation layout: expected {names}")


class SegmentationFolder(torch.utils.data.Dataset):
    """Images and their class-index masks, resized to ``img_size`` (bilinear / nearest).

    Args:
        root: the folder.
        img_size: side of the square the images and masks are resized to.
        in_chans: 1 or 3.
        split: ADE20K's split folder name (``training``, ``validation``).
        reduce_zero_label: label 0 becomes ignored and the others shift down by one (ADE20K).

    Attributes:
        pairs: (image, mask) paths; images without a mask are skipped and counted in ``num_unpaired``.

    Each item is (image (C, S, S) uint8, mask (S, S) int64 with :data:`IGNORE_INDEX` for ignored pixels).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        img_size: int,
        in_chans: int = 3,
        split: str | None = None,
        reduce_zero_label: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"segmentation data folder {self.root} does not exist")
        image_dir, mask_dir = find_layout(self.root, split)
        masks = {path.stem: path for path in mask_dir.glob("*.png")}
        images = sorted(path for path in image_dir.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
        self.pairs = [(path, masks[path.stem]) for path in images if path.stem in masks]
        self.num_unpaired = len(images) - len(self.pairs)
        if not self.pairs:
            raise ValueError(f"no image in {image_dir} has a mask of the same name in {mask_dir}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def mask(self, index: int) -> Tensor:
        """The (S, S) int64 label map of one image."""
        with Image.open(self.pairs[index][1]) as opened:
            if opened.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"{self.pairs[index][1]} is a {opened.mode} image, not a class-index PNG (L or P mode)"
                )
            labels = np.asarray(opened).astype(np.int64)
        mask = torch.from_numpy(labels)
        if self.reduce_zero_label:
            mask = torch.where(mask == 0, IGNORE_INDEX, mask - 1)
            mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
        size = (self.img_size, self.img_size)
        if tuple(mask.shape) != size:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = torch.from_numpy(load_image(self.pairs[index][0], self.in_chans))  # (C, H, W) uint8
        size = (self.img_size, self.img_size)
        if tuple(image.shape[1:]) != size:
            image = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            image = image[0].round().clamp(0, 255).to(torch.uint8)
        return image, self.mask(index)

    def max_label(self) -> int:
        """The largest class index in the masks (ignored pixels not counted)."""
        highest = 0
        for index in range(len(self)):
            mask = self.mask(index)
            valid = mask[mask != IGNORE_INDEX]
            if valid.numel():
                highest = max(highest, int(valid.max()))
        return highest


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class UperNetHead(nn.Module):
    """UperNet: pyramid pooling on the coarsest level, FPN top-down fusion, all levels fused at the finest.

    Args:
        in_channels: channels of the backbone levels, finest first.
        channels: width of the head.
        num_classes: output classes.
        pool_scales: output sides of the pyramid pooling module.
    """

    def __init__(
        self, in_channels: Sequence[int], channels: int, num_classes: int, pool_scales: Sequence[int] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        top = in_channels[-1]
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_norm_relu(top, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = _conv_norm_relu(top + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_conv_norm_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_norm_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = _conv_norm_relu(len(in_channels) * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Levels (B, C_i, H_i, W_i), finest first -> logits (B, num_classes, H_0, W_0)."""
        top = features[-1]
        pooled = [
            F.interpolate(pool(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for pool in self.pools
        ]
        maps = [lateral(x) for lateral, x in zip(self.laterals, features[:-1], strict=True)]
        maps.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))  # (B, channels, H_top, W_top)
        for level in range(len(maps) - 1, 0, -1):  # top-down: coarse context into finer levels
            size = maps[level - 1].shape[-2:]
            maps[level - 1] = maps[level - 1] + F.interpolate(
                maps[level], size=size, mode="bilinear", align_corners=False
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, maps[:-1], strict=True)] + [maps[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs], dim=1)
        return self.classifier(self.fuse(fused))


class Segmenter(nn.Module):
    """A multi-scale backbone and a :class:`UperNetHead`; normalizes [0, 1] images itself.

    Args:
        body: a backbone of :mod:`mimkit.detection.models.backbones` (``channels``, ordered dict of levels).
        num_classes: output classes.
        channels: width of the head.
        mean, std: per-channel normalization of the encoder's pretraining.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, body: nn.Module, num_classes: int, *, channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.body = body
        self.head = UperNetHead(list(body.channels), channels, num_classes)  # type: ignore[arg-type]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, num_classes, H, W) logits."""
        features: OrderedDict[str, Tensor] = self.body((images - self.mean) / self.std)
        logits = self.head(list(features.values()))  # (B, K, H_0, W_0)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts, rows = true class, columns = predicted, over pixels whose label is not ignored."""
    valid = labels != IGNORE_INDEX
    index = labels[valid] * num_classes + predictions[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: Tensor) -> tuple[Tensor, float, float]:
    """Per-class IoU (NaN for a class absent from both labels and predictions), mIoU over the classes
    present, and pixel accuracy, in percent."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan"))) * 100
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else 0.0
    accuracy = float(hits.sum() / confusion.sum().clamp(min=1) * 100)
    return iou, miou, accuracy
