"""Image folders: scanning, robust decoding of any common image mode, and a uint8 dataset.

The dataset holds the evaluation view: each image resized so the shorter side is ``img_size / crop_ratio``
and center-cropped to ``img_size``. Training crops are cut from the original images instead, by
:class:`~mimkit.data.crops.CropDataset`, which reads the files through this dataset.

Decoding conventions (:func:`load_image`):

* Transparency (RGBA, LA, PA, premultiplied modes, palette or gray images with a transparent colour)
  is composited on a white background. Dropping alpha instead would expose whatever colour the
  encoder left under transparent pixels, often black or noise.
* 16-bit gray (``I;16*``) is scaled to 8 bits by ``round(v / 257)`` (65535 -> 255), never clipped.
  32-bit ``I`` images whose values lie in [0, 65535] are treated as 16-bit samples; others, and float
  ``F`` images outside [0, 1], are linearly rescaled from their own [min, max] to [0, 255]. ``F`` images
  within [0, 1] are multiplied by 255.
* CMYK, palette, YCbCr, LAB and HSV go through Pillow's conversion to RGB; 1-bit images become 0/255.
* ``in_chans=1`` keeps luminance (ITU-R 601-2, Pillow's ``L``); ``in_chans=3`` gives RGB, repeating gray.
* EXIF orientation is applied; animated or multi-page files give their first frame.
* Images larger than ``PIL.Image.MAX_IMAGE_PIXELS`` are rejected as decompression bombs.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_EVAL_CROP_RATIO = 0.875  # MAE's evaluation view: shorter side to 224 / 0.875 = 256, center 224
DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of decoded uint8 pixels held in memory by default
MAX_NAMED_WARNINGS = 20  # bad files named one warning each; the rest go to the log
_DECODE_BLOCK = 1024  # images submitted to the thread pool at a time (bounds pending futures)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_T = TypeVar("_T")
_S = TypeVar("_S")


class BadImageError(Exception):
    """An image file that cannot be decoded (corrupt, truncated, empty, not an image, or a bomb).

    Args:
        path: the file.
        reason: what went wrong, for the user.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # picklable across DataLoader workers
        return type(self), (self.path, self.reason)


def decode_or_next(
    index: int, count: int, failed: set[int], decode: Callable[[int], np.ndarray], where: str
) -> tuple[int, np.ndarray]:
    """Decode sample ``index`` of ``count``, or, when it fails, the next decodable one (wrapping around).

    A file that fails is added to ``failed`` (skipped from then on) and logged by name once, so a batch keeps
    its size and a corrupt file costs one warning per process.

    Args:
        index: the sample asked for; negative indices count from the end.
        count: samples in the data set.
        failed: indices known not to decode (updated in place).
        decode: ``index -> pixels``; raises :class:`BadImageError` for a bad file.
        where: the data set, for the error when nothing decodes any more.

    Returns:
        The index decoded and its pixels.

    Raises:
        IndexError: ``index`` out of range.
        RuntimeError: no sample decodes.
    """
    index = range(count)[index]  # normalizes negative indices, raises IndexError out of range
    for offset in range(count):
        candidate = (index + offset) % count
        if candidate in failed:
            continue
        try:
            return candidate, decode(candidate)
        except BadImageError as error:
            failed.add(candidate)
            log.warning("unreadable image %s (%s); using the next image in its place", error.path, error.reason)
    raise RuntimeError(f"no image {where} can be decoded any more")


