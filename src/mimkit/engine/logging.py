"""Metrics to ``metrics.jsonl`` (always) and TensorBoard (optional)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mimkit.files import atomic_write, disk_full_error, is_disk_full


class MetricsLogger:
    """Append one JSON object per record to ``out_dir/metrics.jsonl`` and mirror scalars to TensorBoard.

    Args:
        out_dir: run directory.
        tensorboard: also write TensorBoard event files under ``out_dir/tb``.
        resume_step: when resuming, records after this step (written after the checkpoint that is
            resumed from) are dropped so the file describes one consistent run.
    """

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = "".join(line + "\n" for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step)
            atomic_write(self.path, lambda handle: handle.write(kept.encode()))  # a kill here loses no record
        elif resume_step is None:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one record; non-numeric values go to the JSON file only.

        Raises:
            DiskFullError: no space left for the record (one line with the space free and needed).
        """
        line = json.dumps({"step": step, **metrics}) + "\n"
        try:
            with self.path.open("a") as handle:
                handle.write(line)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(self.path, len(line.encode())) from err
            raise
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """A (H, W, 3) uint8 picture to TensorBoard (nothing without it)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Drop the record."""

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """Drop the picture."""

    def close(self) -> None:
        """Nothing to close."""


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
