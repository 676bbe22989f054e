"""Random-resized crops from the original images, as MAE's pretraining sees them.

Each sample's crop box is drawn on the original image (after EXIF orientation) with torchvision's
``RandomResizedCrop.get_params`` distribution, from a generator seeded by ``(seed, epoch, index)``; the
crop is mirrored with probability 0.5 and resized to ``img_size`` with an antialiased bicubic filter (see
below). Normalization happens later, on whole batches (:class:`~mimkit.data.transforms.Normalize`).

Only what the crop needs is decoded: a JPEG whose crop box is at least 2, 4 or 8 times ``img_size`` on
both sides is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling, Pillow's ``draft``),
and the box is mapped onto the reduced image; and libjpeg stops after the last row the crop (and the
resampling filter around it) reads, instead of decoding the rest of the file. Rows are decoded top to
bottom, so rows above the crop must still be decoded; the rows it does decode are bit-identical to those
of a whole decode. A JPEG with restart markers (``mimkit jpeg-restart`` writes them) is cut instead: only
the segments around the crop are decoded (:mod:`mimkit.data.jpeg_regions`), their pixels again those of a
whole decode. A crop that needs no reduced decode is cut from the decoded pixels and resized by
torch's antialiased bicubic interpolation on uint8 (crop then resize, as torchvision's reference does;
three times faster than Pillow's resampling, 73.9 dB PSNR from torchvision's ``resized_crop`` on a real
photo); a box on a reduced image or on the cache has fractional edges and is resized by Pillow's bicubic
filter. The result equals the crop of the full decode up to the resampling difference (PSNR in the
docs/pretraining.md, "Photos as MAE sees them").

:class:`CropDataset` wraps an :class:`~mimkit.data.folder.ImageFolderDataset` or
:class:`~mimkit.data.shards.TarShardDataset` (which keep the scanning, labels and bad-file handling) and
either streams every crop from the file or crops from an in-memory cache that holds each image at its
aspect ratio, shorter side ``cache_size``.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps
from torch import Tensor

from mimkit.data.folder import (
    DEFAULT_MEMORY_BUDGET,
    BadImageError,
    _check_pixel_count,
    _to_channels,
    decode_or_next,
    load_image,
    map_items,
    report_skipped,
)
from mimkit.data.jpeg_regions import EOI, read_layout, region_bounds, region_stream

log = logging.getLogger(__name__)

DRAFT_SCALES = (8, 4, 2)  # libjpeg's DCT-domain reductions that Pillow's draft exposes
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_MIRRORED_X = (2, 3, 6, 7)  # ... whose oriented x axis runs against the stored axis it comes from
_MIRRORED_Y = (3, 4, 7, 8)  # ... whose oriented y axis does
_BROKEN = -2  # Pillow's decoder status for a libjpeg error; also what stopping before the last row gives
# stopping early drives Pillow's JPEG decoder directly; without those internals, files are decoded whole
_CAN_STOP_EARLY = hasattr(Image, "_getdecoder") and hasattr(ImageFile.ImageFile, "load_prepare")
_ESTIMATE_HEADERS = 256  # image headers read to estimate the cache's size


@dataclass(frozen=True)
class CropBox:
    """A crop of the original image, in its pixels: ``left``, ``top``, ``width``, ``height``; ``flip``
    mirrors the resized crop."""

    left: int
    top: int
    width: int
    height: int
    flip: bool = False


@dataclass(frozen=True)
class CropRecord:
    """What one training sample was cut from: the file, its size (after EXIF orientation) and the box."""

    source: str
    width: int
    height: int
    box: CropBox

    def to_dict(self) -> dict[str, Any]:
        """``{"source", "width", "height", "box": [x, y, w, h], "flip"}`` for JSON."""
        b = self.box
        return {
            "source": self.source,
            "width": self.width,
            "height": self.height,
            "box": [b.left, b.top, b.width, b.height],
            "flip": b.flip,
        }


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample's crop and flip: a pure function of ``(seed, epoch, index)``, so a
    resumed run, any number of loader workers and any number of ranks draw the same crops."""
    return random.Random((seed * 1_000_003 + epoch) * 2**40 + index)