class BadImageWarning(UserWarning):
    """A bad image file was skipped (filter this category to silence them)."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_image_folder(root: str | Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Find image files under ``root``, recursively, and label them by first-level subfolder.

    Extensions are matched case-insensitively against :data:`IMAGE_EXTENSIONS`; hidden files and
    folders (names starting with ``.``, e.g. macOS ``._x.jpg`` forks) are ignored; symlinked folders
    are followed once. Paths are sorted, so the order is the same on every file system.

    Args:
        root: the folder.

    Returns:
        paths: the image files.
        labels: index into ``classes`` of each file's first-level subfolder, or None when all images
            sit directly in ``root`` (unlabelled). Images both at the top level and in subfolders are
            treated as unlabelled, with a warning.
        classes: sorted names of the first-level subfolders holding images (empty when unlabelled).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ValueError: ``root`` holds no image files.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is not a directory")
    found: list[tuple[str, ...]] = []  # relative path parts
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in visited:  # a symlink loop
            dirnames.clear()
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirnames[:] = [name for name in dirnames if not _is_hidden(name)]
        relative = Path(dirpath).relative_to(root).parts
        found.extend(
            (*relative, name)
            for name in filenames
            if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        )
    if not found:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    found.sort()
    paths = [root.joinpath(*parts) for parts in found]
    nested = [len(parts) > 1 for parts in found]
    if not any(nested):
        return paths, None, []
    if not all(nested):
        num_top = nested.count(False)
        warnings.warn(
            f"{root} has {num_top} images at its top level and {len(found) - num_top} in subfolders; treating "
            f"all as unlabelled. Put every image in a class subfolder for labels.",
            stacklevel=2,
        )
        return paths, None, []
    classes = sorted({parts[0] for parts in found})
    class_index = {name: index for index, name in enumerate(classes)}
    return paths, [class_index[parts[0]] for parts in found], classes


def _check_pixel_count(img: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise ValueError(
            f"decompression bomb: {img.width}x{img.height} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS={limit}"
        )


def _high_depth_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit integer or float gray samples to uint8 (see the module docstring)."""
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if values.dtype.kind in "iu" and low >= 0 and high <= 65535:
        return ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    if values.dtype.kind == "f" and low >= 0 and high <= 1:
        return np.rint(values * 255).astype(np.uint8)
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("float image holds NaN or infinite values")
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.rint((values.astype(np.float64) - low) * scale).astype(np.uint8)


def _composite_on_white(img: Image.Image) -> Image.Image:
    gray = img.mode in ("L", "LA", "La")
    with_alpha = img.convert("LA" if gray else "RGBA")
    background = Image.new("L" if gray else "RGB", img.size, 255 if gray else (255, 255, 255))
    background.paste(with_alpha.convert(background.mode), mask=with_alpha.getchannel("A"))
    return background


def _to_channels(img: Image.Image, in_chans: int) -> Image.Image:
    """Any Pillow mode to ``L`` (in_chans 1) or ``RGB`` (in_chans 3), 8 bits per channel."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        img = Image.fromarray(_high_depth_to_uint8(np.asarray(img)), "L")
    elif mode == "1":
        img = img.convert("L")
    elif mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and img.info.get("transparency") is not None):
        img = _composite_on_white(img)
    elif mode not in ("L", "RGB"):  # P, CMYK, YCbCr, LAB, HSV
        img = img.convert("RGB")
    target = "L" if in_chans == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def eval_resize_size(size: int, crop_ratio: float) -> int:
    """The shorter side an evaluation view is resized to before its center crop: ``int(size / crop_ratio)``
    (MAE's ``Resize(int(224 / 0.875))`` = 256 for 224)."""
    return size if crop_ratio >= 1 else int(size / crop_ratio)


def _resize_square(img: Image.Image, size: int, crop_ratio: float = 1.0) -> Image.Image:
    """MAE's evaluation view in one resampling: the shorter side resized to ``int(size / crop_ratio)`` (the
    longer to ``int`` of its share, as torchvision's ``Resize``), then the central ``size x size`` square with
    ``CenterCrop``'s rounding, taken as the matching box of the original (bicubic, antialiased).
    ``crop_ratio`` 1 keeps the whole central square."""
    width, height = img.size
    short = eval_resize_size(size, crop_ratio)
    if width <= height:
        resized_w, resized_h = short, int(short * height / width)
    else:
        resized_w, resized_h = int(short * width / height), short
    left, top = round((resized_w - size) / 2), round((resized_h - size) / 2)  # on the resized grid
    scale_x, scale_y = width / resized_w, height / resized_h
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    if (width, height) == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)


