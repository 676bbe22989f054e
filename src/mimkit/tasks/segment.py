"""Semantic-segmentation fine-tuning and evaluation: ``mimkit seg-train`` and ``mimkit seg-eval``.

The encoder comes from any checkpoint :func:`~mimkit.checkpoints.load.load_checkpoint` reads; the backbone is
ConvMAE's stages (``convmae``), a ViT with ViTDet's simple feature pyramid (``vit_pyramid``) or MIMDet's
ConvStem into the ViT (``mimdet``); the head is UperNet. Per-pixel cross-entropy (ignored pixels excluded),
AdamW with layer-wise lr decay on the encoder, warmup then cosine. A run writes ``last.pt``,
``config.yaml``, ``metrics.jsonl``, ``results.json`` (mIoU, per-class IoU, pixel accuracy) and
``overlays.png`` (image, ground truth, prediction).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor, nn

from mimkit.config import ConfigError, ModelConfig
from mimkit.dense.data.segmentation import IGNORE_INDEX, SegmentationFolder
from mimkit.dense.evaluation.coco_ap import PALETTE
from mimkit.dense.evaluation.miou import confusion_matrix, iou_from_confusion
from mimkit.dense.models.backbones import ConvMAEBackbone, ViTPyramid
from mimkit.dense.models.upernet import Segmenter
from mimkit.engine.run_guard import holding_run_lock
from mimkit.models.convvit import ConvViT
from mimkit.models.mae_decoder import MAEDecoder
from mimkit.models.vit import VisionTransformer
from mimkit.tasks.detect import (
    BackboneConfig,
    DetectTrainConfig,
    Pretrained,
    check_data_paths,
    fit,
    mimdet_body,
    open_run,
    pretrained_for,
    read_trained_checkpoint,
    training_lines,
)

SEG_BACKBONES = ("vit_pyramid", "mimdet", "convmae")


@dataclass
class SegModelConfig(BackboneConfig):
    """The segmenter: the backbone and its encoder (:class:`~mimkit.tasks.detect.BackboneConfig`), head width."""

    BACKBONES: ClassVar[tuple[str, ...]] = SEG_BACKBONES

    backbone: str = "vit_pyramid"  # vit_pyramid or mimdet (a ViT checkpoint), convmae (a ConvMAE checkpoint)
    sample_ratio: float = 1.0  # mimdet: all tokens unless set
    head_channels: int = 64
    pyramid_channels: int = 64  # vit_pyramid: width of each level


@dataclass
class SegDataConfig:
    """Class-mask folders (see :class:`~mimkit.dense.data.segmentation.SegmentationFolder`)."""

    train: str = "runs/detection/shapes_train"
    val: str | None = None
    split_train: str | None = None  # ADE20K: training
    split_val: str | None = None  # ADE20K: validation
    num_classes: int | None = None  # None: the largest label in the training masks + 1
    classes: tuple[str, ...] | None = None
    reduce_zero_label: bool = False
    hflip: bool = True
    train_limit: int | None = None
    val_limit: int | None = None


@dataclass
class SegConfig:
    """A segmentation run; ``mimkit seg-train`` takes dotted overrides of these keys."""

    model: SegModelConfig = field(default_factory=SegModelConfig)
    encoder: ModelConfig = field(default_factory=ModelConfig)  # used only without model.checkpoint
    data: SegDataConfig = field(default_factory=SegDataConfig)
    train: DetectTrainConfig = field(default_factory=lambda: DetectTrainConfig(output_dir="runs/seg"))
    num_pictures: int = 8

    def validate(self) -> SegConfig:
        """Raise :class:`~mimkit.config.ConfigError` naming the first bad key."""
        checks = [
            *self.model.checks(),  # the same backbone keys and rules as detection's
            (self.data.num_classes is None or self.data.num_classes >= 2, "data.num_classes", "must be >= 2"),
            *self.train.checks(),  # the same training section as detection's
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")
        return self


def build_segmenter(pretrained: Pretrained, config: SegConfig, num_classes: int) -> Segmenter:
    """UperNet on the backbone ``model.backbone`` around the pretrained encoder."""
    m = config.model
    encoder = cast(VisionTransformer | ConvViT, pretrained.model.encoder)
    body: nn.Module
    if m.backbone == "convmae":
        if not isinstance(encoder, ConvViT):
            raise ValueError(f"model.backbone=convmae needs a ConvMAE checkpoint, got a {type(encoder).__name__}")
        body = ConvMAEBackbone(encoder)
    elif isinstance(encoder, ConvViT):
        raise ValueError("this checkpoint is a ConvMAE encoder; set model.backbone=convmae")
    elif m.backbone == "vit_pyramid":
        body = ViTPyramid(encoder, m.pyramid_channels)
    else:
        decoder = pretrained.model.decoder if isinstance(pretrained.model.decoder, MAEDecoder) else None
        body = mimdet_body(encoder, decoder, m)
    if m.drop_path > 0:
        encoder.set_drop_path_rate(m.drop_path)
    return Segmenter(body, num_classes, channels=m.head_channels, mean=pretrained.mean, std=pretrained.std)


def open_seg_dataset(
    root: str, *, img_size: int, in_chans: int, split: str | None, reduce_zero_label: bool, limit: int | None
) -> SegmentationFolder:
    dataset = SegmentationFolder(
        root, img_size=img_size, in_chans=in_chans, split=split, reduce_zero_label=reduce_zero_label
    )
    if limit is not None:
        dataset.pairs = dataset.pairs[:limit]
    return dataset


def train_segmenter(
    model: Segmenter,
    dataset: SegmentationFolder,
    config: SegConfig,
    *,
    out_dir: Path,
    progress: bool = True,
    checkpoint_extra: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train with per-pixel cross-entropy (label ``IGNORE_INDEX`` ignored) through
    :func:`~mimkit.tasks.detect.fit`: the same schedule, layer decay, checkpoints and resume as
    detection; each image and its mask are flipped with probability 0.5 (``data.hflip``)."""

    def batch_loss(indices: list[int], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        items = [dataset[index] for index in indices]
        images = torch.stack([image for image, _ in items]).float() / 255  # (B, C, S, S)
        labels = torch.stack([mask for _, mask in items])  # (B, S, S)
        if config.data.hflip:
            flip = torch.rand(len(items), generator=generator) < 0.5
            images[flip], labels[flip] = images[flip].flip(-1), labels[flip].flip(-1)
        return F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX), {}

    return fit(
        model,
        cast(nn.Module, model.body.encoder),
        len(dataset),
        batch_loss,
        config.train,
        out_dir=out_dir,
        desc="segmentation",
        progress=progress,
        checkpoint_extra=checkpoint_extra,
        resume=resume,
    )


