"""Image folders: scanning, decoding of every common Pillow mode, bad files, and the uint8 dataset.

The images are real files written with Pillow (many of them Fashion-MNIST pictures saved as PNG).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import (
    BadImageError,
    BadImageWarning,
    ImageFolderDataset,
    load_fashion_mnist,
    load_image,
    scan_image_folder,
)

CLASSES = ("bag", "coat", "sneaker")


@pytest.fixture(scope="module")
def fmnist_pictures() -> tuple[np.ndarray, np.ndarray]:
    """24 real Fashion-MNIST test images (24, 28, 28) uint8 and their labels."""
    images, labels = load_fashion_mnist(split="test")
    return images[:24, 0].numpy(), labels[:24].numpy()


@pytest.fixture()
def labelled_folder(tmp_path: Path, fmnist_pictures: tuple[np.ndarray, np.ndarray]) -> Path:
    """root/{bag,coat,sneaker}/NN.png, 8 grayscale PNGs per class, image i in class i % 3."""
    images, _ = fmnist_pictures
    for index, pixels in enumerate(images):
        folder = tmp_path / "pictures" / CLASSES[index % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return tmp_path / "pictures"


def gradient_rgb(width: int = 48, height: int = 40) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], axis=-1).round().astype(np.uint8)  # (H, W, 3)


def write_bad_files(folder: Path) -> list[Path]:
    """A random-bytes .png, a JPEG cut in half and a zero-byte .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    truncated = folder / "truncated.jpg"
    Image.fromarray(gradient_rgb(96, 96)).save(truncated, quality=90)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    return [corrupt, truncated, empty]


# ---- scanning


def test_scan_labels_by_first_level_subfolder(tmp_path: Path) -> None:
    pixel = Image.new("L", (4, 4), 7)
    for relative in ("dog/b.png", "cat/z.PNG", "dog/deep/er/a.JPEG", "cat/a.webp", ".hidden/x.png", "dog/._x.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        pixel.save(tmp_path / relative, format="WEBP" if relative.endswith("webp") else "PNG")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    paths, labels, classes = scan_image_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "cat/a.webp",
        "cat/z.PNG",
        "dog/b.png",
        "dog/deep/er/a.JPEG",
    ]
    assert labels == [0, 0, 1, 1]


def test_scan_top_level_images_are_unlabelled(tmp_path: Path) -> None:
    for name in ("b.png", "a.bmp", "c.tif"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    paths, labels, classes = scan_image_folder(tmp_path)
    assert [p.name for p in paths] == ["a.bmp", "b.png", "c.tif"]
    assert labels is None and classes == []


def test_scan_mixed_layout_is_unlabelled_with_warning(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "top.png")
    Image.new("L", (4, 4)).save(tmp_path / "cls" / "inner.png")
    with pytest.warns(UserWarning, match="treating all as unlabelled"):
        paths, labels, classes = scan_image_folder(tmp_path)
    assert len(paths) == 2 and labels is None and classes == []


def test_scan_empty_and_missing_folders_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no image files .* found under .*empty"):
        scan_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_image_folder(tmp_path / "missing")


# ---- decoding modes


def test_gray_and_rgb(tmp_path: Path) -> None:
    rgb = gradient_rgb()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png", 3), rgb.transpose(2, 0, 1))
    gray = load_image(tmp_path / "gray.png", 1)
    assert gray.shape == (1, 40, 48) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[0], rgb[..., 0])
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png", 3), np.repeat(gray, 3, axis=0))
    # Luminance of pure red, green and blue: ITU-R 601-2 weights 0.299, 0.587, 0.114.
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)  # (1, 3, 3)
    Image.fromarray(colours).save(tmp_path / "primaries.png")
    assert load_image(tmp_path / "primaries.png", 1)[0, 0].tolist() == [76, 150, 29]


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[:, 0] = (255, 0, 0, 0)  # fully transparent red
    rgba[:, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png", 3)  # (3, 2, 3)
    assert out[:, 0, 0].tolist() == [255, 255, 255]
    assert out[:, 0, 1].tolist() == [0, 0, 255]
    assert all(abs(v - 127) <= 1 for v in out[:, 0, 2].tolist())


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    la = np.array([[[100, 0], [100, 255]]], dtype=np.uint8)  # (1, 2, 2): gray 100, alpha 0 then 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png", 1)[0, 0].tolist() == [255, 100]
    assert load_image(tmp_path / "la.png", 3)[:, 0, 1].tolist() == [100, 100, 100]


def test_cmyk(tmp_path: Path) -> None:
    cmyk = np.zeros((2, 2, 4), dtype=np.uint8)
    cmyk[0, 0] = (255, 0, 0, 0)  # cyan
    cmyk[0, 1] = (0, 0, 0, 255)  # black
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    out = load_image(tmp_path / "cmyk.tif", 3)
    assert out[:, 0, 0].tolist() == [0, 255, 255]
    assert out[:, 0, 1].tolist() == [0, 0, 0]
    assert out[:, 1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16_bit_gradient_is_scaled_not_clipped(tmp_path: Path, fmt: str) -> None:
    values = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)  # (4, 256)
    Image.fromarray(values).save(tmp_path / f"deep.{fmt}")
    with Image.open(tmp_path / f"deep.{fmt}") as check:
        assert check.mode.startswith("I;16")
    out = load_image(tmp_path / f"deep.{fmt}", 1)[0, 0].astype(int)  # (256,)
    assert out[0] == 0 and out[-1] == 255
    assert np.all(np.diff(out) >= 0) and len(np.unique(out)) >= 250  # the gradient survives
    np.testing.assert_array_equal(out, np.round(values[0] / 257))  # 65535 -> 255, exactly 8 bits per level
    assert load_image(tmp_path / f"deep.{fmt}", 3).shape == (3, 4, 256)


def test_32_bit_int_and_float(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 64).round().astype(np.int32)[None].repeat(2, 0)  # (2, 64)
    Image.fromarray(values).save(tmp_path / "int.tif")
    with Image.open(tmp_path / "int.tif") as check:
        assert check.mode == "I"
    np.testing.assert_array_equal(load_image(tmp_path / "int.tif", 1)[0, 0], np.round(values[0] / 257))
    unit = (values / 65535).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "unit.tif", 1)[0, 0], np.rint(unit[0] * 255))
    Image.fromarray(unit * 10 - 3).save(tmp_path / "wide.tif")  # outside [0, 1]: min-max rescaled
    wide = load_image(tmp_path / "wide.tif", 1)[0, 0]
    assert wide[0] == 0 and wide[-1] == 255 and np.all(np.diff(wide.astype(int)) >= 0)