def load_image(
    path: str | Path,
    in_chans: int = 3,
    size: int | None = None,
    *,
    data: bytes | None = None,
    crop_ratio: float = 1.0,
) -> np.ndarray:
    """Decode one image file to uint8, whatever its mode (conventions in the module docstring).

    Args:
        path: the image file (with ``data``: only its name, for errors).
        in_chans: 1 for luminance, 3 for RGB.
        size: if given, resize so the shorter side is ``size / crop_ratio`` and center-crop to ``size x size``
            (bicubic, antialiased; JPEGs are decoded at a reduced DCT scale first when that is still
            at least the resized side, which is much faster for large photos).
        data: the file's bytes, when they come from elsewhere (e.g. a tar shard).
        crop_ratio: MAE's evaluation crop ratio (0.875: resize to 256, center 224); 1 keeps the central square.

    Returns:
        (in_chans, H, W) uint8 array, or (in_chans, size, size) when ``size`` is given.

    Raises:
        ValueError: ``in_chans`` is not 1 or 3.
        BadImageError: the file is missing, empty, corrupt, truncated, not an image, or a
            decompression bomb.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    path = Path(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as opened:
            _check_pixel_count(opened)
            if size is not None and opened.format == "JPEG":
                # Decoding at 1/2, 1/4 or 1/8 scale keeps both sides >= size; libjpeg can also emit luma directly.
                resized = eval_resize_size(size, crop_ratio)
                opened.draft("L" if in_chans == 1 and opened.mode == "RGB" else None, (resized, resized))
            ImageOps.exif_transpose(opened, in_place=True)  # loads the pixels
            img = _to_channels(opened, in_chans)
            if size is not None:
                img = _resize_square(img, size, crop_ratio)
            pixels = np.asarray(img)  # (H, W) or (H, W, 3)
    except MemoryError:
        raise
    except Exception as error:  # Pillow raises many types for malformed files; all mean "bad file"
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error
    if pixels.ndim == 2:
        return pixels[None].copy()  # (1, H, W)
    return pixels.transpose(2, 0, 1).copy()  # (3, H, W), writable even where Pillow's buffer is read-only


def check_image_header(path: str | Path) -> None:
    """Cheap validity check without decoding pixels: the file opens as an image and is no bomb.

    Catches empty files, non-images and unsupported formats; truncation is only seen by a full decode.

    Raises:
        BadImageError: the file fails the check.
    """
    try:
        with Image.open(path) as opened:
            _check_pixel_count(opened)
    except MemoryError:
        raise
    except Exception as error:
        raise BadImageError(path, f"{type(error).__name__}: {error}") from error


def map_items(
    function: Callable[[_S], _T],
    paths: Sequence[_S],
    *,
    num_workers: int,
    progress: bool,
    desc: str,
) -> Iterator[_T | BadImageError]:
    """``function`` over ``paths`` (files, or any items naming an image) in order, on a thread pool; bad
    images yield their BadImageError.

    Threads suffice: Pillow releases the GIL while decoding and resizing.
    """

    def guarded(path: _S) -> _T | BadImageError:
        try:
            return function(path)
        except BadImageError as error:
            return error

    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        if num_workers <= 1:
            for path in paths:
                yield guarded(path)
                bar.update(1)
            return
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="mimkit-decode") as pool:
            for start in range(0, len(paths), _DECODE_BLOCK):
                for result in pool.map(guarded, paths[start : start + _DECODE_BLOCK]):
                    yield result
                    bar.update(1)


def check_image_args(in_chans: int, img_size: int, limit: int | None) -> None:
    """The argument checks every image data set makes."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")


