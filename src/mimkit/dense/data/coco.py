"""COCO-format detection folders through pycocotools, with bad annotations reported and skipped.

A folder is ``images/`` (or images at the paths the JSON names, relative to the folder) plus an instances
JSON: ``annotations.json`` at the top, or the one ``annotations/instances_*.json``. Annotations that cannot
be a training target are skipped and counted, never a crash (:class:`AnnotationReport`): a box missing,
degenerate or not inside its image, an unknown category, a mask that decodes to no pixel, and (when masks
are used) an object without a segmentation. Crowd regions (``iscrowd: 1``) are never training targets; those
with a valid box (and mask) are kept beside the targets as ignore regions, which COCO's evaluation does not
count against a detector (counted as ``crowd``). An image file that is missing or cannot be decoded is
skipped with all its annotations. Masks are checked through their run-length encoding, not decoded, at load.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.data.folder import BadImageError, check_image_header, load_image

log = logging.getLogger(__name__)

BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border (rounding in exporters) before it is "outside"
MAX_EXAMPLES = 5  # skipped annotations named per reason in the report

SKIP_REASONS = {
    "no_box": "box missing or not 4 numbers",
    "empty_box": "box with zero or negative width or height",
    "box_outside_image": "box not inside the image",
    "unknown_category": "category not in the categories list",
    "no_mask": "no segmentation (masks are used)",
    "empty_mask": "mask with no pixel",
    "bad_mask": "segmentation that cannot be decoded",
    "crowd": "crowd region (not a training target; an ignore region when scoring)",
    "missing_image": "annotation of an image that is not listed or not readable",
}


@dataclass
class AnnotationReport:
    """What was kept and what was skipped, by reason (keys of :data:`SKIP_REASONS`).

    Attributes:
        num_images: images kept.
        num_annotations: annotations kept as targets.
        skipped: reason -> count of skipped annotations.
        skipped_images: image files missing or unreadable.
        examples: reason -> up to :data:`MAX_EXAMPLES` ``"ann <id> (<file>)"`` strings.
    """

    num_images: int = 0
    num_annotations: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_images: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    @property
    def num_skipped(self) -> int:
        return sum(count for reason, count in self.skipped.items() if reason != "crowd")

    def summary(self) -> str:
        """One line per reason, e.g. ``skipped 2 of 40 annotations: 1 box not inside the image (ann 7 (a.png))``."""
        total = self.num_annotations + sum(self.skipped.values())
        lines = [f"kept {self.num_annotations} of {total} annotations on {self.num_images} images"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count}: {SKIP_REASONS[reason]} (e.g. {', '.join(self.examples[reason])})")
        if self.skipped_images:
            shown = ", ".join(self.skipped_images[:MAX_EXAMPLES])
            lines.append(f"  skipped {len(self.skipped_images)} image(s) missing or unreadable: {shown}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "num_annotations": self.num_annotations,
            "skipped": dict(self.skipped),
            "skipped_images": list(self.skipped_images),
        }


def find_annotations(root: Path) -> Path:
    """The instances JSON of a COCO folder: ``annotations.json`` or the single ``annotations/instances_*.json``."""
    if (root / "annotations.json").is_file():
        return root / "annotations.json"
    candidates = sorted((root / "annotations").glob("instances_*.json")) if (root / "annotations").is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(path.name for path in candidates)
        raise FileNotFoundError(f"{root}/annotations holds several instances files ({names}); pass one explicitly")
    raise FileNotFoundError(
        f"no annotation file in {root}: expected {root}/annotations.json or {root}/annotations/instances_*.json "
        "(COCO instances format); import Pascal-VOC XML with `mimkit detect-import-voc`"
    )


def _load_coco(path: Path) -> Any:
    """A pycocotools ``COCO`` index of the file, with a readable error for files that are not COCO instances."""
    from pycocotools.coco import COCO

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO instances file: it needs 'images', 'annotations', 'categories' lists")
    for key in ("annotations", "categories"):
        if not isinstance(data.setdefault(key, []), list):
            raise ValueError(f"{path}: '{key}' must be a list")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _valid_box(bbox: Any) -> list[float] | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a (H, W) bool mask, JSON-ready (``counts`` as a string)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as one compressed RLE.

    Raises:
        ValueError: it is none of those, or malformed.
    """
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segmentation, list):  # polygons: lists of x, y, x, y, ... with at least 3 points
            polygons = [poly for poly in segmentation if isinstance(poly, list) and len(poly) >= 6]
            if not polygons:
                return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict):
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            if not isinstance(rle["counts"], bytes):
                raise ValueError(f"RLE counts of type {type(rle['counts']).__name__}")
        else:
            raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")
        size = [int(v) for v in rle["size"]]
    except (KeyError, TypeError, ValueError, IndexError, UnicodeEncodeError) as err:
        raise ValueError(str(err)) from None
    if size != [height, width]:
        raise ValueError(f"mask of size {size} for an image of size {[height, width]}")
    if isinstance(segmentation, dict):  # user-written run lengths: pycocotools' C code trusts them
        runs = run_lengths(rle["counts"])
        if min(runs, default=0) < 0 or sum(runs) != height * width:
            raise ValueError(f"RLE runs cover {sum(runs)} pixels, not the image's {height * width}")
    return rle


