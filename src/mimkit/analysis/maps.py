"""Pictures of token relations: attention maps, Ncut bipartitions, informed masks, and exploitation-rate curves.

All figures use matplotlib's Agg canvas (no display needed) and are written atomically as PNG, so a
failed save never replaces a good picture.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from mimkit.analysis.reconstruct import pixel_mask, to_display
from mimkit.engine.logging import read_metrics
from mimkit.files import atomic_write

__all__ = [
    "MAP_COLUMNS",
    "crossing_step",
    "exploitation_records",
    "plot_exploitation",
    "save_foreground_rules",
    "save_relation_maps",
]

MAP_COLUMNS = ("image", "class-token attention", "Ncut foreground", "informed mask")
EXPLOITATION_KEYS = ("exploitation/visible", "exploitation/mask")
SWITCH_KEY = "self_guided/switch_step"
FOREGROUND_TINT = (1.0, 0.25, 0.1)  # red-orange: stands out on gray and on most photos


def _check_patch_maps(images: Tensor, maps: dict[str, Tensor]) -> tuple[int, int, int]:
    """Refuse images that are not 1- or 3-channel and per-patch maps that are not (B, L); return (B, H, W)."""
    batch, chans, height, width = images.shape
    if chans not in (1, 3):
        raise ValueError(f"can only draw 1- or 3-channel images, got {chans} channels")
    for name, value in maps.items():
        if value.ndim != 2 or value.shape[0] != batch:
            raise ValueError(f"{name} must be ({batch}, L), got shape {tuple(value.shape)}")
    return batch, height, width


def _as_rgb(pixels: Tensor) -> Tensor:
    """(B, H, W, C) with C in (1, 3) -> (B, H, W, 3)."""
    return pixels.expand(-1, -1, -1, 3) if pixels.shape[-1] == 1 else pixels


def save_relation_maps(
    images: Tensor,
    attention: Tensor,
    foreground: Tensor,
    informed: Tensor,
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    title: str | None = None,
    attention_label: str = "class-token attention",
    cell_inches: float = 1.6,
    dpi: int = 100,
) -> Path:
    """Save a PNG grid, one row per image: image | attention map | Ncut foreground | informed mask.

    The attention map is upsampled from the patch grid to the image (each patch one flat cell) and
    drawn over the image, normalized per image to its maximum; the foreground side of the Ncut
    bipartition is tinted; hidden patches of the informed mask are drawn mid-grey.

    Args:
        images: (B, C, H, W) normalized images, C in (1, 3).
        attention: (B, L) attention per patch in raster order (e.g. class-token attention, or the mean
            attention each patch receives).
        foreground: (B, L) bool, True = foreground cluster.
        informed: (B, L) bool, True = hidden by the informed mask (see :func:`~mimkit.masking.informed_mask`).
        path: where the PNG goes; missing folders are created.
        mean: per-channel normalization mean of ``images``.
        std: per-channel normalization std.
        title: figure title.
        attention_label: heading of the attention column.
        cell_inches: size of one image cell.
        dpi: resolution.

    Returns:
        The path written.
    """
    path = Path(path)
    batch, height, width = _check_patch_maps(
        images, {"attention": attention, "foreground": foreground, "informed": informed}
    )
    pixels = _as_rgb(to_display(images, mean, std))  # (B, H, W, 3)
    fg_pixels = pixel_mask(foreground, height, width)  # (B, H, W) bool
    hidden_pixels = pixel_mask(informed, height, width)  # (B, H, W) bool
    patch_size = round((height * width / attention.shape[1]) ** 0.5)
    grid = (height // patch_size, width // patch_size)
    heat = attention.detach().float().cpu().view(batch, 1, *grid)  # (B, 1, gh, gw)
    heat = F.interpolate(heat, size=(height, width), mode="nearest")[:, 0]  # (B, H, W)
    heat = heat / heat.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]  # (B, H, W) in [0, 1]
    tint = torch.tensor(FOREGROUND_TINT)
    tinted = torch.where(fg_pixels[..., None], 0.45 * pixels + 0.55 * tint, pixels)  # (B, H, W, 3)
    masked = torch.where(hidden_pixels[..., None], torch.tensor(0.5), pixels)  # (B, H, W, 3)

    line_inches = 0.17
    lines = 1 if title else 0
    header = 0.1 + line_inches * (lines + 1) + 0.1
    cell_h = cell_inches * height / width
    figure_h = batch * cell_h * 1.05 + header
    figure = Figure(figsize=(len(MAP_COLUMNS) * cell_inches, figure_h), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(batch, len(MAP_COLUMNS), squeeze=False)
    for row in range(batch):
        panels = [pixels[row], pixels[row], tinted[row], masked[row]]
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(panel.numpy(), interpolation="nearest", vmin=0.0, vmax=1.0)
            if col == 1:
                ax.imshow(heat[row].numpy(), cmap="inferno", alpha=0.65, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(attention_label if col == 1 else MAP_COLUMNS[col], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=8, y=1.0 - 0.1 / figure_h, va="top")
    figure.subplots_adjust(
        left=0.02, right=0.98, bottom=0.05 / figure_h, top=1.0 - header / figure_h, wspace=0.05, hspace=0.05
    )
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi))
    return path


def exploitation_records(metrics_path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` that hold both ``exploitation/visible`` and ``exploitation/mask``.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    return [record for record in _read_records(metrics_path) if all(key in record for key in EXPLOITATION_KEYS)]


def crossing_step(records: Sequence[dict[str, Any]]) -> float | None:
    """Step of the first record where ``exploitation/mask`` rises above ``exploitation/visible`` after an
    earlier record at or below it (the paper's crossing), or None when the curves never cross that way."""
    seen_below = False
    for record in records:
        above = float(record[EXPLOITATION_KEYS[1]]) > float(record[EXPLOITATION_KEYS[0]])
        if above and seen_below:
            return float(record["step"])
        seen_below = seen_below or not above
    return None


def _read_records(metrics_path: str | Path) -> list[dict[str, Any]]:
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        raise FileNotFoundError(f"metrics file {metrics_path} does not exist; point to a run's metrics.jsonl")
    return read_metrics(metrics_path)


def _switch_step(records: Sequence[dict[str, Any]]) -> float | None:
    """Step of the first record holding ``self_guided/switch_step``: its value when numeric, else its step."""
    for record in records:
        if SWITCH_KEY in record:
            value = record[SWITCH_KEY]
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                return float(value)
            return float(record["step"])
    return None


def plot_exploitation(metrics_path: str | Path, out_png: str | Path, *, dpi: int = 100) -> Path:
    """Plot a run's exploitation rate of visible and mask tokens against the step.

    Draws ``exploitation/visible`` (``Rhat_{V->O}``) and ``exploitation/mask`` (``Rhat_{M->O}``) of every
    record that has both (see :mod:`mimkit.analysis.exploitation`), marks the first crossing of the mask
    curve above the visible one (:func:`crossing_step`) and, when a record holds
    ``self_guided/switch_step``, a vertical line where Self-Guided MAE switched to informed masking.

    Args:
        metrics_path: a run's ``metrics.jsonl``.
        out_png: the PNG to write (atomically).
        dpi: resolution.

    Returns:
        ``out_png`` as a Path.

    Raises:
        FileNotFoundError: ``metrics_path`` does not exist.
        ValueError: no record holds the exploitation keys.
    """
    out_png = Path(out_png)
    all_records = _read_records(metrics_path)
    records = [record for record in all_records if all(key in record for key in EXPLOITATION_KEYS)]
    if not records:
        raise ValueError(
            f"{metrics_path} has no record with {' and '.join(EXPLOITATION_KEYS)}; log the exploitation rate "
            "during pretraining (log.exploitation=true)"
        )
    steps = [float(record["step"]) for record in records]
    figure = Figure(figsize=(6.0, 3.6), dpi=dpi)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.plot(steps, [float(r[EXPLOITATION_KEYS[0]]) for r in records], label="visible tokens (R V->O)", color="C0")
    ax.plot(steps, [float(r[EXPLOITATION_KEYS[1]]) for r in records], label="mask tokens (R M->O)", color="C3")
    crossing = crossing_step(records)
    if crossing is not None:
        ax.axvline(crossing, color="C2", linestyle=":", linewidth=1.2, label=f"curves cross at step {crossing:g}")
    switch = _switch_step(all_records)
    if switch is not None:
        ax.axvline(switch, color="0.3", linestyle="--", linewidth=1.0, label=f"informed masking from step {switch:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("exploitation rate (rolled out)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("decoder exploitation rate of visible and mask tokens", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(out_png, lambda handle: figure.savefig(handle, format="png", dpi=dpi))
    return out_png


def save_foreground_rules(
    images: Tensor,
    foregrounds: dict[str, Tensor],
    path: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    title: str | None = None,
    cell_inches: float = 1.6,
    dpi: int = 100,
) -> Path:
    """Save a PNG grid, one row per image: the image, then its object side under each rule, tinted.

    Args:
        images: (B, C, H, W) normalized images, C in (1, 3).
        foregrounds: rule name -> (B, L) bool object side (see :func:`~mimkit.masking.choose_foreground`).
        path: where the PNG goes.
        mean: per-channel normalization mean of ``images``.
        std: per-channel normalization std.
        title: figure title.
        cell_inches: size of one image cell.
        dpi: resolution.

    Returns:
        The path written.
    """
    path = Path(path)
    batch, height, width = _check_patch_maps(
        images, {f"foreground {name!r}": value for name, value in foregrounds.items()}
    )
    pixels = _as_rgb(to_display(images, mean, std))  # (B, H, W, 3)
    tint = torch.tensor(FOREGROUND_TINT)
    panels = [pixels] + [
        torch.where(pixel_mask(side, height, width)[..., None], 0.45 * pixels + 0.55 * tint, pixels)  # (B, H, W, 3)
        for side in foregrounds.values()
    ]
    names = ["image"] + [f"object side: {name}" for name in foregrounds]
    header = 0.1 + 0.17 * ((1 if title else 0) + 1) + 0.1
    figure_h = batch * cell_inches * height / width * 1.05 + header
    figure = Figure(figsize=(len(panels) * cell_inches, figure_h), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(batch, len(panels), squeeze=False)
    for row in range(batch):
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(panel[row].numpy(), interpolation="nearest", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(names[col], fontsize=7)
    if title:
        figure.suptitle(title, fontsize=8, y=1.0 - 0.1 / figure_h, va="top")
    figure.subplots_adjust(
        left=0.02, right=0.98, bottom=0.05 / figure_h, top=1.0 - header / figure_h, wspace=0.05, hspace=0.05
    )
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi))
    return path