def test_palette_with_transparency_and_one_bit(tmp_path: Path) -> None:
    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (256 - 3) * 3)
    palette_image.putdata([0, 1, 2])
    palette_image.save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png", 3)[:, 0].T.tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 0]]
    palette_image.save(tmp_path / "palette_trns.png", transparency=2)  # index 2 (black) is transparent
    assert load_image(tmp_path / "palette_trns.png", 3)[:, 0, 2].tolist() == [255, 255, 255]
    palette_image.save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif", 3)[:, 0, 1].tolist() == [0, 255, 0]

    bits = (np.indices((4, 4)).sum(0) % 2).astype(bool)  # checkerboard
    Image.fromarray(bits).convert("1").save(tmp_path / "bits.png")
    with Image.open(tmp_path / "bits.png") as check:
        assert check.mode == "1"
    np.testing.assert_array_equal(load_image(tmp_path / "bits.png", 1)[0], bits.astype(np.uint8) * 255)


def test_resize_shorter_side_and_center_crop(tmp_path: Path) -> None:
    wide = np.zeros((20, 40), dtype=np.uint8)
    wide[:, 10:30] = 255  # only the central square is white
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 1, size=16)
    assert out.shape == (1, 16, 16)
    assert out[..., 1:-1].min() == 255 and out.min() > 200  # the filter only grazes the black sides
    tall = wide.T.copy()
    Image.fromarray(tall).save(tmp_path / "tall.png")
    assert load_image(tmp_path / "tall.png", 3, size=8).shape == (3, 8, 8)


