"""Reconstructions of masked images and their MAE-style PNG grid: what a pretraining run draws while it
learns (:mod:`mimkit.engine.previews`), and what ``mimkit reconstruct`` draws for image files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from mimkit.files import atomic_write
from mimkit.layers import patchify, unpatchify
from mimkit.masking import MaskSpec, RandomMasker
from mimkit.models import MaskedImageModel
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
