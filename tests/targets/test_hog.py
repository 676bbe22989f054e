"""MaskFeat's HOG target: exact zeros, orientation bins, unit norms, a loop reference and real images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.data.fashion_mnist import load_fashion_mnist
from mimkit.targets import HOGFeatures

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def reference_hog(
    images: np.ndarray, patch_size: int, cell_size: int, num_bins: int, gaussian_weight: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-by-pixel HOG in float64: (normalized features (B, L, dim), their norms before normalizing (B, L))."""
    batch, channels, height, width = images.shape
    padded = np.pad(images.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    offsets = np.arange(patch_size) - (patch_size - 1) / 2
    profile = np.exp(-0.5 * (offsets / (patch_size / 2)) ** 2)
    window = np.outer(profile, profile) / np.outer(profile, profile).sum() if gaussian_weight else None
    hist = np.zeros((batch, channels, num_bins, height // cell_size, width // cell_size))
    for b in range(batch):
        for c in range(channels):
            for y in range(height):
                for x in range(width):
                    grad_x = padded[b, c, y + 1, x + 2] - padded[b, c, y + 1, x]
                    grad_y = padded[b, c, y + 2, x + 1] - padded[b, c, y, x + 1]
                    magnitude = math.sqrt(grad_x**2 + grad_y**2)
                    if window is not None:
                        magnitude *= window[y % patch_size, x % patch_size]
                    angle = math.atan2(grad_y, grad_x) % math.pi
                    bin_index = min(int(angle / (math.pi / num_bins)), num_bins - 1)
                    hist[b, c, bin_index, y // cell_size, x // cell_size] += magnitude
    per_side = patch_size // cell_size
    rows = []
    for b in range(batch):
        patches = []
        for gy in range(height // patch_size):
            for gx in range(width // patch_size):
                cells = hist[b, :, :, gy * per_side : (gy + 1) * per_side, gx * per_side : (gx + 1) * per_side]
                patches.append(cells.reshape(-1))  # (C, bins, cell row, cell column) flattened
        rows.append(patches)
    raw = np.array(rows)  # (B, L, dim)
    norms = np.linalg.norm(raw, axis=-1)
    return raw / np.maximum(norms, 1e-12)[..., None], norms


@pytest.fixture(scope="module")
def fmnist() -> Tensor:
    """64 Fashion-MNIST test images, normalized: (64, 1, 28, 28)."""
    images, _ = load_fashion_mnist(split="test")
    return (images[:64].float() / 255 - FMNIST_MEAN) / FMNIST_STD


def test_constant_images_give_exact_zeros() -> None:
    for channels in (1, 3):
        hog = HOGFeatures(patch_size=8, cell_size=4, in_chans=channels)
        features = hog(torch.full((2, channels, 16, 24), 0.7))
        assert features.shape == (2, 6, hog.dim) and torch.equal(features, torch.zeros_like(features))


def test_shape_and_dim() -> None:
    hog = HOGFeatures(patch_size=8, cell_size=4, num_bins=9, in_chans=3)
    assert hog.dim == 3 * 9 * 4
    assert hog(torch.randn(5, 3, 32, 48)).shape == (5, 24, 108)
    assert HOGFeatures(patch_size=4).cell_size == 2 and HOGFeatures(patch_size=4).dim == 36  # 2x2 cells of 2 pixels
    assert HOGFeatures(patch_size=3).cell_size == 3


@pytest.mark.parametrize(("edge", "expected_bin"), [("vertical", 0), ("horizontal", 4)])
def test_edges_put_their_energy_in_the_gradient_direction_bin(edge: str, expected_bin: int) -> None:
    image = torch.zeros(1, 1, 16, 16)
    if edge == "vertical":
        image[..., :, 8:] = 1.0  # dark left, bright right: gradient along x (0 degrees)
    else:
        image[..., 8:, :] = 1.0  # gradient along y (90 degrees, in bin 90 / 20 = 4)
    hog = HOGFeatures(patch_size=16, cell_size=8, num_bins=9)
    per_bin = hog(image).view(1, 9, 2, 2).sum(dim=(-1, -2))[0]  # (bins,) summed over the 2x2 cells
    assert per_bin[expected_bin] > 0
    assert torch.equal(per_bin[torch.arange(9) != expected_bin], torch.zeros(8))


def test_patches_with_gradient_have_unit_norm(fmnist: Tensor) -> None:
    features = HOGFeatures(patch_size=4)(fmnist)  # (64, 49, 36)
    norms = features.norm(dim=-1)
    _, raw_norms = reference_hog(fmnist[:4].numpy(), patch_size=4, cell_size=2, num_bins=9, gaussian_weight=False)
    has_gradient = torch.from_numpy(raw_norms) > 0
    assert has_gradient.any() and (~has_gradient).any()  # Fashion-MNIST has empty background patches
    assert torch.allclose(norms[:4][has_gradient], torch.ones(()), atol=1e-5)
    assert torch.equal(norms[:4][~has_gradient], torch.zeros(int((~has_gradient).sum())))
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))


@pytest.mark.parametrize("gaussian_weight", [False, True])
def test_matches_a_loop_reference_on_random_images(gaussian_weight: bool) -> None:
    images = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    hog = HOGFeatures(patch_size=4, cell_size=2, num_bins=9, in_chans=3, gaussian_weight=gaussian_weight)
    expected, _ = reference_hog(images.numpy(), patch_size=4, cell_size=2, num_bins=9, gaussian_weight=gaussian_weight)
    features = hog(images)
    assert features.shape == expected.shape == (2, 6, 108)
    assert torch.allclose(features, torch.from_numpy(expected).float(), atol=1e-5, rtol=0)


def test_real_images_are_invariant_to_the_normalization(fmnist: Tensor) -> None:
    hog = HOGFeatures(patch_size=4)
    pixels = fmnist * FMNIST_STD + FMNIST_MEAN  # back to [0, 1]
    assert torch.allclose(hog(fmnist), hog(pixels), atol=1e-5, rtol=0)
    # RGB with unequal stds: pixel_std restores the pixel-scale gradients.
    rgb = torch.cat([pixels, pixels.flip(-1), pixels.transpose(-1, -2)], dim=1)  # (64, 3, 28, 28)
    std = torch.tensor([0.2, 0.4, 0.8]).view(1, 3, 1, 1)
    normalized = (rgb - 0.5) / std
    raw = HOGFeatures(patch_size=4, in_chans=3)(rgb)
    assert torch.allclose(HOGFeatures(patch_size=4, in_chans=3, pixel_std=[0.2, 0.4, 0.8])(normalized), raw, atol=1e-5)
    assert not torch.allclose(HOGFeatures(patch_size=4, in_chans=3)(normalized), raw, atol=1e-3)


def test_features_carry_no_gradient(fmnist: Tensor) -> None:
    images = fmnist[:2].clone().requires_grad_(True)
    assert not HOGFeatures(patch_size=4)(images).requires_grad


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match=r"cell_size 3 must be positive and divide patch_size 4"):
        HOGFeatures(patch_size=4, cell_size=3)
    with pytest.raises(ValueError, match=r"image size 30x32 is not divisible by patch_size 4"):
        HOGFeatures(patch_size=4)(torch.zeros(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"expects 1 channels, got images of 3"):
        HOGFeatures(patch_size=4)(torch.zeros(1, 3, 32, 32))


def test_batching_changes_nothing(fmnist: Tensor) -> None:
    hog = HOGFeatures(patch_size=4, gaussian_weight=True)
    batched = hog(fmnist[:8])
    alone = torch.cat([hog(fmnist[i : i + 1]) for i in range(8)])
    assert torch.equal(batched, alone)
    assert F.cosine_similarity(batched[0], batched[1], dim=-1).mean() < 0.99  # different garments differ
