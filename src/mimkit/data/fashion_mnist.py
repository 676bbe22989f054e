"""Fashion-MNIST from its idx files (Debian's ``dataset-fashion-mnist`` layout), held in memory as uint8."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.data.folder import check_image_args

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08  # idx type code for unsigned bytes
_RESIZE_CHUNK = 4096  # images resized per step, to bound the float32 scratch memory


def _find_idx_file(root: Path, name: str) -> Path:
    """``root/name.gz`` or ``root/name``, whichever exists (gzipped first)."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {root}; install it with "
        f"`apt-get install dataset-fashion-mnist` or set data.root to a folder holding the idx files"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(
            f"{path} is truncated or not a valid gzip file ({error}); reinstall or re-download it"
        ) from error


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (``.gz`` or raw) and check its header against its size.

    Args:
        path: the idx file.
        ndim: number of dimensions the file must declare (3 for images, 1 for labels).

    Returns:
        uint8 array with the shape the header declares.

    Raises:
        ValueError: wrong magic number, wrong number of dimensions, or a data size that does not match
            the header (a truncated or padded file); the message names the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than an idx header of {header_size}")
    magic = int.from_bytes(data[:4], "big")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if magic != expected_magic:
        raise ValueError(
            f"{path} is not an idx file of {ndim}-D unsigned bytes: magic {magic:#010x}, "
            f"expected {expected_magic:#010x}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(dims))
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(f"{path} is {kind}: {len(data)} bytes, header {dims} implies {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
    """Load one Fashion-MNIST split from its idx files.

    Args:
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; defaults to
            ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
        split: ``"train"`` (60,000 images) or ``"test"`` (the 10,000 ``t10k`` images).

    Returns:
        images: (N, 1, 28, 28) uint8.
        labels: (N,) int64 in [0, 10), indexing :data:`FASHION_MNIST_CLASSES`.

    Raises:
        FileNotFoundError: the root or one of its files is missing.
        ValueError: unknown split, or a file that is truncated or not an idx file (named in the message).
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    root = DEFAULT_ROOT if root is None else Path(root)
    prefix = _SPLIT_PREFIX[split]
    image_path = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(image_path, ndim=3)  # (N, 28, 28)
    labels = read_idx(label_path, ndim=1)  # (N,)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_path} has {images.shape[0]} images but {label_path} has {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path} holds label {labels.max()}, outside [0, {len(FASHION_MNIST_CLASSES)})")
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    return images_t, torch.from_numpy(labels.astype(np.int64))


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Resize square uint8 images with bilinear antialiased interpolation, rounding back to uint8.

    Args:
        images: (N, C, H, W) uint8.
        size: output side.

    Returns:
        (N, C, size, size) uint8 (the input itself when it already has that size).
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()  # (n, C, H, W)
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST resized once to ``img_size`` and held in memory, with the same interface as
    :class:`~mimkit.data.folder.ImageFolderDataset`.

    Args:
        root: folder with the idx files (see :func:`load_fashion_mnist`).
        split: ``"train"`` or ``"test"``.
        img_size: side of the stored images; 28 keeps the originals, other sizes are resized once
            (bilinear, antialiased, rounded to uint8).
        in_chans: 1, or 3 to repeat the gray channel. The 3-channel ``images`` is a broadcast view of the
            1-channel data (no copy); indexing it (``images[idx]``) returns ordinary contiguous tensors.
        limit: keep only the first ``limit`` images of the split.

    Attributes:
        images: (N, in_chans, img_size, img_size) uint8.
        labels: (N,) int64.
        classes: the 10 class names.
        num_skipped, skipped: always 0 and empty (kept for interface parity with image folders).
    """

    in_memory = True

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        img_size: int = 28,
        in_chans: int = 1,
        limit: int | None = None,
    ) -> None:
        check_image_args(in_chans, img_size, limit)
        images, labels = load_fashion_mnist(root, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        images = resize_uint8(images, img_size)  # (N, 1, S, S)
        self.images: Tensor = images.expand(-1, in_chans, -1, -1) if in_chans != 1 else images
        self.labels: Tensor = labels
        self.classes = list(FASHION_MNIST_CLASSES)
        self.split = split
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_skipped = 0
        self.skipped: list[tuple[Path, str]] = []

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].contiguous(), int(self.labels[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, img_size={self.img_size}, in_chans={self.in_chans})"