def draw_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
    hflip: bool = True,
) -> CropBox:
    """One crop box with torchvision's ``RandomResizedCrop.get_params`` semantics, then a flip draw.

    Up to 10 draws of an area fraction (uniform in ``scale``) and an aspect ratio (log-uniform in
    ``ratio``); the first whose rounded box fits is placed uniformly at random; if none fits, the
    central crop of the largest box with its aspect ratio clamped to ``ratio``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randrange(height - crop_h + 1)
            left = rng.randrange(width - crop_w + 1)
            break
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            crop_w, crop_h = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            crop_w, crop_h = round(height * max(ratio)), height
        else:
            crop_w, crop_h = width, height
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    flip = hflip and rng.random() < 0.5
    return CropBox(left, top, crop_w, crop_h, flip)


def draft_scale(box: CropBox, img_size: int) -> int:
    """The largest JPEG reduction (8, 4, 2 or 1) that keeps both sides of the box at least ``img_size``."""
    for scale in DRAFT_SCALES:
        if box.width >= scale * img_size and box.height >= scale * img_size:
            return scale
    return 1


def _orientation(opened: Image.Image) -> int:
    if opened.format not in ("JPEG", "TIFF", "WEBP", "PNG"):
        return 1
    return int(opened.getexif().get(0x0112, 1))


def _oriented_size(opened: Image.Image) -> tuple[int, int]:
    width, height = opened.size
    return (height, width) if _orientation(opened) in _TRANSPOSED_ORIENTATIONS else (width, height)


def stored_region(box: CropBox, width: int, height: int, orientation: int, img_size: int) -> tuple[int, int, int, int]:
    """The pixels ``(left, top, right, bottom)`` of the stored (not yet EXIF-oriented) image that hold the box
    and the pixels Pillow's bicubic filter reads around it when resizing it to ``img_size``, in original
    pixels (clipped to the stored image).

    Args:
        box: on the oriented image; width, height: the oriented image's size.
        orientation: the EXIF orientation (1-8) that turns the stored image into the oriented one.
    """
    # the box's extent along the oriented x and y axes, mirrored where the stored axis runs the other way;
    # the stored image's x axis is the oriented x (1-4) or y (5-8) axis
    x = (box.left, box.left + box.width, width)
    y = (box.top, box.top + box.height, height)
    mirrored_x, mirrored_y = orientation in _MIRRORED_X, orientation in _MIRRORED_Y
    if mirrored_x:
        x = (width - x[1], width - x[0], width)
    if mirrored_y:
        y = (height - y[1], height - y[0], height)
    stored_x, stored_y = (y, x) if orientation in _TRANSPOSED_ORIENTATIONS else (x, y)

    def widened(span: tuple[int, int, int]) -> tuple[int, int]:
        start, stop, size = span
        margin = math.ceil(2 * max((stop - start) / img_size, 1)) + 2  # bicubic support: 2 output pixels
        return max(start - margin, 0), min(stop + margin, size)

    (left, right), (top, bottom) = widened(stored_x), widened(stored_y)
    return left, top, right, bottom


def stored_rows_needed(box: CropBox, width: int, height: int, orientation: int, img_size: int) -> int:
    """How many rows of the stored image, from the top, a crop needs (see :func:`stored_region`)."""
    return stored_region(box, width, height, orientation, img_size)[3]


def _region_offset(orientation: int, region: tuple[int, int, int, int], stored: tuple[int, int]) -> tuple[int, int]:
    """Where a stored region (left, top, right, bottom) lands on the oriented image: the oriented
    (left, top) of its corner, all in the same pixels; ``stored``: the stored image's (width, height)."""
    left, top, right, bottom = region
    width, height = stored
    mirrored_x, mirrored_y = orientation in _MIRRORED_X, orientation in _MIRRORED_Y
    if orientation in _TRANSPOSED_ORIENTATIONS:  # the oriented x axis is the stored y axis and vice versa
        return (height - bottom if mirrored_x else top), (width - right if mirrored_y else left)
    return (width - right if mirrored_x else left), (height - bottom if mirrored_y else top)


def _load_top_rows(opened: ImageFile.ImageFile, data: bytes, rows: int) -> None:
    """Decode only the first ``rows`` rows of an opened (possibly drafted) JPEG; the rows below stay
    undefined. libjpeg stops there, so the rest of the entropy-coded data is never read.

    Raises:
        OSError: the data is cut off before ``rows`` rows, or libjpeg fails.
    """
    ((decoder_name, _, offset, args),) = opened.tile
    opened.load_prepare()  # allocates the pixels
    decoder = Image._getdecoder(opened.mode, decoder_name, args, opened.decoderconfig)
    try:
        decoder.setimage(opened.im, (0, 0, opened.width, rows))
        consumed, status = decoder.decode(memoryview(data)[offset:])
    finally:
        decoder.cleanup()
    if consumed >= 0:  # libjpeg still waits for data: the file ends before the rows it needs
        raise OSError(f"image file is truncated (cut off before row {rows})")
    if status < 0 and not (status == _BROKEN and rows < opened.height):
        raise OSError(f"decoder error {status} when reading image file")
    opened.tile = []


