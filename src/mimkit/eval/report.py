"""What an evaluation protocol reports: accuracies, a confusion matrix, its picture and a JSON file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from mimkit.files import atomic_write


@dataclass
class ClassificationMetrics:
    """Accuracies of class scores against labels.

    Attributes:
        top1: fraction of samples whose highest score is their class.
        top5: fraction whose class is among the 5 highest scores; None with fewer than 5 classes.
        per_class_accuracy: (num_classes,) float recall of each class; NaN for a class with no samples.
        confusion: (num_classes, num_classes) int64, ``confusion[true, predicted]`` counts.
    """

    top1: float
    top5: float | None
    per_class_accuracy: Tensor
    confusion: Tensor


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted class.

    Args:
        predictions: (M,) predicted class indices.
        labels: (M,) true class indices.
        num_classes: number of classes.
    """
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(
            f"predictions and labels must both be (M,), got {tuple(predictions.shape)}, {tuple(labels.shape)}"
        )
    flat = labels.long().cpu() * num_classes + predictions.long().cpu()  # (M,) index into the flattened matrix
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> ClassificationMetrics:
    """Top-1, top-5, per-class accuracy and confusion matrix of class scores.

    Args:
        scores: (M, num_classes) logits or votes; higher means more likely.
        labels: (M,) integer labels in [0, num_classes).
        num_classes: number of classes.
    """
    if scores.ndim != 2 or scores.shape != (labels.shape[0], num_classes):
        raise ValueError(f"scores must be ({labels.shape[0]}, {num_classes}), got {tuple(scores.shape)}")
    labels = labels.long().cpu()
    scores = scores.cpu()
    predictions = scores.argmax(dim=1)  # (M,)
    confusion = confusion_matrix(predictions, labels, num_classes)
    per_class = confusion.diag().double() / confusion.sum(dim=1).double()  # (num_classes,); 0/0 -> NaN
    top5 = None
    if num_classes >= 5:
        top5 = (scores.topk(5, dim=1).indices == labels.unsqueeze(1)).any(dim=1).float().mean().item()
    return ClassificationMetrics(
        top1=(predictions == labels).float().mean().item(),
        top5=top5,
        per_class_accuracy=per_class.float(),
        confusion=confusion,
    )


def save_confusion_matrix(confusion: Tensor, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Save a confusion matrix as a PNG heat map, rows normalized to recall, with counts in the cells.

    Args:
        confusion: (C, C) counts, rows = true class, columns = predicted class.
        classes: the C class names.
        path: output ``.png``; written atomically.
        title: figure title.

    Returns:
        ``path`` as a Path.
    """
    num_classes = len(classes)
    if confusion.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion must be ({num_classes}, {num_classes}) for {num_classes} classes, got {tuple(confusion.shape)}"
        )
    counts = confusion.long().cpu()
    recall = (counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()  # (C, C) row-normalized
    side = max(4.0, 0.55 * num_classes + 2.5)
    figure = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = range(num_classes)
    axes.set_xticks(ticks, labels=list(classes), rotation=45, ha="right", fontsize=8)
    axes.set_yticks(ticks, labels=list(classes), fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if num_classes <= 30:  # counts stay legible up to about this many cells per row
        for row in range(num_classes):
            for col in range(num_classes):
                color = "white" if recall[row, col] > 0.5 else "black"
                axes.text(col, row, str(int(counts[row, col])), ha="center", va="center", fontsize=7, color=color)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    return path


def _plain(value: Any) -> Any:
    """JSON-ready copy: tensors to lists, NaN/inf to None (JSON has neither), paths to strings."""
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write a results dict as indented JSON, atomically (tensors become lists, NaN becomes null).

    Returns:
        ``path`` as a Path.
    """
    text = json.dumps(_plain(results), indent=2, allow_nan=False)
    path = Path(path)
    atomic_write(path, lambda handle: handle.write(text.encode() + b"\n"))
    return path