def test_large_jpeg_reduced_decode_matches_full_decode(tmp_path: Path) -> None:
    photo = np.asarray(Image.fromarray(gradient_rgb(64, 48)).resize((800, 600), Image.Resampling.BICUBIC))
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    fast = load_image(tmp_path / "photo.jpg", 3, size=32).astype(float)  # DCT-scaled decode
    with Image.open(tmp_path / "photo.jpg") as full:
        reference = np.asarray(full.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR, box=(100, 0, 700, 600)))
    assert np.abs(fast - reference.transpose(2, 0, 1)).mean() < 2.0
    gray = load_image(tmp_path / "photo.jpg", 1, size=32).astype(float)
    assert np.abs(gray[0] - np.asarray(Image.fromarray(reference).convert("L"))).mean() < 2.0


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(gradient_rgb(48, 40)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg", 3).shape == (3, 48, 40)


def test_bad_files_raise_bad_image_error(tmp_path: Path) -> None:
    for path in write_bad_files(tmp_path):
        with pytest.raises(BadImageError) as info:
            load_image(path, 3)
        assert info.value.path == path and path.name in str(info.value) and info.value.reason
    with pytest.raises(ValueError, match="in_chans"):
        load_image(tmp_path / "empty.jpg", 2)


def test_decompression_bombs_are_bad_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (64, 64)).save(tmp_path / "huge.png")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow itself refuses above twice the limit
    with pytest.raises(BadImageError, match="DecompressionBomb"):
        load_image(tmp_path / "huge.png", 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # Pillow only warns between 1x and 2x
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(BadImageError, match="decompression bomb"):
        load_image(tmp_path / "huge.png", 1)


# ---- the dataset


def test_in_memory_dataset_holds_exact_pixels_and_labels(
    labelled_folder: Path, fmnist_pictures: tuple[np.ndarray, np.ndarray]
) -> None:
    data = ImageFolderDataset(labelled_folder, img_size=28, in_chans=1, progress=False)
    assert data.in_memory and data.images is not None and data.labels is not None
    assert data.images.shape == (24, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.classes == list(CLASSES) and data.num_skipped == 0
    for position, path in enumerate(data.paths):
        index = int(path.stem)
        assert torch.equal(data.images[position, 0], torch.from_numpy(fmnist_pictures[0][index]))
        assert int(data.labels[position]) == index % 3
    image, label = data[5]
    assert image.shape == (1, 28, 28) and label == int(data.paths[5].stem) % 3


def test_on_the_fly_dataset_matches_in_memory(labelled_folder: Path) -> None:
    memory = ImageFolderDataset(labelled_folder, img_size=20, in_chans=3, progress=False, num_workers=1)
    lazy = ImageFolderDataset(labelled_folder, img_size=20, in_chans=3, in_memory=False)
    auto = ImageFolderDataset(labelled_folder, img_size=20, in_chans=3, memory_budget=1000)  # too big to hold
    assert memory.images is not None and memory.images.shape == (24, 3, 20, 20)
    assert lazy.images is None and not lazy.in_memory and not auto.in_memory
    for index in (0, 7, 23, -1):
        image, label = lazy[index]
        assert torch.equal(image, memory.images[index]) and label == int(memory.labels[index])
    with pytest.raises(IndexError):
        lazy[24]


def test_unlabelled_folder_gives_minus_one(tmp_path: Path, fmnist_pictures: tuple[np.ndarray, np.ndarray]) -> None:
    for index, pixels in enumerate(fmnist_pictures[0][:5]):
        Image.fromarray(pixels).save(tmp_path / f"{index}.png")
    data = ImageFolderDataset(tmp_path, img_size=14, in_chans=1)
    assert data.labels is None and data.classes == [] and len(data) == 5
    assert data[2][1] == -1 and data[2][0].shape == (1, 14, 14)


def test_limit_keeps_every_class(labelled_folder: Path) -> None:
    data = ImageFolderDataset(labelled_folder, img_size=8, in_chans=1, limit=6)
    assert len(data) == 6 and data.labels is not None
    assert torch.bincount(data.labels).tolist() == [2, 2, 2]


def test_bad_files_are_skipped_counted_and_named(labelled_folder: Path) -> None:
    bad = write_bad_files(labelled_folder / "coat")
    with pytest.warns(BadImageWarning) as record:
        data = ImageFolderDataset(labelled_folder, img_size=28, in_chans=1)
    messages = " ".join(str(warning.message) for warning in record)
    for path in bad:
        assert str(path) in messages
    assert data.num_skipped == 3 and {path for path, _ in data.skipped} == set(bad)
    assert len(data) == 24 and data.images is not None and data.images.shape[0] == 24
    assert torch.bincount(data.labels).tolist() == [8, 8, 8]  # the good images kept their classes


def test_on_the_fly_skips_by_header_and_replaces_late_failures(
    labelled_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, truncated, empty = write_bad_files(labelled_folder / "coat")
    with pytest.warns(BadImageWarning):
        lazy = ImageFolderDataset(labelled_folder, img_size=28, in_chans=1, in_memory=False)
    assert {path for path, _ in lazy.skipped} == {corrupt, empty}  # the header check cannot see truncation
    position = lazy.paths.index(truncated)
    with caplog.at_level(logging.WARNING, logger="mimkit.data.folder"):
        image, label = lazy[position]  # never crashes: the next image stands in
    assert "truncated.jpg" in caplog.text
    replacement, replacement_label = lazy[position + 1]
    assert torch.equal(image, replacement) and label == replacement_label
    with pytest.warns(BadImageWarning):
        full = ImageFolderDataset(labelled_folder, img_size=28, in_chans=1, in_memory=False, validate="full")
    assert {path for path, _ in full.skipped} == {corrupt, truncated, empty}


def test_every_file_bad_is_an_error(tmp_path: Path) -> None:
    write_bad_files(tmp_path)
    with pytest.warns(BadImageWarning), pytest.raises(ValueError, match="none of the 3 image files"):
        ImageFolderDataset(tmp_path, img_size=8, in_chans=3)
