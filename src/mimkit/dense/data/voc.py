"""Pascal-VOC XML annotations to a COCO instances file (boxes only), and VOC XML for tests and exports.

VOC boxes are 1-based inclusive pixel indices (``xmin = 1`` is the first column); COCO boxes are
``[x, y, width, height]`` in continuous pixel coordinates. The conversion is ``x = xmin - 1``,
``width = xmax - xmin + 1``, and its inverse in :func:`write_voc_xml`, so a round trip is exact for
integer boxes.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mimkit.dense.data.coco import AnnotationReport

log = logging.getLogger(__name__)


def _text(node: ET.Element, path: str) -> str | None:
    found = node.find(path)
    return None if found is None or found.text is None else found.text.strip()


def voc_to_coco(
    annotations_dir: str | Path,
    out: str | Path,
    *,
    classes: Sequence[str] | None = None,
    skip_difficult: bool = False,
) -> AnnotationReport:
    """Convert a folder of VOC XML files (``Annotations/``) to one COCO instances JSON.

    Args:
        annotations_dir: folder of ``*.xml`` files.
        out: the JSON to write (e.g. ``<voc root>/annotations.json`` beside ``JPEGImages``; the ``file_name``
            of each image is taken from its XML, so point :class:`~mimkit.dense.data.coco.CocoDetection` at
            a root where ``images/<file_name>`` or ``<file_name>`` exists).
        classes: the category names in label order; objects of other names are skipped as unknown. None:
            every name found, sorted.
        skip_difficult: drop objects marked ``difficult``.

    Returns:
        An :class:`~mimkit.dense.data.coco.AnnotationReport` of what was converted and skipped.
    """
    annotations_dir = Path(annotations_dir)
    files = sorted(annotations_dir.glob("*.xml")) if annotations_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no VOC *.xml annotation files in {annotations_dir}")
    report = AnnotationReport()
    parsed: list[tuple[Path, ET.Element]] = []
    for path in files:
        try:
            parsed.append((path, ET.parse(path).getroot()))
        except ET.ParseError as err:
            report.skipped_images.append(f"{path.name} ({err})")
    names = list(classes) if classes is not None else sorted(
        {name for _, root in parsed for obj in root.iter("object") if (name := _text(obj, "name"))}
    )  # fmt: skip
    category_of = {name: index + 1 for index, name in enumerate(names)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for path, root in parsed:
        file_name = _text(root, "filename") or path.with_suffix(".jpg").name
        try:
            width, height = int(_text(root, "size/width") or 0), int(_text(root, "size/height") or 0)
        except ValueError:
            width = height = 0
        image_id = len(images)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in root.iter("object"):
            example = f"{path.name} object {_text(obj, 'name')!r}"
            name = _text(obj, "name")
            if name not in category_of:
                report.skip("unknown_category", example)
                continue
            if skip_difficult and _text(obj, "difficult") == "1":
                continue
            try:
                xmin, ymin, xmax, ymax = (
                    float(_text(obj, f"bndbox/{key}") or "nan") for key in ("xmin", "ymin", "xmax", "ymax")
                )
            except ValueError:
                report.skip("no_box", example)
                continue
            box = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            if any(value != value for value in box):  # NaN: a coordinate is missing
                report.skip("no_box", example)
                continue
            if box[2] <= 0 or box[3] <= 0:
                report.skip("empty_box", example)
                continue
            if width and height and (box[0] < 0 or box[1] < 0 or box[0] + box[2] > width or box[1] + box[3] > height):
                report.skip("box_outside_image", example)
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_of[name],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    report.num_images = len(images)
    report.num_annotations = len(annotations)
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(names)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    if report.num_skipped or report.skipped_images:
        log.warning("%s: %s", annotations_dir, report.summary())
    return report


def write_voc_xml(
    path: str | Path, file_name: str, size: tuple[int, int], objects: Sequence[tuple[str, Sequence[float]]]
) -> Path:
    """Write one VOC XML file.

    Args:
        path: the XML file.
        file_name: the image's file name.
        size: (width, height).
        objects: (class name, COCO box ``[x, y, w, h]``) per object.
    """
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = file_name
    size_node = ET.SubElement(root, "size")
    ET.SubElement(size_node, "width").text = str(size[0])
    ET.SubElement(size_node, "height").text = str(size[1])
    ET.SubElement(size_node, "depth").text = "3"
    for name, (x, y, w, h) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
            ET.SubElement(box, key).text = f"{value:g}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path)
    return path
