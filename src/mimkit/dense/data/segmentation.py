"""Semantic-segmentation data: a folder of images with class-index PNG masks of the same stem, in one of
three layouts:

* mimkit / shapes: ``images/`` and ``masks/``;
* Pascal VOC: ``JPEGImages/`` and ``SegmentationClass/`` (palette PNGs; 255 marks object borders, ignored);
* ADE20K: ``images/<split>/`` and ``annotations/<split>/`` (class 0 is "other": pass ``reduce_zero_label``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

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
