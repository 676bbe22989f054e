"""Semantic-segmentation metrics: the confusion matrix over labelled pixels, per-class IoU, mIoU and pixel
accuracy."""

from __future__ import annotations

import torch
from torch import Tensor

from mimkit.dense.data.segmentation import IGNORE_INDEX


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
