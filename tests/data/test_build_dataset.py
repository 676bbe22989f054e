"""``build_dataset``: data sets by name, folder train/test layouts, and errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.data import FashionMNIST, ImageFolderDataset, build_dataset, load_fashion_mnist


@pytest.fixture(scope="module")
def pictures() -> torch.Tensor:
    """(12, 28, 28) uint8 real Fashion-MNIST test images."""
    return load_fashion_mnist(split="test")[0][:12, 0]


def save_pictures(folder: Path, pictures: torch.Tensor, classes: tuple[str, ...]) -> None:
    for index, pixels in enumerate(pictures):
        target = folder / classes[index % len(classes)] if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.numpy()).save(target / f"{index:02d}.png")


def test_fashion_mnist_by_name() -> None:
    data = build_dataset("fashion_mnist", split="test", img_size=16, in_chans=3, limit=50)
    assert isinstance(data, FashionMNIST)
    assert data.images.shape == (50, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.labels.shape == (50,) and len(data.classes) == 10
    native = build_dataset("fashion_mnist", split="test", limit=5)
    assert native.images.shape == (5, 1, 28, 28)


def test_fashion_mnist_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_dataset("fashion_mnist", root=tmp_path, img_size=28, in_chans=1)


def test_folder_with_train_and_test(tmp_path: Path, pictures: torch.Tensor) -> None:
    save_pictures(tmp_path / "train", pictures[:8], ("a", "b"))
    save_pictures(tmp_path / "test", pictures[8:], ("a", "b"))
    train = build_dataset("folder", tmp_path, "train", img_size=28, in_chans=1)
    test = build_dataset("folder", tmp_path, "test", img_size=28, in_chans=1)
    assert isinstance(train, ImageFolderDataset) and len(train) == 8 and len(test) == 4
    assert train.classes == test.classes == ["a", "b"]
    assert train.images is not None and test.images is not None
    assert torch.equal(test.images[0, 0], pictures[8])  # test/a/08.png


def test_folder_val_stands_in_for_test(tmp_path: Path, pictures: torch.Tensor) -> None:
    save_pictures(tmp_path / "train", pictures[:8], ("a",))
    save_pictures(tmp_path / "val", pictures[8:], ("a",))
    assert len(build_dataset("folder", tmp_path, "test", img_size=20)) == 4
    assert build_dataset("folder", tmp_path, "test", img_size=20).images.shape == (4, 3, 20, 20)


def test_plain_folder_is_train_only(tmp_path: Path, pictures: torch.Tensor) -> None:
    save_pictures(tmp_path, pictures, ())
    train = build_dataset("folder", tmp_path, "train", img_size=28, in_chans=1)
    assert len(train) == 12 and train.labels is None
    with pytest.raises(FileNotFoundError, match=r"no test split: expected .*train.* with .*test.* or .*val"):
        build_dataset("folder", tmp_path, "test", img_size=28, in_chans=1)


def test_train_without_test_folder(tmp_path: Path, pictures: torch.Tensor) -> None:
    save_pictures(tmp_path / "train", pictures, ("a", "b"))
    assert build_dataset("folder", tmp_path, "train", img_size=8).classes == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="no test split"):
        build_dataset("folder", tmp_path, "test", img_size=8)


def test_bad_names_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'; choose one of fashion_mnist, folder"):
        build_dataset("cifar10", tmp_path, img_size=32, in_chans=3)
    with pytest.raises(ValueError, match=r"data\.root"):
        build_dataset("folder", None, img_size=32)
    with pytest.raises(ValueError, match="split"):
        build_dataset("folder", tmp_path, "validation", img_size=32)
    with pytest.raises(FileNotFoundError, match="missing"):
        build_dataset("folder", tmp_path / "missing", img_size=32)
    with pytest.raises(ValueError, match="in_chans"):
        build_dataset("fashion_mnist", img_size=28, in_chans=2)
