"""COCO box and mask AP with pycocotools, and prediction pictures (boxes, masks, scores) as PNG.

The ground truth is the dataset's own targets (what was kept after the annotation checks) and its crowd
regions (ignore regions, as in COCO's own evaluation), at the resolution the detector sees, so predictions
and ground truth share one coordinate frame.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimkit.dense.data.coco import CocoDetection, collate, rle_encode

MASK_THRESHOLD = 0.5  # Mask R-CNN's mask probabilities are binarized here (torchvision's and Detectron2's choice)
# Distinct colours for classes (tab10).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


@torch.no_grad()
def predict(
    model: nn.Module, dataset: CocoDetection, *, batch_size: int = 8, progress: bool = False
) -> list[dict[str, Tensor]]:
    """The detector's outputs for every image of ``dataset`` (eval mode), in dataset order, on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    outputs: list[dict[str, Tensor]] = []
    for images, _ in tqdm(loader, desc="predict", disable=not progress, leave=False):
        batch = [image.to(device).float() / 255 for image in images]
        outputs += [{key: value.cpu() for key, value in out.items()} for out in model(batch)]
    model.train(was_training)
    return outputs


def _ground_truth(dataset: CocoDetection) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, record in enumerate(dataset.records):
        height, width = (dataset.img_size, dataset.img_size) if dataset.img_size else (record.height, record.width)
        images.append({"id": index, "width": width, "height": height})
        for crowd, target in ((0, dataset.target(index)), (1, dataset.crowd_regions(index))):
            for k, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True)):
                x0, y0, x1, y1 = box
                ann = {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": int(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": crowd,  # a detection matched to a crowd region is neither true nor false
                }
                if "masks" in target:
                    mask = target["masks"][k].numpy().astype(bool)
                    ann["segmentation"] = rle_encode(mask)
                    ann["area"] = float(mask.sum())
                annotations.append(ann)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(dataset.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _detections(outputs: Sequence[dict[str, Tensor]], masks: bool) -> list[dict[str, Any]]:
    results = []
    for index, out in enumerate(outputs):
        for k, (box, label, score) in enumerate(
            zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist(), strict=True)
        ):
            x0, y0, x1, y1 = box
            result = {"image_id": index, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            if masks:
                result["segmentation"] = rle_encode(out["masks"][k, 0].numpy() > MASK_THRESHOLD)
            results.append(result)
    return results


def _run_cocoeval(gt: Any, detections: list[dict[str, Any]], iou_type: str, classes: Sequence[str]) -> dict[str, Any]:
    """AP, AP50, AP75 (percent) and per-class AP of one IoU type."""
    from pycocotools.cocoeval import COCOeval

    empty = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class_AP": dict.fromkeys(classes, 0.0)}
    if not detections or not gt.dataset["annotations"]:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    precision = evaluator.eval["precision"]  # (T iou, R recall, K classes, A areas, M max dets)
    per_class = {}
    for k, name in enumerate(classes):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[name] = float(values.mean() * 100) if values.size else 0.0
    return {
        "AP": float(max(stats[0], 0) * 100),
        "AP50": float(max(stats[1], 0) * 100),
        "AP75": float(max(stats[2], 0) * 100),
        "per_class_AP": per_class,
    }


def coco_evaluate(dataset: CocoDetection, outputs: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
    """COCO AP of detector outputs on ``dataset`` (see :func:`predict`), in percent.

    Returns:
        ``{"box": {...}, "mask": {...}}`` (mask only for datasets with masks), each with ``AP`` (IoU 0.5:0.95),
        ``AP50``, ``AP75`` and ``per_class_AP``.
    """
    from pycocotools.coco import COCO

    if len(outputs) != len(dataset):
        raise ValueError(f"{len(outputs)} outputs for {len(dataset)} images")
    gt = COCO()
    gt.dataset = _ground_truth(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    results = {"box": _run_cocoeval(gt, _detections(outputs, False), "bbox", dataset.classes)}
    if dataset.masks:
        results["mask"] = _run_cocoeval(gt, _detections(outputs, True), "segm", dataset.classes)
    return results


def draw_detections(
    image: Tensor,
    output: dict[str, Tensor],
    classes: Sequence[str],
    *,
    score_threshold: float = 0.5,
    scale: int = 4,
) -> Image.Image:
    """One picture: the image (C, H, W) uint8 upscaled ``scale`` times, masks tinted by class, boxes and
    ``class score`` labels of the detections at or above ``score_threshold``, and a caption of how many
    those are and the best score (so that an image without a shown detection says why)."""
    pixels = image.permute(1, 2, 0).numpy()  # (H, W, C)
    if pixels.shape[2] == 1:
        pixels = pixels.repeat(3, axis=2)
    canvas = pixels.astype(np.float32)
    keep = output["scores"] >= score_threshold
    labels = output["labels"][keep].tolist()
    if "masks" in output:
        for mask, label in zip(output["masks"][keep], labels, strict=True):
            region = mask[0].numpy() > MASK_THRESHOLD
            canvas[region] = 0.55 * canvas[region] + 0.45 * np.array(PALETTE[(label - 1) % len(PALETTE)])
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8), "RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    for box, label, score in zip(output["boxes"][keep].tolist(), labels, output["scores"][keep].tolist(), strict=True):
        color = PALETTE[(label - 1) % len(PALETTE)]
        x0, y0, x1, y1 = (value * scale for value in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=2)
        draw.text((x0 + 2, y0 + 1), f"{classes[label - 1]} {score:.2f}", fill=(255, 255, 255))
    scores = output["scores"]
    caption = f"{int(keep.sum())} of {len(scores)} >= {score_threshold:.2f}"
    if len(scores):
        caption += f", best {float(scores.max()):.2f}"
    left, top, right, bottom = draw.textbbox((3, picture.height - 14), caption)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text((3, picture.height - 14), caption, fill=(255, 255, 255))
    return picture


def save_prediction_grid(
    dataset: CocoDetection,
    outputs: Sequence[dict[str, Tensor]],
    path: str | Path,
    *,
    num_images: int = 8,
    score_threshold: float = 0.5,
    columns: int = 4,
) -> Path:
    """The first ``num_images`` images with their detections (:func:`draw_detections`) as one PNG grid."""
    count = min(num_images, len(dataset))
    if count == 0:
        raise ValueError("no image to draw")
    tiles = [
        draw_detections(dataset[i][0], outputs[i], dataset.classes, score_threshold=score_threshold)
        for i in range(count)
    ]
    width, height = max(tile.width for tile in tiles), max(tile.height for tile in tiles)
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, tile in enumerate(tiles):
        grid.paste(tile, ((index % columns) * width, (index // columns) * height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
