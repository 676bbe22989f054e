"""Shapes set, COCO folder reading, VOC import: round trips that keep every box and mask."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mimkit.dense.data.coco import CocoDetection, decode_mask, find_annotations, rle_encode
from mimkit.dense.data.shapes import SHAPE_CLASSES, generate_shapes
from mimkit.dense.data.voc import voc_to_coco, write_voc_xml

# pycocotools' Cython decoder predates NumPy 2's __array__(copy=) protocol
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_shapes_masks_are_exact_boxes_tight_and_class_masks_agree(shapes_root: Path) -> None:
    coco = json.loads((shapes_root / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
    for info in coco["images"]:
        pixels = np.asarray(Image.open(shapes_root / "images" / info["file_name"]))  # (H, W, 3)
        class_mask = np.asarray(Image.open(shapes_root / "masks" / info["file_name"]))  # (H, W)
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        assert anns, "every image has at least one object"
        union = np.zeros(class_mask.shape, dtype=bool)
        for ann in anns:
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            mask = mask_utils.decode(rle).astype(bool)
            assert not (mask & union).any(), "visible masks of one image are disjoint"
            union |= mask
            assert len(np.unique(pixels[mask], axis=0)) == 1, "an exact mask covers one flat colour"
            assert (class_mask[mask] == ann["category_id"]).all()
            rows, cols = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert ann["area"] == mask.sum()
        # background pixels are class 0 except where a tiny occluded remainder was dropped
        assert (class_mask[~union] == 0).mean() > 0.95


def test_shapes_set_is_a_pure_function_of_its_seed(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", 3, size=32, seed=7)
    b = generate_shapes(tmp_path / "b", 3, size=32, seed=7)
    assert (a / "annotations.json").read_text() == (b / "annotations.json").read_text()
    assert (a / "images" / "000002.png").read_bytes() == (b / "images" / "000002.png").read_bytes()
    with pytest.raises(FileExistsError):
        generate_shapes(a, 3, size=32)


def test_coco_dataset_gives_back_the_written_boxes_and_masks(shapes_root: Path) -> None:
    coco = json.loads((shapes_root / "annotations.json").read_text())
    dataset = CocoDetection(shapes_root)
    assert dataset.classes == list(SHAPE_CLASSES) and len(dataset) == 8
    assert dataset.report.num_annotations == len(coco["annotations"]) and not dataset.report.skipped
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        anns = [a for a in coco["annotations"] if a["image_id"] == int(target["image_id"])]
        expected_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        torch.testing.assert_close(target["boxes"], expected_boxes.float())
        assert target["labels"].tolist() == [a["category_id"] for a in anns]  # ids 1..3 are labels 1..3
        for mask, ann in zip(target["masks"], anns, strict=True):
            assert np.array_equal(mask.numpy(), decode_mask(ann["segmentation"], 32, 32))


def test_resizing_scales_boxes_and_masks_together(shapes_root: Path) -> None:
    native, doubled = CocoDetection(shapes_root), CocoDetection(shapes_root, img_size=64)
    image, target = doubled[0]
    assert image.shape == (3, 64, 64) and target["masks"].shape[-2:] == (64, 64)
    torch.testing.assert_close(target["boxes"], native.target(0)["boxes"] * 2)
    assert torch.equal(target["masks"].sum(dim=(1, 2)), native.target(0)["masks"].sum(dim=(1, 2)) * 4)


def test_polygon_and_uncompressed_rle_segmentations_decode() -> None:
    square = decode_mask([[2, 2, 6, 2, 6, 6, 2, 6]], 10, 10)
    assert square.sum() == 16 and square[2:6, 2:6].all()
    mask = np.zeros((5, 4), dtype=bool)
    mask[1:3, 1:4] = True
    assert np.array_equal(decode_mask(rle_encode(mask), 5, 4), mask)
    uncompressed = {"size": [5, 4], "counts": [6, 2, 3, 2, 3, 2, 2]}  # column-major runs of 0s and 1s
    assert np.array_equal(decode_mask(uncompressed, 5, 4), mask)


def test_voc_xml_import_gives_the_same_boxes(shapes_root: Path, tmp_path: Path) -> None:
    original = CocoDetection(shapes_root, masks=False)
    coco = json.loads((shapes_root / "annotations.json").read_text())
    for info in coco["images"]:
        objects = [
            (SHAPE_CLASSES[a["category_id"] - 1], a["bbox"]) for a in coco["annotations"] if a["image_id"] == info["id"]
        ]
        write_voc_xml(tmp_path / "Annotations" / f"{info['id']:06d}.xml", info["file_name"], (32, 32), objects)
    report = voc_to_coco(tmp_path / "Annotations", tmp_path / "voc.json", classes=SHAPE_CLASSES)
    assert report.num_annotations == len(coco["annotations"]) and not report.skipped
    imported = CocoDetection(shapes_root, tmp_path / "voc.json", masks=False)
    assert imported.classes == original.classes
    for index in range(len(original)):
        expected, got = original.target(index), imported.target(index)
        torch.testing.assert_close(got["boxes"], expected["boxes"])
        assert torch.equal(got["labels"], expected["labels"])


def test_voc_import_reports_unknown_classes_and_bad_boxes(tmp_path: Path) -> None:
    folder = tmp_path / "Annotations"
    write_voc_xml(folder / "a.xml", "a.jpg", (20, 10), [("cat", [0, 0, 5, 5]), ("zebra", [1, 1, 2, 2])])
    write_voc_xml(folder / "b.xml", "b.jpg", (20, 10), [("cat", [15, 5, 10, 10]), ("cat", [3, 3, 0, 4])])
    (folder / "c.xml").write_text("<annotation><filename>c.jpg")  # cut short
    report = voc_to_coco(folder, tmp_path / "out.json", classes=["cat"])
    assert report.num_annotations == 1
    assert dict(report.skipped) == {"unknown_category": 1, "box_outside_image": 1, "empty_box": 1}
    assert len(report.skipped_images) == 1 and "c.xml" in report.skipped_images[0]
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["annotations"][0]["bbox"] == [0, 0, 5, 5]
    with pytest.raises(FileNotFoundError, match="no VOC"):
        voc_to_coco(tmp_path / "nothing", tmp_path / "x.json")


def test_missing_or_foreign_annotation_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        CocoDetection(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoDetection(tmp_path / "absent")
    (tmp_path / "annotations.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        CocoDetection(tmp_path)
    (tmp_path / "annotations").mkdir()
    assert find_annotations(tmp_path) == tmp_path / "annotations.json"


def test_horizontal_flip_moves_boxes_with_their_masks(shapes_root: Path) -> None:
    from mimkit.tasks.detect import _hflip

    image, target = CocoDetection(shapes_root)[2]
    flipped_image, flipped = _hflip(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    for box, mask in zip(flipped["boxes"], flipped["masks"], strict=True):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        tight = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
        torch.testing.assert_close(box, tight)
