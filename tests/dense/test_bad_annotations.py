"""Bad annotations are reported and skipped with counts, never a crash."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.dense.data.coco import CocoDetection, rle_encode


def _write_folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((20, 30, 3), 90, dtype=np.uint8)).save(root / "images" / name)
    (root / "images" / "broken.png").write_bytes(b"not a png")
    good_mask = np.zeros((20, 30), dtype=bool)
    good_mask[2:8, 3:10] = True
    square = [[3, 2, 10, 2, 10, 8, 3, 8]]

    def ann(ann_id, image_id=1, category=1, bbox=(3, 2, 7, 6), segmentation=square, **extra):
        return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": list(bbox) if bbox else bbox,
                "segmentation": segmentation, "iscrowd": 0, **extra}  # fmt: skip

    annotations = [
        ann(1),  # good, polygon
        ann(2, image_id=2, segmentation=rle_encode(good_mask)),  # good, RLE
        ann(3, bbox=(25, 2, 10, 6)),  # reaches 5 px past the right border
        ann(4, bbox=(-4, -4, 2, 2)),  # entirely outside
        ann(5, bbox=(3, 2, 0, 6)),  # zero width
        ann(6, bbox=None),  # no box
        ann(7, category=9),  # unknown category
        ann(8, segmentation=rle_encode(np.zeros((20, 30), dtype=bool))),  # empty mask
        ann(9, segmentation=[]),  # no segmentation
        ann(10, segmentation={"size": [20, 30], "counts": "@@@not-rle"}),  # undecodable
        ann(11, iscrowd=1),  # crowd
        ann(12, image_id=99),  # image not listed
        ann(13, image_id=3),  # image file missing
        ann(14, image_id=4),  # image file unreadable
        ann(15, bbox=(3, 2, 27.5, 6)),  # within the 1-pixel tolerance at the border: kept
        ann(16, iscrowd=1, bbox=None),  # crowd without a box: not even an ignore region
        ann(17, segmentation={"size": [20, 30], "counts": ""}),  # no runs (pycocotools decodes garbage)
        ann(18, segmentation={"size": [20, 30], "counts": rle_encode(good_mask)["counts"][:-1]}),  # cut short
        ann(19, segmentation={"size": [20, 30], "counts": "0" * 3 + "\x7f"}),  # outside the alphabet
    ]
    images = [
        {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
        {"id": 2, "file_name": "b.png", "width": 30, "height": 20},
        {"id": 3, "file_name": "gone.png", "width": 30, "height": 20},
        {"id": 4, "file_name": "broken.png", "width": 30, "height": 20},
    ]
    categories = [{"id": 1, "name": "thing"}]
    (root / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def test_bad_annotations_are_counted_by_reason_and_the_rest_loads(tmp_path: Path, caplog) -> None:
    root = _write_folder(tmp_path / "set")
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(root)
    report = dataset.report
    assert report.num_images == 2 and report.num_annotations == 3
    assert dict(report.skipped) == {
        "box_outside_image": 2,
        "empty_box": 1,
        "no_box": 1,
        "unknown_category": 1,
        "empty_mask": 1,
        "no_mask": 1,
        "bad_mask": 4,
        "crowd": 2,
        "missing_image": 3,
    }
    assert report.skipped_images == ["gone.png", "broken.png"]
    assert "ann 3 (a.png)" in report.examples["box_outside_image"]
    assert "skipped 2: box not inside the image" in caplog.text
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 1] and target["masks"].shape == (2, 20, 30)
    assert target["boxes"][1].tolist() == [3.0, 2.0, 30.0, 8.0]  # the tolerated box is clipped to the image
    _, target = dataset[1]
    assert target["masks"][0].sum() == 42
    crowds = dataset.crowd_regions(0)  # ann 11 is an ignore region, ann 16 (no box) is not
    assert crowds["boxes"].tolist() == [[3.0, 2.0, 10.0, 8.0]] and crowds["masks"].shape == (1, 20, 30)
    assert dataset.crowd_regions(1)["boxes"].shape == (0, 4)


def test_without_masks_segmentation_problems_do_not_skip_boxes(tmp_path: Path) -> None:
    dataset = CocoDetection(_write_folder(tmp_path / "set"), masks=False)
    assert dataset.report.num_annotations == 9  # 1, 2, 8, 9, 10, 15, 17, 18, 19
    assert "masks" not in dataset[0][1]


def test_a_file_without_any_readable_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": [], "categories": [{"id": 1}]})
    )
    with pytest.raises(ValueError, match="no readable image"):
        CocoDetection(tmp_path)


def test_run_lengths_match_the_pixels_of_pycocotools_encodings() -> None:
    from mimkit.dense.data.coco import run_lengths

    rng = np.random.default_rng(0)
    for trial in range(50):
        height, width = (int(v) for v in rng.integers(1, 40, size=2))
        mask = rng.random((height, width)) < (trial % 5) / 4  # all empty, all full and in between
        runs = run_lengths(rle_encode(mask)["counts"].encode())
        column_major = np.concatenate([[False], mask.T.reshape(-1), [not mask.T.reshape(-1)[-1]]])
        changes = np.flatnonzero(column_major[1:] != column_major[:-1])  # where each run ends
        assert runs == np.diff(np.concatenate([[0], changes])).tolist()
        assert sum(runs[1::2]) == mask.sum()