def _decode_region(
    data: bytes, region: tuple[int, int, int, int], scale: int, gray: str | None
) -> tuple[Image.Image, tuple[int, int, int, int]] | None:
    """The stored pixels around ``region`` of a JPEG with restart markers, decoded at ``1/scale`` without
    entropy-decoding the rest (:mod:`mimkit.data.jpeg_regions`), still in stored orientation (its EXIF is
    kept), and the bounds decoded (stored pixels at full scale); ``None`` when the file has no restart
    markers to cut at or the cut would hold the top of the image at full width (decoded from the top)."""
    layout = read_layout(data)
    if layout is None:
        return None
    bounds = region_bounds(layout, *region)
    if bounds[:3] == (0, 0, layout.width):
        return None
    cut = Image.open(io.BytesIO(region_stream(data, layout, bounds)))
    if scale > 1 or gray:
        cut.draft(gray, (max(cut.width // scale, 1), max(cut.height // scale, 1)))
        if cut.width != math.ceil((bounds[2] - bounds[0]) / scale):  # libjpeg chose another reduction
            return None
    cut.load()
    return cut, bounds


def _read_bytes(source: str | Path | bytes) -> bytes:
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as file:
        return file.read()


def _resize_region(
    img: Image.Image, region: tuple[float, float, float, float], img_size: int, flip: bool
) -> np.ndarray:
    """Resize ``region`` (left, top, right, bottom in ``img``'s pixels) to ``img_size`` squared, bicubic and
    antialiased, mirrored if asked: (C, S, S) uint8.

    An integral region is cut out and resized by torch's uint8 antialiased bicubic interpolation (the
    Keys a = -0.5 kernel of Pillow's filter, vectorized); a fractional one (a box mapped onto a reduced or
    cached image) by Pillow's filter, which reads the pixels around the box.
    """
    if all(float(edge).is_integer() for edge in region):
        left, top, right, bottom = (int(edge) for edge in region)
        pixels = np.array(img.crop((left, top, right, bottom)))  # (h, w) or (h, w, 3), writable for torch
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # (h, w, C)
        channels_last = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, C, h, w)
        resized = F.interpolate(channels_last, size=(img_size, img_size), mode="bicubic", antialias=True)[0]
        return (resized.flip(-1) if flip else resized.contiguous()).numpy()  # (C, S, S)
    out = img.resize((img_size, img_size), Image.Resampling.BICUBIC, box=region)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(out)  # (S, S) or (S, S, 3)
    return pixels[None].copy() if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()  # (C, S, S)


def _resize_box(
    img: Image.Image,
    box: CropBox,
    factor: tuple[float, float],
    img_size: int,
    offset: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Resize the box (in original pixels, ``factor`` = this image's pixels per original pixel; ``img`` a part
    of the image whose top-left corner sits at ``offset`` in those pixels) to ``img_size`` squared: (C, S, S)
    uint8 (see :func:`_resize_region`)."""
    (fx, fy), (dx, dy) = factor, offset
    region = (
        box.left * fx - dx,
        box.top * fy - dy,
        (box.left + box.width) * fx - dx,
        (box.top + box.height) * fy - dy,
    )
    return _resize_region(img, region, img_size, box.flip)


def decode_crop(
    source: str | Path | bytes,
    name: str,
    in_chans: int,
    img_size: int,
    draw: Callable[[int, int], CropBox],
    *,
    draft: bool = True,
) -> tuple[np.ndarray, CropRecord]:
    """Decode the part of an image a crop needs and resize the crop.

    Args:
        source: the file, or its bytes.
        name: the file's name, for errors and records.
        in_chans: 1 (luminance) or 3 (RGB).
        img_size: output side.
        draw: ``(width, height) -> CropBox`` on the original (oriented) image.
        draft: allow the reduced JPEG decode and stopping after the crop's last row (False decodes every
            pixel of the file: the fidelity reference).

    Returns:
        (C, S, S) uint8 pixels and the crop's record.

    Raises:
        BadImageError: the file cannot be decoded (a JPEG cut off anywhere counts, even below the crop).
    """
    try:
        data = _read_bytes(source)
        with Image.open(io.BytesIO(data)) as opened:
            _check_pixel_count(opened)
            scan_start = opened.fp.tell() if opened.fp is not None else 0  # JPEG: after the first scan header
            orientation = _orientation(opened)
            width, height = _oriented_size(opened)
            box = draw(width, height)
            jpeg = opened.format == "JPEG"
            scale = draft_scale(box, img_size) if draft and jpeg else 1
            gray = "L" if in_chans == 1 and opened.mode == "RGB" and jpeg else None
            if scale > 1 or gray:
                raw_w, raw_h = opened.size
                request = (max(raw_w // scale, 1), max(raw_h // scale, 1))
                drafted = opened.draft(gray, request)
                if drafted is not None:
                    scale = round(raw_w / drafted[1][2])  # what libjpeg will really do
            region = stored_region(box, width, height, orientation, img_size)
            cut = _decode_region(data, region, scale, gray) if draft and jpeg else None
            if cut is not None:  # only the segments around the crop were decoded
                img, bounds = cut
                stored = (opened.width, opened.height)  # the whole stored image at 1/scale
                left, top = bounds[0] // scale, bounds[1] // scale  # MCU edges: whole pixels at any scale
                offset = _region_offset(orientation, (left, top, left + img.width, top + img.height), stored)
                ImageOps.exif_transpose(img, in_place=True)
                pixels = _resize_box(_to_channels(img, in_chans), box, (1 / scale, 1 / scale), img_size, offset)
                return pixels, CropRecord(name, width, height, box)
            rows = math.ceil(region[3] / scale)
            if draft and jpeg and _CAN_STOP_EARLY and len(opened.tile) == 1:
                if rows < opened.height and data.rfind(EOI, scan_start) < 0:  # a whole decode rejects it
                    raise OSError("image file is truncated (no end-of-image marker)")
                _load_top_rows(opened, data, min(rows, opened.height))
            ImageOps.exif_transpose(opened, in_place=True)  # loads the (reduced) pixels
            img = _to_channels(opened, in_chans)
            pixels = _resize_box(img, box, (1 / scale, 1 / scale), img_size)
    except MemoryError:
        raise
    except Exception as error:  # Pillow raises many types for malformed files; all mean "bad file"
        raise BadImageError(name, f"{type(error).__name__}: {error}") from error
    return pixels, CropRecord(name, width, height, box)


def decode_shorter_side(source: str | Path | bytes, name: str, in_chans: int, size: int) -> tuple[np.ndarray, int, int]:
    """An image at its aspect ratio with the shorter side ``size`` (or as it is when smaller).

    Returns:
        (H', W', C) uint8 pixels, and the original (oriented) width and height.

    Raises:
        BadImageError: the file cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            _check_pixel_count(opened)
            width, height = _oriented_size(opened)
            if opened.format == "JPEG":  # keeps both sides >= the target
                target = cached_size(width, height, size)
                raw = target if (width, height) == opened.size else (target[1], target[0])
                opened.draft("L" if in_chans == 1 and opened.mode == "RGB" else None, raw)
            ImageOps.exif_transpose(opened, in_place=True)
            img = _to_channels(opened, in_chans)
            target = cached_size(width, height, size)
            if img.size != target:
                img = img.resize(target, Image.Resampling.BICUBIC)
            pixels = np.asarray(img)
    except MemoryError:
        raise
    except Exception as error:
        raise BadImageError(name, f"{type(error).__name__}: {error}") from error
    return (pixels[..., None] if pixels.ndim == 2 else pixels), width, height


def cached_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of an image stored with its shorter side ``size``, never enlarged."""
    shorter = min(width, height)
    if shorter <= size:
        return width, height
    return max(1, round(width * size / shorter)), max(1, round(height * size / shorter))


def default_cache_size(img_size: int, crop_scale: Sequence[float]) -> int:
    """The shorter side that keeps crops at the smallest scale (square ones) at ``img_size`` resolution or
    above: ``img_size / sqrt(scale_low)`` (501 px for 224 at scale 0.2)."""
    return math.ceil(img_size / math.sqrt(crop_scale[0]))


class CropSource(Protocol):
    """What :class:`CropDataset` reads: an image folder or tar shards, decoded on demand."""

    labels: Tensor | None
    classes: list[str]
    skipped: list[tuple[Path, str]]

    @property
    def root(self) -> str | Path:
        """Where the images are (for messages)."""
        ...

    def __len__(self) -> int: ...

    def name(self, index: int) -> str:
        """Image ``index``'s file (or shard member) name."""
        ...

    def source(self, index: int, private: bool = False) -> tuple[str, str | Path | bytes]:
        """(name, file or bytes) of image ``index``; ``private``: safe to call from several threads."""
        ...


class CropDataset(torch.utils.data.Dataset):
    """Training samples as MAE sees them: a random-resized crop of each original image per epoch.

    Indexed by ``(index, epoch)`` (the keys :class:`~mimkit.data.loader.EpochBatchSampler` gives it) or by
    ``index`` alone (epoch 0). ``images`` is None: crops are made per sample, by loader workers.

    Args:
        base: the images (:class:`~mimkit.data.folder.ImageFolderDataset` or
            :class:`~mimkit.data.shards.TarShardDataset`, built without ``in_memory``).
        img_size: output side.
        in_chans: 1 or 3.
        scale, ratio: crop area fraction and aspect-ratio ranges (``data.crop_scale``, ``data.crop_ratio``).
        hflip: mirror half the crops.
        seed: base seed of the per-sample generators.
        in_memory: hold every image decoded at its aspect ratio with shorter side ``cache_size``; None
            chooses True when that fits in ``memory_budget``; True over the budget is an error.
        cache_size: shorter side of cached images (None: :func:`default_cache_size`); originals smaller
            than this are kept as they are.
        memory_budget: bytes the cache may take.
        num_workers: decoding threads while filling the cache.
        progress: bar while filling the cache.

    Attributes:
        labels, classes: of ``base``; ``skipped``: bad files left out (by name); ``cache_bytes``: the
        cache's size (0 when streaming).

    Raises:
        ValueError: ``in_memory=True`` and the cache would exceed the budget (the message names the keys).
    """

    images: Tensor | None = None

    def __init__(
        self,
        base: CropSource,
        img_size: int,
        in_chans: int,
        *,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        seed: int = 0,
        in_memory: bool | None = None,
        cache_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        num_workers: int = 2,
        progress: bool = False,
    ) -> None:
        if cache_size is not None and cache_size <= 0:
            raise ValueError(f"data.cache_size must be positive, got {cache_size}")
        self.base = base
        self.img_size, self.in_chans = img_size, in_chans
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip, self.seed = hflip, seed
        self.cache_size = default_cache_size(img_size, self.scale) if cache_size is None else cache_size
        self.labels = base.labels
        self.classes = base.classes
        self.skipped = list(base.skipped)
        self._cache: np.ndarray | None = None  # flat uint8 pixels of every cached image
        self._offsets = np.zeros(0, dtype=np.int64)  # (N,) start of each image in the cache
        self._shapes = np.zeros((0, 3), dtype=np.int64)  # (N, 3) cached (H, W, C)
        self._sizes = np.zeros((0, 2), dtype=np.int64)  # (N, 2) original (width, height)
        self._keep = np.arange(len(base))  # base index of each sample
        self.cache_bytes = 0
        self._failed: set[int] = set()
        if in_memory is False:
            return
        estimate = self.estimate_cache_bytes()
        if estimate > memory_budget:
            if in_memory:
                raise ValueError(
                    f"data.in_memory=true: caching {len(base)} images at shorter side data.cache_size="
                    f"{self.cache_size} takes about {estimate / 2**30:.2f} GiB, over the "
                    f"{memory_budget / 2**30:.2f} GiB budget; lower data.cache_size, set data.limit, or set "
                    "data.in_memory=false to stream crops from the files"
                )
            log.info("cache of %.2f GiB would exceed the budget: streaming crops from the files", estimate / 2**30)
            return
        self._fill_cache(num_workers, progress)

    def estimate_cache_bytes(self) -> int:
        """Bytes of the cache, from the sizes of up to 256 evenly spaced images (read from headers)."""
        count = len(self.base)
        picks = sorted(
            {index * count // min(count, _ESTIMATE_HEADERS) for index in range(min(count, _ESTIMATE_HEADERS))}
        )
        total = 0
        for index in picks:
            try:
                _, source = self.base.source(index, private=True)
                with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
                    width, height = _oriented_size(opened)
            except Exception:  # a bad file costs nothing in the cache
                continue
            cached_w, cached_h = cached_size(width, height, self.cache_size)
            total += cached_w * cached_h * self.in_chans
        return total * count // max(len(picks), 1)

    def _fill_cache(self, num_workers: int, progress: bool) -> None:
        def decode(index: int) -> tuple[np.ndarray, int, int]:
            name, source = self.base.source(index, private=True)
            return decode_shorter_side(source, name, self.in_chans, self.cache_size)

        results = []
        keep = []
        skipped: list[tuple[Path, str]] = []
        items = list(range(len(self.base)))
        for index, result in zip(
            items, map_items(decode, items, num_workers=num_workers, progress=progress, desc="cache"), strict=True
        ):
            if isinstance(result, BadImageError):
                skipped.append((result.path, result.reason))
            else:
                results.append(result)
                keep.append(index)
        if skipped:
            report_skipped(skipped, Path(self.base.root), len(items))
            self.skipped = sorted(self.skipped + skipped)
        if not results:
            first = "; ".join(f"{path.name}: {reason}" for path, reason in self.skipped[:3])
            raise ValueError(
                f"none of the {len(self.skipped)} image files under {self.base.root} could be read ({first})"
            )
        self._shapes = np.array([pixels.shape for pixels, _, _ in results], dtype=np.int64)  # (N, 3)
        self._sizes = np.array([(width, height) for _, width, height in results], dtype=np.int64)  # (N, 2)
        lengths = self._shapes.prod(axis=1)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._cache = np.empty(int(lengths.sum()), dtype=np.uint8)
        for (pixels, _, _), start, length in zip(results, self._offsets, lengths, strict=True):
            self._cache[start : start + length] = pixels.reshape(-1)
        self._keep = np.array(keep, dtype=np.int64)
        if self.labels is not None:
            self.labels = self.labels[torch.from_numpy(self._keep)]
        self.cache_bytes = int(self._cache.nbytes)
        log.info("cached %d images in %.1f MiB", len(keep), self.cache_bytes / 2**20)

    @property
    def in_memory(self) -> bool:
        """True when crops are cut from the in-memory cache."""
        return self._cache is not None

    @property
    def num_skipped(self) -> int:
        """Number of images left out because they could not be read."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self._keep)

    def draw(self, index: int, epoch: int) -> Callable[[int, int], CropBox]:
        """The box drawer of sample ``index`` in ``epoch``: ``(width, height) -> CropBox``."""
        rng = sample_rng(self.seed, epoch, index)
        return lambda width, height: draw_crop_box(width, height, self.scale, self.ratio, rng, self.hflip)

    def crop(self, index: int, epoch: int = 0, *, draft: bool = True) -> tuple[np.ndarray, CropRecord]:
        """Sample ``index``'s crop in ``epoch`` as (C, S, S) uint8, and its record.

        Raises:
            BadImageError: its file cannot be decoded.
        """
        base_index = int(self._keep[index])
        if self._cache is None:
            name, source = self.base.source(base_index)
            return decode_crop(source, name, self.in_chans, self.img_size, self.draw(index, epoch), draft=draft)
        name = self.base.name(base_index)
        height, width, channels = (int(v) for v in self._shapes[index])
        start = int(self._offsets[index])
        pixels = self._cache[start : start + height * width * channels].reshape(height, width, channels)
        img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        orig_w, orig_h = (int(v) for v in self._sizes[index])
        box = self.draw(index, epoch)(orig_w, orig_h)
        out = _resize_box(img, box, (width / orig_w, height / orig_h), self.img_size)
        return out, CropRecord(name, orig_w, orig_h, box)

    def original(self, index: int) -> np.ndarray:
        """Sample ``index``'s whole original image, (C, H, W) uint8 (for pictures of the crops).

        Raises:
            BadImageError: its file cannot be decoded.
        """
        name, source = self.base.source(int(self._keep[index]))
        if isinstance(source, bytes):
            return load_image(name, self.in_chans, data=source)
        return load_image(source, self.in_chans)

    def _label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        """The (C, S, S) uint8 crop of ``key`` (``index`` or ``(index, epoch)``) and its label (-1 when
        unlabelled). A file that fails to decode is logged by name once per process and replaced by the
        next decodable sample, so the batch keeps its size."""
        index, epoch = (key, 0) if isinstance(key, int) else key
        candidate, pixels = decode_or_next(
            index, len(self), self._failed, lambda i: self.crop(i, epoch)[0], "of the data set"
        )
        return torch.from_numpy(pixels), self._label(candidate)

    def __repr__(self) -> str:
        return (
            f"CropDataset(n={len(self)}, img_size={self.img_size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, in_memory={self.in_memory}, cache_size={self.cache_size}, "
            f"cache_bytes={self.cache_bytes})"
        )