def run_lengths(counts: bytes) -> list[int]:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``, in Python).

    Each run is a little-endian base-32 number in characters from ``'0'``; bit 0x20 continues it, bit 0x10
    of its last character is the sign; from the third run on, each is stored as a difference to the run two
    before.

    Raises:
        ValueError: a character outside the alphabet, or a number cut off at the end of the string.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("RLE string ends inside a run length")
            char = counts[position] - 48
            if not 0 <= char < 64:
                raise ValueError(f"RLE string has a character outside its alphabet: {chr(counts[position])!r}")
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _decode(rle: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools' Cython decoder predates NumPy 2's __array__(copy=) protocol
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return mask_utils.decode(rle).astype(np.uint8)
        except (TypeError, ValueError) as err:
            raise ValueError(str(err)) from None


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as a (H, W) uint8 mask.

    Raises:
        ValueError: it cannot be decoded.
    """
    return _decode(_to_rle(segmentation, height, width))


@dataclass
class _Record:
    """One kept image: its file, the annotations kept as targets and its valid crowd regions."""

    image_id: int
    path: Path
    height: int
    width: int
    annotations: list[dict[str, Any]]
    crowds: list[dict[str, Any]] = field(default_factory=list)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format folder as (image, target) pairs for torchvision's detection models.

    Images are resized to ``img_size`` x ``img_size`` (boxes and masks scaled with them) so that a ViT with
    a fixed patch grid sees every image whole; evaluation (:func:`~mimkit.dense.evaluation.coco_ap.coco_evaluate`)
    runs at that resolution.

    Args:
        root: the folder (layout in the module docstring).
        annotations: the instances JSON (default: :func:`find_annotations`).
        img_size: side the images are resized to (None: kept as they are).
        in_chans: 1 (luminance) or 3 (RGB).
        masks: decode instance masks (Mask R-CNN); False for box-only sets (e.g. imported VOC).

    Attributes:
        report: the :class:`AnnotationReport` of what was kept and skipped.
        classes: category names; label ``k`` (1-based, 0 = background) is ``classes[k - 1]``.
        category_ids: COCO category id of each label (``category_ids[k - 1]``).

    Each item is ``(image, target)``: image (C, S, S) uint8, target ``boxes`` (N, 4) float xyxy in pixels,
    ``labels`` (N,) int64 in 1..K, ``masks`` (N, S, S) uint8 (when ``masks``), ``image_id`` int.
    """

    def __init__(
        self,
        root: str | Path,
        annotations: str | Path | None = None,
        *,
        img_size: int | None = None,
        in_chans: int = 3,
        masks: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"detection data folder {self.root} does not exist")
        self.annotation_file = Path(annotations) if annotations is not None else find_annotations(self.root)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"annotation file {self.annotation_file} does not exist")
        self.img_size = img_size
        self.in_chans = in_chans
        self.masks = masks
        coco = _load_coco(self.annotation_file)
        categories = sorted(coco.dataset["categories"], key=lambda cat: cat["id"])
        if not categories:
            raise ValueError(f"{self.annotation_file} lists no categories")
        self.category_ids = [int(cat["id"]) for cat in categories]
        self.classes = [str(cat.get("name", cat["id"])) for cat in categories]
        self._label_of = {cat_id: index + 1 for index, cat_id in enumerate(self.category_ids)}
        self.report = AnnotationReport()
        self.records = self._scan(coco)
        self.report.num_images = len(self.records)
        self.report.num_annotations = sum(len(record.annotations) for record in self.records)
        if self.report.num_skipped or self.report.skipped_images:
            log.warning("%s: %s", self.annotation_file, self.report.summary())
        if not self.records:
            raise ValueError(f"{self.annotation_file}: no readable image; {self.report.summary()}")

    def _image_path(self, file_name: str) -> Path:
        for candidate in (self.root / "images" / file_name, self.root / file_name):
            if candidate.is_file():
                return candidate
        return self.root / "images" / file_name

    def _scan(self, coco: Any) -> list[_Record]:
        records = []
        listed = set(coco.imgs)
        for ann in coco.dataset["annotations"]:
            if ann.get("image_id") not in listed:
                self.report.skip("missing_image", f"ann {ann.get('id')} (image {ann.get('image_id')})")
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            path = self._image_path(str(info.get("file_name", "")))
            anns = coco.imgToAnns.get(image_id, [])
            try:
                check_image_header(path)
            except BadImageError:
                self.report.skipped_images.append(str(info.get("file_name")))
                for ann in anns:
                    self.report.skip("missing_image", f"ann {ann.get('id')} ({path.name})")
                continue
            height, width = int(info.get("height", 0)), int(info.get("width", 0))
            if height <= 0 or width <= 0:  # sizes the JSON does not give are read from the file
                from PIL import Image

                with Image.open(path) as opened:
                    width, height = opened.size
            kept, crowds = [], []
            for ann in anns:
                reason = self._problem(ann, height, width)
                if ann.get("iscrowd", 0):
                    self.report.skip("crowd", f"ann {ann.get('id')} ({path.name})")
                    if reason is None:
                        crowds.append(ann)
                elif reason is not None:
                    self.report.skip(reason, f"ann {ann.get('id')} ({path.name})")
                else:
                    kept.append(ann)
            records.append(_Record(int(image_id), path, height, width, kept, crowds))
        return records

    def _problem(self, ann: dict[str, Any], height: int, width: int) -> str | None:
        """Why ``ann`` cannot be a target (a key of :data:`SKIP_REASONS`), or None."""
        from pycocotools import mask as mask_utils

        box = _valid_box(ann.get("bbox"))
        reason = None
        if ann.get("category_id") not in self._label_of:
            reason = "unknown_category"
        elif box is None:
            reason = "no_box"
        elif box[2] <= 0 or box[3] <= 0:
            reason = "empty_box"
        elif (
            box[0] < -BOX_TOLERANCE
            or box[1] < -BOX_TOLERANCE
            or box[0] + box[2] > width + BOX_TOLERANCE
            or box[1] + box[3] > height + BOX_TOLERANCE
        ):
            reason = "box_outside_image"
        elif self.masks:
            segmentation = ann.get("segmentation")
            if not segmentation:
                reason = "no_mask"
            else:
                try:
                    rle = _to_rle(segmentation, height, width)
                    area = int(mask_utils.area(rle))  # from the run lengths: no pixel is decoded here
                except (ValueError, TypeError):
                    reason = "bad_mask"
                else:
                    if area == 0:
                        reason = "empty_mask"
        return reason

    def __len__(self) -> int:
        return len(self.records)

    def target(self, index: int) -> dict[str, Tensor]:
        """The target of one image at the dataset's resolution (see the class docstring)."""
        record = self.records[index]
        target = self._instances(record, record.annotations)
        target["image_id"] = torch.tensor(record.image_id)
        return target

    def crowd_regions(self, index: int) -> dict[str, Tensor]:
        """The valid crowd regions of one image at the dataset's resolution, as ``boxes``, ``labels`` and
        (with masks) ``masks`` like :meth:`target`; never trained on, scored as ignore regions."""
        record = self.records[index]
        return self._instances(record, record.crowds)

    def _instances(self, record: _Record, anns: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``boxes`` (N, 4) xyxy, ``labels`` (N,) and ``masks`` (N, S, S) of ``anns``, resized with the image."""
        scale_x = 1.0 if self.img_size is None else self.img_size / record.width
        scale_y = 1.0 if self.img_size is None else self.img_size / record.height
        boxes = torch.tensor([_valid_box(ann["bbox"]) for ann in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # (N, 4) xywh -> xyxy
        boxes[:, 0::2] = (boxes[:, 0::2] * scale_x).clamp(0, record.width * scale_x)
        boxes[:, 1::2] = (boxes[:, 1::2] * scale_y).clamp(0, record.height * scale_y)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self._label_of[ann["category_id"]] for ann in anns], dtype=torch.int64),
        }
        if self.masks:
            height, width = record.height, record.width
            if anns:
                masks = torch.from_numpy(np.stack([decode_mask(ann["segmentation"], height, width) for ann in anns]))
            else:
                masks = torch.zeros(0, height, width, dtype=torch.uint8)
            if self.img_size is not None and (height, width) != (self.img_size, self.img_size):
                size = (self.img_size, self.img_size)
                masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].to(torch.uint8)
            target["masks"] = masks  # (N, S, S)
        return target

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        record = self.records[index]
        try:
            pixels = load_image(record.path, self.in_chans)  # (C, H, W) uint8
        except BadImageError as err:
            raise BadImageError(record.path, f"unreadable during training ({err})") from None
        image = torch.from_numpy(pixels)
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise ValueError(
                f"{record.path} is {image.shape[2]}x{image.shape[1]} but {self.annotation_file} says "
                f"{record.width}x{record.height}; fix the width/height of image {record.image_id}"
            )
        if self.img_size is not None and (record.height, record.width) != (self.img_size, self.img_size):
            size = (self.img_size, self.img_size)
            resized = F.interpolate(
                image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
            )
            image = resized[0].round().clamp(0, 255).to(torch.uint8)
        return image, self.target(index)


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Detection batches are lists: images may differ in their number of objects."""
    return [item[0] for item in batch], [item[1] for item in batch]
