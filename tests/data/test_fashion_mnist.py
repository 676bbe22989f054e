"""Fashion-MNIST idx reading on the real Debian files, and its error messages on damaged copies."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import FASHION_MNIST_CLASSES, FashionMNIST, build_dataset, load_fashion_mnist

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def train() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(split="train")


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(FMNIST, split="test")


def test_train_split_shapes_dtypes_and_balanced_classes(train: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = train
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert int(labels[0]) == FASHION_MNIST_CLASSES.index("Ankle boot")  # the well-known first training image
    assert images.max() == 255 and images.min() == 0
    assert abs(images.float().mean().item() / 255 - 0.2860) < 1e-3  # the published mean


def test_test_split_is_t10k(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = test_split
    assert images.shape == (10000, 1, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[0] == "T-shirt/top"


def test_reads_uncompressed_idx_files(tmp_path: Path, test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    for kind in ("images-idx3", "labels-idx1"):
        with gzip.open(FMNIST / f"t10k-{kind}-ubyte.gz", "rb") as src:
            (tmp_path / f"t10k-{kind}-ubyte").write_bytes(src.read())
    images, labels = load_fashion_mnist(tmp_path, "test")
    assert torch.equal(images, test_split[0]) and torch.equal(labels, test_split[1])


def test_missing_root_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "data.root" in str(info.value) and "nowhere" in str(info.value)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist(split="validation")


def _copy_test_split(tmp_path: Path) -> Path:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FMNIST / name, tmp_path / name)
    return tmp_path / "t10k-images-idx3-ubyte.gz"


def test_truncated_raw_file_is_named(tmp_path: Path) -> None:
    image_gz = _copy_test_split(tmp_path)
    with gzip.open(image_gz, "rb") as handle:
        data = handle.read()
    image_gz.unlink()
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(data[: -784 * 3])  # three images short
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte is truncated"):
        load_fashion_mnist(tmp_path, "test")


def test_truncated_gzip_is_named(tmp_path: Path) -> None:
    image_gz = _copy_test_split(tmp_path)
    compressed = image_gz.read_bytes()
    image_gz.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz is truncated"):
        load_fashion_mnist(tmp_path, "test")


def test_wrong_magic_is_rejected(tmp_path: Path) -> None:
    _copy_test_split(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels, "rb") as handle:
        data = bytearray(handle.read())
    data[3] = 3  # claims 3 dimensions
    with gzip.open(labels, "wb") as handle:
        handle.write(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist(tmp_path, "test")


def test_dataset_resizes_once_and_repeats_channels(test_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    native = FashionMNIST(split="test", limit=500)
    assert torch.equal(native.images, test_split[0][:500])  # 28 px: untouched
    data = build_dataset("fashion_mnist", split="test", img_size=32, in_chans=3, limit=500)
    assert data.images.shape == (500, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    assert torch.equal(data.labels, test_split[1][:500])
    # Same pixels as Pillow's bilinear (antialiased) resize of each original, up to rounding.
    for index in range(0, 500, 50):
        reference = Image.fromarray(test_split[0][index, 0].numpy()).resize((32, 32), Image.Resampling.BILINEAR)
        difference = data.images[index, 0].int() - torch.from_numpy(np.array(reference)).int()
        assert difference.abs().max() <= 1, index
    image, label = data[3]
    assert image.shape == (3, 32, 32) and image.is_contiguous() and label == int(test_split[1][3])
    assert data.num_skipped == 0 and data.classes == FASHION_MNIST_CLASSES
