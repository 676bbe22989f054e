"""Reconstructions of image files with a checkpoint, drawn as MAE-style PNG grids (``mimkit reconstruct``).

The reconstruction and the grid themselves live in :mod:`mimkit.engine.reconstruction`, which pretraining
also draws its pictures with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mimkit.build import load_checkpoint
from mimkit.data.folder import (
    DEFAULT_EVAL_CROP_RATIO,
    BadImageError,
    BadImageWarning,
    load_image,
    scan_image_folder,
)
from mimkit.data.transforms import EvalTransform, default_normalization
from mimkit.engine.reconstruction import (
    COLUMNS,
    PANELS,
    assemble_panels,
    fill_value,
    pixel_mask,
    reconstruct,
    save_reconstruction_grid,
    to_display,
)
from mimkit.models import MaskedImageModel

__all__ = [
    "COLUMNS",
    "PANELS",
    "assemble_panels",
    "fill_value",
    "image_paths",
    "load_model_images",
    "pixel_mask",
    "reconstruct",
    "reconstruct_files",
    "save_reconstruction_grid",
    "to_display",
]


def image_paths(images: Sequence[str | Path]) -> list[Path]:
    """Files as given, then each folder's images (recursive, sorted), without repeats."""
    paths: list[Path] = []
    for entry in map(Path, images):
        if entry.is_dir():
            with warnings.catch_warnings():  # labelled-or-not layout warnings do not matter here
                warnings.simplefilter("ignore", UserWarning)
                paths.extend(scan_image_folder(entry)[0])
        elif entry.exists():
            paths.append(entry)
        else:
            raise FileNotFoundError(f"image file or folder {entry} does not exist")
    return list(dict.fromkeys(paths))


def load_model_images(
    model: MaskedImageModel, images: Sequence[str | Path], *, limit: int
) -> tuple[Tensor, list[Path], tuple[float, ...], tuple[float, ...]]:
    """Decode image files for a model, normalized as it was trained.

    Unreadable files are skipped with a :class:`~mimkit.data.folder.BadImageWarning`.

    Args:
        model: the model (its ``config`` gives ``in_chans`` and ``img_size``; its ``run_config`` the
            normalization and evaluation crop ratio, else those of ``"folder"`` data: ImageNet's statistics and
            MAE's 0.875, the shorter side resized to ``img_size / 0.875`` before the central square).
        images: image files and/or folders (searched recursively, in sorted order).
        limit: keep at most this many readable images.

    Returns:
        ``(batch, paths, mean, std)``: (B, C, S, S) normalized images, the files they came from, and
        the per-channel normalization.

    Raises:
        FileNotFoundError: a given file or folder does not exist.
        ValueError: ``limit`` < 1, or none of the images can be read.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    paths = image_paths(images)
    in_chans, img_size = int(model.config["in_chans"]), int(model.config["img_size"])
    decoded: list[np.ndarray] = []
    used: list[Path] = []
    skipped: list[BadImageError] = []
    run_config = model.run_config
    crop_ratio = DEFAULT_EVAL_CROP_RATIO if run_config is None else run_config.data.eval_crop_ratio
    for path in paths:
        try:
            decoded.append(load_image(path, in_chans=in_chans, size=img_size, crop_ratio=crop_ratio))  # (C, S, S)
        except BadImageError as error:
            skipped.append(error)
            warnings.warn(f"skipped unreadable image {error.path} ({error.reason})", BadImageWarning, stacklevel=2)
            continue
        used.append(path)
        if len(decoded) == limit:
            break
    if not decoded:
        first = "; ".join(f"{error.path}: {error.reason}" for error in skipped[:3])
        raise ValueError(f"none of the {len(paths)} image files could be read ({first or 'no image files found'})")
    if run_config is not None:
        mean, std = run_config.normalization()
    else:
        mean, std = default_normalization(in_chans, "folder")
    batch = EvalTransform(img_size, mean=mean, std=std)(torch.from_numpy(np.stack(decoded)))  # (B, C, S, S)
    return batch, used, tuple(mean), tuple(std)


def reconstruct_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    mask_ratio: float | None = None,
    seed: int = 0,
    limit: int = 16,
) -> Path:
    """Load a checkpoint, reconstruct masked image files and save the PNG grid (``mimkit reconstruct``).

    Images are decoded with :func:`~mimkit.data.folder.load_image` at the model's channels and size
    (shorter side resized, center square) and normalized as in training: the checkpoint's
    ``data.mean``/``data.std``, else :func:`~mimkit.data.transforms.default_normalization` of its data
    set, or of ``"folder"`` when the checkpoint has no run config (MAE and HuggingFace checkpoints).

    Args:
        checkpoint: anything :func:`~mimkit.build.load_checkpoint` reads.
        images: image files and/or folders (searched recursively, in sorted order).
        out: the PNG to write (atomically).
        mask_ratio: fraction of patches to hide; the model's own when None.
        seed: seed of the random mask.
        limit: draw at most this many images (the first readable ones).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: ``limit`` < 1, or none of the images can be read.
        FileNotFoundError: a given file or folder does not exist.
        CheckpointError: the checkpoint cannot be loaded.
    """
    model = load_checkpoint(checkpoint)
    args = model.config
    batch, _, mean, std = load_model_images(model, images, limit=limit)
    result = reconstruct(
        model, batch, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(seed), mean=mean, std=std
    )
    depth, width = args.get("depth"), args.get("embed_dim")
    title = f"{args.get('name', model.name)} ({width}-d x {depth}) from {Path(checkpoint).name}"
    return save_reconstruction_grid(result, out, mean, std, title=title, norm_pix=bool(args["norm_pix"]))
