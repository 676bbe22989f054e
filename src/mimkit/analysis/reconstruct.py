"""Reconstructions of masked images, and MAE-style PNG grids of them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from mimkit.data.folder import (
    DEFAULT_EVAL_CROP_RATIO,
    BadImageError,
    BadImageWarning,
    load_image,
    scan_image_folder,
)
from mimkit.data.transforms import EvalTransform, default_normalization
from mimkit.engine.checkpoint import atomic_write
from mimkit.layers import patchify, unpatchify
from mimkit.masking import MaskSpec, RandomMasker
from mimkit.models import MaskedImageModel, load_checkpoint
from mimkit.targets import PixelTarget

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
PANELS = ("original", "masked", "reconstruction", "pasted")


def fill_value(
    in_chans: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, grey: float = 0.5
) -> Tensor:
    """Per-channel value, in normalized input space, of the grey that hides patches: (C,).

    With ``mean`` and ``std`` it is ``grey`` (mid-grey by default) after de-normalization; without
    them it is 0, the data mean, which is also neutral.
    """
    if mean is None or std is None:
        return torch.zeros(in_chans)
    mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    if mean_t.numel() not in (1, in_chans) or std_t.numel() not in (1, in_chans):
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have 1 or {in_chans} values")
    return ((grey - mean_t) / std_t).expand(in_chans).clone()


def assemble_panels(images: Tensor, pred: Tensor, mask: Tensor, target: PixelTarget, fill: Tensor) -> dict[str, Tensor]:
    """The four reconstruction panels from predictions, in normalized input space.

    Args:
        images: (B, C, H, W) normalized inputs.
        pred: (B, L, p*p*C) decoder predictions (normalized per patch when ``target.norm_pix``).
        mask: (B, L) bool, True = hidden, or (B, L, p*p*C) per predicted value (a mask hiding parts of
            patches, :meth:`~mimkit.targets.PixelTarget.hidden_values`).
        target: the model's :class:`~mimkit.targets.PixelTarget` (``patch_size``, ``to_pixels``).
        fill: (C,) value that hidden patches get in the ``masked`` panel.

    Returns:
        ``original``, ``masked`` (hidden patches set to ``fill``), ``reconstruction`` (every patch
        predicted) and ``pasted`` (reconstruction with the visible patches replaced by the
        original), each (B, C, H, W).
    """
    _, chans, height, width = images.shape  # (B, C, H, W)
    patch_size = int(target.patch_size)
    grid = (height // patch_size, width // patch_size)
    patches = patchify(images, patch_size)  # (B, L, p*p*C)
    pixels = target.to_pixels(pred, images).to(images.dtype)  # (B, L, p*p*C)
    hidden = mask.to(images.device).bool()
    hidden = hidden.unsqueeze(-1) if hidden.dim() == 2 else hidden  # (B, L, 1) or (B, L, p*p*C)
    fill_patch = fill.to(images).repeat(patch_size * patch_size)  # (p*p*C,) in patchify's (p, p, C) order
    masked = torch.where(hidden, fill_patch, patches)  # (B, L, p*p*C)
    pasted = torch.where(hidden, pixels, patches)

    def image(x: Tensor) -> Tensor:
        return unpatchify(x, patch_size, grid, chans)  # (B, C, H, W)

    return {"original": images, "masked": image(masked), "reconstruction": image(pixels), "pasted": image(pasted)}


@torch.no_grad()
def reconstruct(
    model: MaskedImageModel,
    images: Tensor,
    *,
    mask_ratio: float | None = None,
    generator: torch.Generator | None = None,
    mask: MaskSpec | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Mask, encode and decode a batch and return what to look at, in normalized input space.

    The model runs in eval mode (no drop path) and without gradients; its training flag is
    restored afterwards.

    Args:
        model: a :class:`~mimkit.models.MaskedImageModel` with a pixel target.
        images: (B, C, H, W) normalized images on the model's device.
        mask_ratio: hide this fraction of patches with a :class:`~mimkit.masking.RandomMasker`
            instead of the model's own masker (which is left untouched).
        generator: random generator for the mask (reproducible pictures).
        mask: an explicit mask; overrides ``mask_ratio`` and the masker.
        mean: per-channel normalization mean; with ``std`` hidden patches become mid-grey.
        std: per-channel normalization std.

    Returns:
        ``original``, ``masked``, ``reconstruction``, ``pasted`` (each (B, C, H, W), see
        :func:`assemble_panels`), ``mask`` (B, L) bool True = hidden (per pixel, (B, H * W), for a mask
        that hides parts of patches), and ``norm_pix`` (0-d bool:
        whether predictions were de-normalized with each original patch's mean and std).
    """
    target = model.target
    if not isinstance(target, PixelTarget):
        raise TypeError(f"reconstruct draws pixel predictions; this model predicts {type(target).__name__} targets")
    was_training = model.training
    model.eval()
    try:
        if mask is None and mask_ratio is not None:
            mask = RandomMasker(mask_ratio)(images.shape[0], model.grid, generator=generator)
        out = model(images, mask=mask, generator=generator)
    finally:
        model.train(was_training)
    fill = fill_value(images.shape[1], mean, std)
    if out.spec.fine_mask is None:
        panels = assemble_panels(images, out.pred, out.mask, target, fill)
        return {**panels, "mask": out.mask.bool(), "norm_pix": torch.tensor(target.norm_pix)}
    panels = assemble_panels(images, out.pred, target.hidden_values(images, out.spec), target, fill)
    grid = (images.shape[-2] // target.patch_size, images.shape[-1] // target.patch_size)
    hidden_pixels = out.spec.hidden_map(grid, target.patch_size).flatten(1)  # (B, H * W)
    return {**panels, "mask": hidden_pixels, "norm_pix": torch.tensor(target.norm_pix)}


def to_display(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(B, C, H, W) normalized -> (B, H, W, C) in [0, 1] on the CPU."""
    chans = images.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).expand(chans).view(1, chans, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).expand(chans).view(1, chans, 1, 1)
    pixels = images.detach().float().cpu() * std_t + mean_t
    return pixels.clamp(0.0, 1.0).permute(0, 2, 3, 1)  # (B, H, W, C)


def pixel_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """(B, L) patch mask, raster order -> (B, H, W) pixel mask, for square patches tiling the image."""
    batch, length = mask.shape
    patch_size = round((height * width / length) ** 0.5)
    grid = (height // patch_size, width // patch_size)
    if grid[0] * patch_size != height or grid[1] * patch_size != width or grid[0] * grid[1] != length:
        raise ValueError(f"a mask of {length} patches does not tile {height}x{width} images with square patches")
    per_patch = mask.detach().cpu().bool().view(batch, *grid)  # (B, gh, gw)
    return per_patch.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)  # (B, H, W)


def save_reconstruction_grid(
    result: dict[str, Tensor],
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    title: str | None = None,
    norm_pix: bool | None = None,
    cell_inches: float = 1.6,
    dpi: int = 100,
) -> Path:
    """Save a PNG grid: one row per image, columns original | masked | reconstruction | reconstruction + visible.

    Hidden patches of the masked column are drawn mid-grey. The file is written atomically
    (temporary file in the same folder, then renamed), so a failed save never replaces a good picture.

    Args:
        result: output of :func:`reconstruct`.
        path: where the PNG goes; missing folders are created.
        mean: per-channel normalization mean used for the images.
        std: per-channel normalization std.
        title: first line of the figure title; the mask ratio and, when ``norm_pix``, how the
            predictions were de-normalized are always added.
        norm_pix: whether predictions were per-patch normalized; defaults to ``result["norm_pix"]``.
        cell_inches: size of one image cell.
        dpi: resolution.

    Returns:
        The path written.
    """
    path = Path(path)
    chans = result["original"].shape[1]
    if chans not in (1, 3):
        raise ValueError(f"can only draw 1- or 3-channel images, got {chans} channels")
    if norm_pix is None:
        norm_pix = bool(result.get("norm_pix", False))
    panels = [to_display(result[key], mean, std) for key in PANELS]  # each (B, H, W, C)
    rows = panels[0].shape[0]
    mask = result["mask"]
    # Hidden patches are drawn mid-grey whatever fill reconstruct() used, so they always stand out.
    panels[1][pixel_mask(mask, *panels[1].shape[1:3])] = 0.5
    hidden, total = int(mask[0].sum()), mask.shape[1]
    unit = "pixels" if total == panels[1].shape[1] * panels[1].shape[2] else "patches"
    lines = [title] if title else []
    lines.append(f"mask ratio {float(mask.float().mean()):.2f} ({hidden}/{total} {unit} hidden per image)")
    if norm_pix:
        lines.append("norm-pix predictions de-normalized with each original patch's mean and variance")

    height, width = panels[0].shape[1:3]
    cell_h = cell_inches * height / width
    line_inches = 0.17  # one 8-point text line with leading
    header = 0.1 + line_inches * (len(lines) + 1) + 0.1  # margin, title lines, column headers, gap
    figure_h = rows * cell_h * 1.05 + header  # 5 % of each cell for the gaps between rows
    figure = Figure(figsize=(4 * cell_inches, figure_h), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 4, squeeze=False)
    for row in range(rows):
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            picture = panel[row].numpy()
            if chans == 1:
                ax.imshow(picture[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(COLUMNS[col], fontsize=8)
    # Title anchored a fixed distance from the top so it never runs into the column headers.
    figure.suptitle("\n".join(lines), fontsize=8, y=1.0 - 0.1 / figure_h, va="top")
    figure.subplots_adjust(
        left=0.02, right=0.98, bottom=0.05 / figure_h, top=1.0 - header / figure_h, wspace=0.05, hspace=0.05
    )
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi))
    return path


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
    run_config = getattr(model, "run_config", None)
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
        checkpoint: anything :func:`~mimkit.models.load.load_checkpoint` reads.
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
    return save_reconstruction_grid(result, out, mean, std, title=title, norm_pix=bool(args["norm_pix_loss"]))
