"""Batched MAE augmentation and evaluation transforms on real Fashion-MNIST batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from mimkit.data import FashionMNIST
from mimkit.data.transforms import (
    EvalTransform,
    MAEAugment,
    default_normalization,
    denormalize,
    random_resized_crop_params,
    resized_crop,
)

MEAN, STD = default_normalization(1, "fashion_mnist")


@pytest.fixture(scope="module")
def batch28() -> torch.Tensor:
    """(256, 1, 28, 28) uint8 real test images."""
    images = FashionMNIST(split="test", limit=256).images
    return images.contiguous()


@pytest.fixture(scope="module")
def batch32() -> torch.Tensor:
    """(256, 1, 32, 32) uint8 real test images, resized once like training data."""
    return FashionMNIST(split="test", img_size=32, limit=256).images.contiguous()


def normalized(images: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (images.double() / 255 - mean_t) / std_t


def test_output_shape_dtype_and_determinism(batch28: torch.Tensor) -> None:
    augment = MAEAugment(32, mean=MEAN, std=STD)
    first = augment(batch28, generator=torch.Generator().manual_seed(7))
    assert first.shape == (256, 1, 32, 32) and first.dtype == torch.float32
    again = augment(batch28, generator=torch.Generator().manual_seed(7))
    other = augment(batch28, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert first.min() >= normalized(torch.zeros(1)).item() - 1e-5  # bilinear never leaves the pixel range
    assert first.max() <= normalized(torch.full((1,), 255)).item() + 1e-5


@pytest.mark.parametrize("size", [28, 32])
def test_full_crop_without_flip_is_the_normalized_input(size: int) -> None:
    images = FashionMNIST(split="test", img_size=size, limit=64).images
    augment = MAEAugment(size, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, mean=MEAN, std=STD)
    out = augment(images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.double(), normalized(images), atol=1e-5, rtol=0)


def test_flip_mirrors_about_half_of_the_images(batch32: torch.Tensor) -> None:
    augment = MAEAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True, mean=MEAN, std=STD)
    out = augment(batch32, generator=torch.Generator().manual_seed(1)).double()
    plain = normalized(batch32)
    same = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - plain.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    symmetric = (plain - plain.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all())
    flipped = (mirrored & ~symmetric).sum().item()
    kept = (same & ~symmetric).sum().item()
    assert 90 < flipped < 166 and 90 < kept < 166  # Binomial(256, 0.5) within ~5 sigma


def test_crop_crops_halves_apart() -> None:
    halves = torch.zeros(512, 1, 32, 32, dtype=torch.uint8)
    halves[..., 16:] = 255  # left black, right white
    whole = MAEAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, mean=(0.0,), std=(1.0,))
    quarter = MAEAugment(32, scale=(0.25, 0.25), ratio=(1.0, 1.0), hflip=False, mean=(0.0,), std=(1.0,))
    generator = torch.Generator().manual_seed(0)
    whole_means = whole(halves, generator).mean(dim=(1, 2, 3))
    quarter_means = quarter(halves, generator).mean(dim=(1, 2, 3))
    torch.testing.assert_close(whole_means, torch.full((512,), 0.5))
    # 16x16 crops land anywhere: some entirely in one half, the average stays 0.5.
    assert quarter_means.std() > 0.25
    assert (quarter_means < 0.01).any() and (quarter_means > 0.99).any()
    assert abs(quarter_means.mean().item() - 0.5) < 0.05


def test_resized_crop_equals_interpolating_the_cropped_box(batch32: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(3)
    boxes = random_resized_crop_params(256, 32, 32, scale=(0.25, 1.0), generator=generator)
    out = resized_crop(batch32.float(), boxes, 32)
    for index in range(0, 256, 17):
        top, left, height, width = boxes[index].tolist()
        crop = batch32[index : index + 1, :, top : top + height, left : left + width].float()
        reference = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False)
        # Away from the crop border both sample inside the crop; at it, resized_crop blends real neighbours.
        torch.testing.assert_close(out[index, :, 2:-2, 2:-2], reference[0, :, 2:-2, 2:-2], atol=1e-3, rtol=0)


def test_crop_params_follow_torchvision() -> None:
    count = 4000
    ours = random_resized_crop_params(count, 32, 48, scale=(0.2, 1.0), generator=torch.Generator().manual_seed(0))
    top, left, height, width = ours.T
    assert bool(((top >= 0) & (left >= 0) & (top + height <= 32) & (left + width <= 48)).all())
    torch.manual_seed(0)
    theirs = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.empty(1, 32, 48), scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
            for _ in range(count)
        ]
    )
    for column in range(4):  # same distribution of top, left, height and width
        a, b = ours[:, column].double(), theirs[:, column].double()
        assert abs(a.mean() - b.mean()) < 0.05 * b.mean() + 0.3, column
        assert abs(a.std() - b.std()) < 0.08 * b.std() + 0.3, column


def test_crop_params_fall_back_to_center_crop() -> None:
    # No draw fits: an aspect ratio of at least 2 at full area never fits a square.
    boxes = random_resized_crop_params(5, 30, 30, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    assert boxes.tolist() == [[7, 0, 15, 30]] * 5  # torchvision: w = 30, h = round(30 / 2), centred


def test_eval_transform(batch28: torch.Tensor) -> None:
    same = EvalTransform(28, mean=MEAN, std=STD)(batch28[:16])
    torch.testing.assert_close(same.double(), normalized(batch28[:16]), atol=1e-5, rtol=0)
    larger = EvalTransform(32, mean=MEAN, std=STD)(batch28[:16])
    assert larger.shape == (16, 1, 32, 32) and larger.dtype == torch.float32
    expected = F.interpolate(normalized(batch28[:16]).float(), size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(larger, expected, atol=1e-4, rtol=0)
    wide = torch.zeros(2, 3, 10, 20, dtype=torch.uint8)
    wide[..., 5:15] = 255  # the centre square is white
    out = EvalTransform(10, mean=(0.0,), std=(1.0,))(wide)
    assert out.shape == (2, 3, 10, 10) and bool((out == 1).all())


def test_eval_transform_rejects_float_and_wrong_channels(batch28: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="uint8"):
        EvalTransform(28)(batch28.float())
    with pytest.raises(ValueError, match="3 normalization channels"):
        EvalTransform(28, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))(batch28)


def test_default_normalization_and_denormalize(batch28: torch.Tensor) -> None:
    assert default_normalization(1, "fashion_mnist") == ((0.2860,), (0.3530,))
    assert default_normalization(3, "fashion_mnist") == ((0.2860,) * 3, (0.3530,) * 3)
    assert default_normalization(3, "folder") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert default_normalization(1, "folder") == ((0.5,), (0.5,))
    with pytest.raises(ValueError, match="fashion_mnist"):
        default_normalization(1, "cifar")
    pictures = denormalize(normalized(batch28[:8]).float(), MEAN, STD)
    torch.testing.assert_close(pictures, batch28[:8].float() / 255, atol=1e-6, rtol=0)
    assert denormalize(torch.full((1, 4, 4), 100.0), MEAN, STD).max() == 1.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scale"):
        MAEAugment(32, scale=(0.8, 0.2))
    with pytest.raises(ValueError, match="std"):
        MAEAugment(32, mean=(0.5,), std=(0.0,))


def test_parts_of_a_batch_are_augmented_as_the_whole_batch(batch32: torch.Tensor) -> None:
    # What distributed ranks rely on: each augments its rows of the global batch exactly as one process would.
    augment = MAEAugment(32, scale=(0.2, 1.0))
    whole = augment(batch32, generator=torch.Generator().manual_seed(5))
    half = batch32.shape[0] // 2
    parts = [
        augment(batch32[rows], generator=torch.Generator().manual_seed(5), part=(rows.start, batch32.shape[0]))
        for rows in (slice(0, half), slice(half, None))
    ]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[1], augment(batch32[half:], generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="does not hold"):
        augment(batch32, part=(1, batch32.shape[0]))
