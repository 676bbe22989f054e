"""A picture of what pretraining is trained on: one augmented batch beside the originals with the crop boxes.

``mimkit show-batch --config C [key=value ...] --out batch.png [--boxes boxes.json]`` draws the first batch
of epoch 0 exactly as the training loop builds it (same order, same per-sample crops and flips, normalized
then denormalized), each crop beside its original image with the crop box outlined (red; dashed corner
mark when the crop is mirrored). ``--boxes`` writes, per crop, the source file, the original width and
height, the box ``[x, y, w, h]`` in the original's pixels and whether it was flipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from mimkit.config import Config
from mimkit.data import CropDataset, CropRecord, build_training_dataset, denormalize
from mimkit.data.crops import CropBox
from mimkit.data.loader import EpochBatchSampler
from mimkit.data.transforms import MAEAugment, Normalize, random_resized_crop_params
from mimkit.engine.pretrain import step_generator

BOX_COLOUR = (255, 40, 40)


def _original(dataset: Any, index: int) -> Image.Image:
    """The original image of a sample (RGB for drawing)."""
    pixels = dataset.original(index) if isinstance(dataset, CropDataset) else dataset.images[index].numpy()
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    return image.convert("RGB")


def first_batch(config: Config) -> tuple[torch.Tensor, list[CropRecord], list[Image.Image]]:
    """The first training batch of epoch 0 (rank 0), as the loop sees it before the model.

    Returns:
        (B, C, S, S) normalized images, each crop's record, and each original image.
    """
    cfg = config
    dataset = build_training_dataset(
        cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.train.batch_size, seed=cfg.train.seed
    )
    mean, std = cfg.normalization()
    sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, seed=cfg.train.seed, drop_last=True)
    indices = [int(i) for i in sampler.batches()[0]]
    originals = [_original(dataset, index) for index in indices]
    records: list[CropRecord] = []
    if isinstance(dataset, CropDataset):
        crops = []
        for index in indices:
            pixels, record = dataset.crop(index, 0)
            crops.append(torch.from_numpy(pixels))
            records.append(record)
        batch = Normalize(mean, std)(torch.stack(crops))  # (B, C, S, S)
        return batch, records, originals
    # Fashion-MNIST: the loop's batched MAEAugment with the generator of step 0, whose boxes are redrawn here
    squares = dataset.images[indices]  # (B, C, H, W) uint8
    augment = MAEAugment(cfg.model.img_size, cfg.data.crop_scale, cfg.data.crop_ratio, cfg.data.hflip, mean, std)
    batch = augment(squares, generator=step_generator(cfg.train.seed, 0, 0))
    generator = step_generator(cfg.train.seed, 0, 0)
    height, width = squares.shape[-2:]
    boxes = random_resized_crop_params(len(indices), height, width, augment.scale, augment.ratio, generator)
    flips = (
        torch.rand(len(indices), generator=generator) < 0.5
        if cfg.data.hflip
        else torch.zeros(len(indices), dtype=torch.bool)
    )
    for index, (top, left, crop_h, crop_w), flip in zip(indices, boxes.tolist(), flips.tolist(), strict=True):
        box = CropBox(int(left), int(top), int(crop_w), int(crop_h), bool(flip))
        records.append(CropRecord(f"{cfg.data.dataset}[{index}]", int(width), int(height), box))
    return batch, records, originals


def draw_batch(
    batch: torch.Tensor,
    records: list[CropRecord],
    originals: list[Image.Image],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    cell: int = 160,
    columns: int = 4,
) -> Image.Image:
    """Pairs (original with its crop box, the denormalized crop), ``columns`` pairs per row."""
    shown = (denormalize(batch, mean, std) * 255).round().byte()  # (B, C, S, S)
    rows = -(-len(records) // columns)
    gap = 6
    canvas = Image.new("RGB", (columns * (2 * cell + 3 * gap), rows * (cell + 2 * gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for position, (crop, record, original) in enumerate(zip(shown, records, originals, strict=True)):
        x0 = (position % columns) * (2 * cell + 3 * gap) + gap
        y0 = (position // columns) * (cell + 2 * gap) + gap
        factor = cell / max(original.width, original.height)
        thumb = original.resize((max(1, round(original.width * factor)), max(1, round(original.height * factor))))
        canvas.paste(thumb, (x0, y0))
        b = record.box
        sx, sy = thumb.width / record.width, thumb.height / record.height
        rect = (x0 + b.left * sx, y0 + b.top * sy, x0 + (b.left + b.width) * sx - 1, y0 + (b.top + b.height) * sy - 1)
        draw.rectangle(rect, outline=BOX_COLOUR, width=2)
        if b.flip:  # a mark in the box's top-right corner: this crop is mirrored
            draw.line((rect[2] - 10, rect[1] + 3, rect[2] - 3, rect[1] + 3), fill=BOX_COLOUR, width=2)
        pixels = crop.numpy()
        tile = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).convert("RGB")
        canvas.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (x0 + cell + gap, y0))
    return canvas


def show_batch(
    config: Config, out: str | Path, boxes: str | Path | None = None, limit: int | None = None
) -> list[CropRecord]:
    """Write the first training batch as a PNG (and its boxes as JSON).

    Args:
        config: the run's config.
        out: the PNG to write.
        boxes: a JSON file to write the crop records to.
        limit: draw only the first ``limit`` samples of the batch.

    Returns:
        The drawn samples' records.
    """
    batch, records, originals = first_batch(config)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        batch, records, originals = batch[:limit], records[:limit], originals[:limit]
    mean, std = config.normalization()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_batch(batch, records, originals, mean, std).save(out)
    if boxes is not None:
        Path(boxes).write_text(json.dumps([record.to_dict() for record in records], indent=1))
    return records