@torch.no_grad()
def predict_masks(model: Segmenter, dataset: SegmentationFolder, batch_size: int = 8) -> Tensor:
    """(N, S, S) predicted class of every pixel (eval mode)."""
    was_training = model.training
    model.eval()
    predictions = []
    for first in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(first, min(first + batch_size, len(dataset)))])
        predictions.append(model(images.float() / 255).argmax(dim=1))
    model.train(was_training)
    return torch.cat(predictions)


def _class_colors() -> np.ndarray:
    """(256, 3) float colours of class indices: background black, tab10, then fixed random colours; 255
    (ignored) white."""
    extra = np.random.default_rng(0).integers(40, 256, size=(IGNORE_INDEX + 1, 3))
    colors = np.concatenate([[(0, 0, 0)], PALETTE, extra]).astype(np.float32)[: IGNORE_INDEX + 1]
    colors[IGNORE_INDEX] = (255, 255, 255)
    return colors


def _colorize(labels: Tensor) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) colours of :func:`_class_colors`."""
    return _class_colors()[labels.clamp(0, IGNORE_INDEX).numpy()]


def _overlay_header(width: int, column_width: int, classes: Sequence[str]) -> Image.Image:
    """A white strip: the three column titles, then a swatch and the name of every class in its colour."""
    from PIL import ImageDraw

    line, swatch, margin = 14, 10, 4
    entries = [*enumerate(classes), (IGNORE_INDEX, "ignored")]
    positions, x, y = [], margin, line + margin  # the legend wraps onto as many lines as it needs
    for _, name in entries:
        entry_width = swatch + 4 + 6 * len(name) + 12  # the default font is about 6 px a character
        if x > margin and x + entry_width > width:
            x, y = margin, y + line
        positions.append((x, y))
        x += entry_width
    header = Image.new("RGB", (width, y + line), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for column, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((column * column_width + margin, 2), title, fill=(0, 0, 0))
    colors = _class_colors()
    for (index, name), (x, y) in zip(entries, positions, strict=True):
        color = tuple(int(c) for c in colors[index])
        draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + 4, y), name, fill=(0, 0, 0))
    return header


def save_overlays(
    dataset: SegmentationFolder,
    predictions: Tensor,
    path: Path,
    *,
    num_images: int = 8,
    scale: int = 3,
    classes: Sequence[str] | None = None,
) -> Path:
    """Rows of (image, ground truth over it, prediction over it): each class in its colour (background black,
    ignored pixels white) over a faint copy of the image, under a header naming the columns and, given
    ``classes``, the colour of each class."""
    rows = []
    for index in range(min(num_images, len(dataset))):
        image, labels = dataset[index]
        pixels = image.permute(1, 2, 0).numpy().astype(np.float32)
        if pixels.shape[2] == 1:
            pixels = pixels.repeat(3, axis=2)
        tiles: list[np.ndarray] = [pixels]
        for label_map in (labels, predictions[index]):  # background darkened, classes in their colours
            tiles.append(0.3 * pixels + 0.7 * _colorize(label_map))
        rows.append(np.concatenate(tiles, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0).clip(0, 255).astype(np.uint8), "RGB")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    header = _overlay_header(grid.width, grid.width // 3, classes or [])
    picture = Image.new("RGB", (grid.width, header.height + grid.height), (255, 255, 255))
    picture.paste(header, (0, 0))
    picture.paste(grid, (0, header.height))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def evaluate_segmenter(
    model: Segmenter,
    dataset: SegmentationFolder,
    num_classes: int,
    classes: Sequence[str],
    out_dir: Path,
    pictures: int,
) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy (percent) on ``dataset``; ``overlays.png`` in ``out_dir``."""
    start = time.perf_counter()
    predictions = predict_masks(model, dataset)
    seconds = time.perf_counter() - start
    confusion = sum(
        (confusion_matrix(predictions[i], dataset.mask(i), num_classes) for i in range(len(dataset))),
        torch.zeros(num_classes, num_classes, dtype=torch.long),
    )
    iou, miou, accuracy = iou_from_confusion(confusion)
    picture = save_overlays(dataset, predictions, out_dir / "overlays.png", num_images=pictures, classes=classes)
    return {
        "mIoU": miou,
        "pixel_accuracy": accuracy,
        "per_class_IoU": {name: (None if math.isnan(v) else v) for name, v in zip(classes, iou.tolist(), strict=True)},
        "num_images": len(dataset),
        "eval_img_per_s": len(dataset) / seconds,
        "overlays_png": str(picture),
    }