def check_crop_ratio(crop_ratio: float) -> None:
    """The evaluation crop ratio lies in (0, 1]."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"data.eval_crop_ratio must lie in (0, 1], got {crop_ratio}")


def decode_in_memory(
    decode: Callable[[_S], np.ndarray],
    items: Sequence[_S],
    shape: tuple[int, int, int],
    *,
    num_workers: int,
    progress: bool,
    desc: str,
) -> tuple[Tensor, np.ndarray, list[tuple[Path, str]]]:
    """Decode every item into one uint8 tensor, leaving out the bad ones.

    Returns:
        images (K, C, S, S) uint8 of the K decodable items in order; keep (N,) bool; skipped (path, reason).
    """
    storage = np.empty((len(items), *shape), dtype=np.uint8)  # (N, C, S, S)
    keep = np.zeros(len(items), dtype=bool)
    skipped: list[tuple[Path, str]] = []
    num_kept = 0
    for index, result in enumerate(map_items(decode, items, num_workers=num_workers, progress=progress, desc=desc)):
        if isinstance(result, BadImageError):
            skipped.append((result.path, result.reason))
        else:
            storage[num_kept] = result  # results arrive in order: compact as we go
            keep[index] = True
            num_kept += 1
    return torch.from_numpy(storage[:num_kept]), keep, skipped


def report_skipped(skipped: Sequence[tuple[Path, str]], root: Path, total: int) -> None:
    """Warn about each skipped file: the first :data:`MAX_NAMED_WARNINGS` as warnings, the rest in the log."""
    for index, (path, reason) in enumerate(skipped):
        message = f"skipped unreadable image {path} ({reason})"
        if index < MAX_NAMED_WARNINGS:
            warnings.warn(message, BadImageWarning, stacklevel=3)
        else:
            log.warning(message)
    if len(skipped) > MAX_NAMED_WARNINGS:
        warnings.warn(
            f"skipped {len(skipped)} of {total} image files under {root}; all are listed in the log and in "
            f"dataset.skipped",
            BadImageWarning,
            stacklevel=3,
        )


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder as uint8 squares, decoded once into memory or on the fly.

    Each image is resized so its shorter side is ``img_size / crop_ratio`` and center-cropped to
    ``img_size x img_size`` (conventions of :func:`load_image`): the evaluation view. Labels come from
    first-level subfolders (see :func:`scan_image_folder`). For training, wrap it (``in_memory=False``) in a
    :class:`~mimkit.data.crops.CropDataset`.

    Bad files never crash an epoch:

    * in memory, every file is decoded at construction; failures are skipped, warned about by name and
      recorded in ``skipped``.
    * on the fly, files are checked at construction (``validate="header"``: opens and size checks, which
      catch empty, non-image and bomb files cheaply; ``"full"``: a complete decode, which also catches
      truncation). A file that still fails later in ``__getitem__`` is logged once per process and
      replaced by the next decodable image, so the batch keeps its size.

    Args:
        root: the image folder.
        img_size: side of the stored squares.
        in_chans: 1 (luminance) or 3 (RGB).
        in_memory: hold all decoded images in memory; ``None`` chooses True when they fit in
            ``memory_budget`` bytes (2 GiB).
        limit: keep at most this many files, evenly spaced through the sorted list (so every class keeps
            its share).
        progress: tqdm bar while decoding; ``None`` shows it only when stderr is a terminal.
        num_workers: decoding threads at construction.
        validate: ``"header"`` or ``"full"``, the construction-time check for on-the-fly datasets.
        memory_budget: bytes for the ``in_memory=None`` decision.
        crop_ratio: the evaluation view's crop ratio (``data.eval_crop_ratio``, MAE: 0.875); 1 stores the
            whole central square.

    Attributes:
        images: (N, in_chans, img_size, img_size) uint8 when in memory, else None.
        labels: (N,) int64, or None for an unlabelled folder.
        classes: class names (empty when unlabelled).
        paths: the N files kept.
        skipped: (path, reason) of each file left out; ``num_skipped`` is its length.

    Raises:
        ValueError: bad arguments, or not a single decodable image.
    """

    def __init__(
        self,
        root: str | Path,
        img_size: int,
        in_chans: int = 3,
        in_memory: bool | None = None,
        *,
        limit: int | None = None,
        progress: bool | None = None,
        num_workers: int = 2,
        validate: str = "header",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        crop_ratio: float = 1.0,
    ) -> None:
        check_image_args(in_chans, img_size, limit)
        check_crop_ratio(crop_ratio)
        self.crop_ratio = crop_ratio
        if validate not in ("header", "full"):
            raise ValueError(f"validate must be 'header' or 'full', got {validate!r}")
        self.root = Path(root)
        self.img_size = img_size
        self.in_chans = in_chans
        paths, labels, self.classes = scan_image_folder(self.root)
        if limit is not None and limit < len(paths):
            chosen = [index * len(paths) // limit for index in range(limit)]
            paths = [paths[index] for index in chosen]
            labels = None if labels is None else [labels[index] for index in chosen]
        image_bytes = in_chans * img_size * img_size
        self.in_memory = len(paths) * image_bytes <= memory_budget if in_memory is None else in_memory
        show = sys.stderr.isatty() if progress is None else progress
        self.skipped: list[tuple[Path, str]] = []
        keep = np.zeros(len(paths), dtype=bool)
        self.images: Tensor | None = None
        if self.in_memory:
            decode = partial(load_image, in_chans=in_chans, size=img_size, crop_ratio=crop_ratio)
            self.images, keep, self.skipped = decode_in_memory(
                decode,
                paths,
                (in_chans, img_size, img_size),
                num_workers=num_workers,
                progress=show,
                desc=f"decode {self.root}",
            )
        else:
            check: Callable[[Path], object] = check_image_header
            if validate == "full":
                check = partial(load_image, in_chans=in_chans, size=img_size, crop_ratio=crop_ratio)
            checks = map_items(check, paths, num_workers=num_workers, progress=show, desc=f"check {self.root}")
            for index, outcome in enumerate(checks):
                if isinstance(outcome, BadImageError):
                    self.skipped.append((outcome.path, outcome.reason))
                else:
                    keep[index] = True
        self.paths = [path for path, kept in zip(paths, keep, strict=True) if kept]
        self.labels: Tensor | None = None
        if labels is not None:
            self.labels = torch.tensor(
                [label for label, kept in zip(labels, keep, strict=True) if kept], dtype=torch.int64
            )
        if self.skipped:
            report_skipped(self.skipped, self.root, len(paths))
        if not self.paths:
            first = "; ".join(f"{path.name}: {reason}" for path, reason in self.skipped[:3])
            raise ValueError(f"none of the {len(paths)} image files under {self.root} could be read ({first})")
        self._failed: set[int] = set()  # on-the-fly decode failures seen by this process

    @property
    def num_skipped(self) -> int:
        """Number of files left out because they could not be read."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def _label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def name(self, index: int) -> str:
        """Image ``index``'s file, as text."""
        return str(self.paths[index])

    def source(self, index: int, private: bool = False) -> tuple[str, Path]:
        """(name, file) of image ``index``, for :class:`~mimkit.data.crops.CropDataset` (``private``: no
        shared state to avoid here)."""
        return str(self.paths[index]), self.paths[index]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The (C, S, S) uint8 image and its label (-1 when unlabelled)."""
        if self.images is not None:
            return self.images[index], self._label(index)
        candidate, pixels = decode_or_next(
            index,
            len(self.paths),
            self._failed,
            lambda i: load_image(self.paths[i], self.in_chans, self.img_size, crop_ratio=self.crop_ratio),
            f"under {self.root}",
        )
        return torch.from_numpy(pixels), self._label(candidate)

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, img_size={self.img_size}, "
            f"in_chans={self.in_chans}, classes={len(self.classes)}, in_memory={self.in_memory}, "
            f"skipped={self.num_skipped})"
        )
