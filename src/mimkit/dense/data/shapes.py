"""A generated detection and segmentation set: random polygons and ellipses with exact masks, as a COCO folder.

Every object is drawn without antialiasing from its own binary mask, so the image's object pixels, the
instance masks (COCO RLE, occlusion by later objects removed) and the class-index masks agree exactly.
The folder layout is the one :class:`~mimkit.dense.data.coco.CocoDetection` reads::

    root/images/000000.png     RGB images
    root/annotations.json      COCO instances: boxes (x, y, w, h), RLE masks, categories
    root/masks/000000.png      class-index masks (0 = background, k = category k), VOC/ADE style
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mimkit.dense.data.coco import rle_encode

SHAPE_CLASSES = ("ellipse", "triangle", "rectangle")
MIN_VISIBLE_PIXELS = 12  # an object occluded below this is dropped: it would not be a fair target


def _shape_mask(kind: str, size: int, rng: np.random.Generator, min_side: int, max_side: int) -> np.ndarray:
    """A binary (size, size) mask of one shape of ``kind`` with a random size, place and rotation."""
    side = rng.uniform(min_side, max_side)
    cx, cy = rng.uniform(side / 2, size - side / 2, size=2)
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "ellipse":
        aspect = rng.uniform(0.6, 1.0)
        half_w, half_h = side / 2, side * aspect / 2
        draw.ellipse((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=1)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        if kind == "triangle":
            offsets = [angle + k * 2 * math.pi / 3 + rng.uniform(-0.3, 0.3) for k in range(3)]
            radii = [side / 2] * 3
        else:  # a rotated rectangle of aspect 0.5 to 1
            aspect = rng.uniform(0.5, 1.0)
            corner = math.atan2(aspect, 1.0)
            offsets = [angle + corner, angle + math.pi - corner, angle + math.pi + corner, angle - corner]
            radii = [side / 2 * math.hypot(1.0, aspect)] * 4
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, offsets, strict=True)]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour gradient with pixel noise: (size, size, 3) float in [0, 255]."""
    corners = rng.uniform(0, 255, size=(2, 2, 3))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    left = corners[0, 0] * (1 - ramp) + corners[1, 0] * ramp  # (size, 1, 3)
    right = corners[0, 1] * (1 - ramp) + corners[1, 1] * ramp
    cols = np.linspace(0.0, 1.0, size)[None, :, None]
    image = left * (1 - cols) + right * cols  # (size, size, 3)
    return image + rng.normal(0, 8, size=image.shape)


def generate_shapes(
    root: str | Path,
    num_images: int,
    *,
    size: int = 64,
    max_objects: int = 4,
    min_side: float | None = None,
    max_side: float | None = None,
    seed: int = 0,
) -> Path:
    """Write a shapes set as a COCO folder (layout in the module docstring).

    Args:
        root: output folder; created, and refused when it already holds ``annotations.json``.
        num_images: images to draw.
        size: image side in pixels.
        max_objects: 1 to this many objects per image.
        min_side, max_side: object extent in pixels (default: size / 6 and size / 2).
        seed: the set is a pure function of its arguments.

    Returns:
        ``root``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    min_side = size / 6 if min_side is None else min_side
    max_side = size / 2 if max_side is None else max_side
    if not 4 <= min_side <= max_side <= size:
        raise ValueError(f"need 4 <= min_side <= max_side <= size, got {min_side}, {max_side}, {size}")
    root = Path(root)
    if (root / "annotations.json").exists():
        raise FileExistsError(f"{root} already holds a shapes set (annotations.json); choose a new folder")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(num_images):
        name = f"{image_id:06d}.png"
        pixels = _background(size, rng)
        class_mask = np.zeros((size, size), dtype=np.uint8)
        objects: list[tuple[int, np.ndarray]] = []  # (category id, visible mask), drawing order
        for _ in range(int(rng.integers(1, max_objects + 1))):
            category = int(rng.integers(1, len(SHAPE_CLASSES) + 1))
            mask = _shape_mask(SHAPE_CLASSES[category - 1], size, rng, int(min_side), int(max_side))
            pixels[mask] = rng.uniform(0, 255, size=3)  # one flat colour per object
            objects = [(cat, visible & ~mask) for cat, visible in objects]  # later objects occlude
            objects.append((category, mask))
            class_mask[mask] = category
        for category, visible in objects:
            if visible.sum() < MIN_VISIBLE_PIXELS:
                continue
            rows, cols = np.nonzero(visible)
            x0, y0, x1, y1 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                    "area": int(visible.sum()),
                    "segmentation": rle_encode(visible),
                    "iscrowd": 0,
                }
            )
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(root / "images" / name)
        Image.fromarray(class_mask, "L").save(root / "masks" / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(SHAPE_CLASSES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root