def _class_names(config: SegConfig, num_classes: int) -> list[str]:
    if config.data.classes is not None:
        if len(config.data.classes) != num_classes:
            raise ValueError(f"data.classes names {len(config.data.classes)} classes, but there are {num_classes}")
        return list(config.data.classes)
    return [f"class_{k}" for k in range(num_classes)]


@holding_run_lock(lambda config, **_: config.train.output_dir, "train.output_dir")
def run_seg_train(config: SegConfig, *, progress: bool | None = None, resume: bool = False) -> dict[str, Any]:
    """``mimkit seg-train``: load, build, train, evaluate on ``data.val``; everything in ``train.output_dir``.

    ``resume`` continues the run in ``train.output_dir`` from its ``last.pt`` (see
    :func:`~mimkit.tasks.detect.open_run`). The run directory is locked against a second writer while
    this runs (:class:`~mimkit.engine.run_guard.RunLock`)."""
    from mimkit.config import to_plain
    from mimkit.eval.report import write_results

    t, m, d = config.train, config.model, config.data
    out_dir = Path(t.output_dir)
    plain = to_plain(config)
    state = open_run(out_dir, plain, resume)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    progress = t.progress if progress is None else progress
    torch.manual_seed(t.seed)
    pretrained = pretrained_for(config)
    check_data_paths(config)
    model_config = dict(pretrained.model.config)
    img_size, in_chans = int(model_config["img_size"]), int(model_config["in_chans"])
    common = dict(img_size=img_size, in_chans=in_chans, reduce_zero_label=d.reduce_zero_label)
    train_set = open_seg_dataset(d.train, split=d.split_train, limit=d.train_limit, **common)  # type: ignore[arg-type]
    num_classes = d.num_classes or train_set.max_label() + 1
    classes = _class_names(config, num_classes)
    model = build_segmenter(pretrained, config, num_classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    extra = {
        "config": plain,
        "encoder_config": model_config,
        "classes": classes,
        "mean": list(pretrained.mean),
        "std": list(pretrained.std),
    }
    summary = train_segmenter(
        model, train_set, config, out_dir=out_dir, progress=progress, checkpoint_extra=extra, resume=state
    )
    results: dict[str, Any] = {"pretrained": pretrained.source, "backbone": m.backbone, "train": summary}
    if d.val is not None:
        val_set = open_seg_dataset(d.val, split=d.split_val, limit=d.val_limit, **common)  # type: ignore[arg-type]
        results["val"] = evaluate_segmenter(model, val_set, num_classes, classes, out_dir, config.num_pictures)
    write_results(out_dir / "results.json", results)
    return results


def load_segmenter(path: str | Path) -> tuple[Segmenter, SegConfig, dict[str, Any]]:
    """A segmenter saved by ``seg-train``, its config and the checkpoint dict."""
    config, pretrained, state = read_trained_checkpoint(path, SegConfig, "seg-train")
    model = build_segmenter(pretrained, config, len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.eval(), config, state


def run_seg_eval(
    checkpoint: str | Path, data: str | Path, *, out_dir: str | Path, split: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """``mimkit seg-eval``: mIoU and per-class IoU of a trained segmenter; ``results.json``, ``overlays.png``."""
    from mimkit.eval.report import write_results

    model, config, state = load_segmenter(checkpoint)
    encoder_config = state["encoder_config"]
    dataset = open_seg_dataset(
        str(data),
        img_size=int(encoder_config["img_size"]),
        in_chans=int(encoder_config["in_chans"]),
        split=split,
        reduce_zero_label=config.data.reduce_zero_label,
        limit=limit,
    )
    out_dir = Path(out_dir)
    classes = list(state["classes"])
    results = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        **evaluate_segmenter(model, dataset, len(classes), classes, out_dir, config.num_pictures),
    }
    write_results(out_dir / "results.json", results)
    return results


def format_segmentation(results: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = training_lines(results)
    val = results.get("val", results if "mIoU" in results else None)
    if val is not None:
        scores = f"{val['mIoU']:.1f}  (pixel accuracy {val['pixel_accuracy']:.1f})"
        lines.append(f"mIoU            {scores} on {val['num_images']} images")
        per_class = ", ".join(f"{name} {'-' if v is None else f'{v:.1f}'}" for name, v in val["per_class_IoU"].items())
        lines.append(f"per-class IoU   {per_class}")
        lines.append(f"overlays        {val['overlays_png']}")
    return "\n".join(lines)
