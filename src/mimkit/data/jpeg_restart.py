"""``mimkit jpeg-restart``: a copy of an image folder whose JPEGs carry restart markers that tile their rows,
so that crops decode only the region they need (:mod:`mimkit.data.jpeg_regions`).

Each JPEG is re-encoded by Pillow with its own quantization tables and chroma subsampling (``quality="keep"``),
its EXIF and ICC profile; the pixels change by the re-quantization only (the PSNR against the original is
reported; 45-73 dB on the camera-like benchmark photos). Other files are copied unchanged, so the copy is a
complete data set with the same folders. Every file is written atomically and files already in the copy
are kept, so an interrupted conversion continues where it stopped. A file that does not decode is not
written and is named at the end.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, JpegImagePlugin
from tqdm import tqdm

from mimkit.files import atomic_write

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def restart_interval(mcus_per_row: int, mcu_width: int, max_width: int = 128) -> int:
    """MCUs per restart segment for a file to be cut into regions: the largest divisor of the MCUs per row
    whose segment is at most ``max_width`` pixels wide (segments tile the rows; 1 when nothing else does)."""
    return max(d for d in range(1, max(max_width // mcu_width, 1) + 1) if mcus_per_row % d == 0)


def with_restart_markers(data: bytes) -> tuple[bytes, float]:
    """A JPEG re-encoded with restart markers that tile its MCU rows (:func:`restart_interval`), with its own
    quantization tables and chroma subsampling, EXIF and ICC profile, and the PSNR of its pixels against the
    original's (dB; ``inf`` when identical). Progressive files come back sequential.

    Raises:
        OSError, ValueError: not a JPEG Pillow can decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        if not isinstance(image, JpegImagePlugin.JpegImageFile):
            raise ValueError(f"not a JPEG but {image.format}")
        image.load()
        sampling = JpegImagePlugin.get_sampling(image)  # 0: 4:4:4, 1: 4:2:2, 2: 4:2:0, -1: other, grey, CMYK
        keep: dict[str, object] = {"quality": "keep"}  # the file's quantization tables and subsampling
        if sampling < 0 and image.mode in ("RGB", "YCbCr"):  # a subsampling Pillow cannot write: 4:2:0
            keep, sampling = {"qtables": image.quantization, "subsampling": 2}, 2
        mcu_width = 16 if sampling in (1, 2) else 8
        interval = restart_interval(math.ceil(image.width / mcu_width), mcu_width)
        extra = {key: image.info[key] for key in ("exif", "icc_profile") if image.info.get(key)}
        out = io.BytesIO()
        image.save(out, "JPEG", restart_marker_blocks=interval, **keep, **extra)
        original = np.asarray(image, dtype=np.float64)
    with Image.open(out) as again:
        error = float(np.mean((np.asarray(again, dtype=np.float64) - original) ** 2))
    return out.getvalue(), math.inf if error == 0 else 10 * math.log10(255**2 / error)


def _copy(path: Path, handle: BinaryIO) -> None:
    with path.open("rb") as source:
        shutil.copyfileobj(source, handle)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


@dataclass
class RestartSummary:
    """What :func:`add_restart_markers` did: files re-encoded, copied, already there and failed, the bytes
    before and after re-encoding, and the lowest and mean PSNR of the re-encoded pixels (dB)."""

    encoded: int = 0
    copied: int = 0
    kept: int = 0
    failed: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    psnr: list[float] = field(default_factory=list)

    def format(self) -> str:
        finite = [value for value in self.psnr if math.isfinite(value)]
        quality = f", PSNR min {min(finite):.1f} dB, mean {np.mean(finite):.1f} dB" if finite else ""
        size = (
            f" ({self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB{quality})" if self.encoded else ""
        )
        lines = [f"{_count(self.encoded, 'JPEG')} re-encoded with restart markers{size}, "
                 f"{_count(self.copied, 'other file')} copied, {self.kept} already there"]  # fmt: skip
        if self.failed:
            lines.append(f"{len(self.failed)} not decodable, not written: " + ", ".join(self.failed[:10]))
        return "\n".join(lines)


def add_restart_markers(src: str | Path, dst: str | Path, *, progress: bool = True) -> RestartSummary:
    """Copy the folder ``src`` to ``dst`` (same relative paths) with every JPEG re-encoded by
    :func:`with_restart_markers` and every other file copied as it is.

    Raises:
        NotADirectoryError: ``src`` is not a folder; ValueError: ``dst`` is ``src`` or inside it.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder of images")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"the copy {dst} must not be {src} or inside it")
    files = sorted(path for path in src.rglob("*") if path.is_file() and not path.name.startswith("."))
    summary = RestartSummary()
    for path in tqdm(files, desc="jpeg-restart", unit="file", disable=not progress):
        target = dst / path.relative_to(src)
        if target.exists():
            summary.kept += 1
            continue
        if path.suffix.lower() not in JPEG_SUFFIXES:
            atomic_write(target, lambda handle, path=path: _copy(path, handle))
            summary.copied += 1
            continue
        data = path.read_bytes()
        try:
            encoded, psnr = with_restart_markers(data)
        except (OSError, ValueError, SyntaxError) as err:  # Pillow's errors for files that do not decode
            log.warning("%s: not written (%s: %s)", path, type(err).__name__, err)
            summary.failed.append(str(path.relative_to(src)))
            continue
        atomic_write(target, lambda handle, encoded=encoded: handle.write(encoded), needed=len(encoded))
        summary.encoded += 1
        summary.bytes_in += len(data)
        summary.bytes_out += len(encoded)
        summary.psnr.append(psnr)
    return summary
