"""Weighted kNN on real Fashion-MNIST: raw pixels as features, and features of a small real ViT."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.eval.knn import extract_features, knn_accuracy, knn_classify, knn_scores
from mimkit.models import create_encoder

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path, limit: int) -> torch.Tensor:
    """The first ``limit`` items of a gzipped idx file (big-endian dims after a 4-byte magic)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)[:limit].copy())


@pytest.fixture(scope="module")
def fmnist() -> dict[str, torch.Tensor]:
    return {
        "train_images": read_idx(FMNIST / "train-images-idx3-ubyte.gz", 2000),  # (2000, 28, 28) uint8
        "train_labels": read_idx(FMNIST / "train-labels-idx1-ubyte.gz", 2000),
        "test_images": read_idx(FMNIST / "t10k-images-idx3-ubyte.gz", 500),
        "test_labels": read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz", 500),
    }


def pixels(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1).float()  # (N, 784)


def test_raw_pixel_knn_is_far_above_chance(fmnist):
    accuracy = knn_accuracy(
        pixels(fmnist["train_images"]), fmnist["train_labels"], pixels(fmnist["test_images"]), fmnist["test_labels"]
    )
    assert accuracy["top1"] > 0.75  # raw-pixel kNN on Fashion-MNIST: ~0.78 with 2000 train images, chance 0.1
    assert accuracy["top5"] >= accuracy["top1"]
    assert accuracy["top5"] > 0.95


def test_one_nearest_neighbour_of_the_training_set_is_itself(fmnist):
    features = pixels(fmnist["train_images"])
    assert torch.unique(features, dim=0).shape[0] == features.shape[0]  # no duplicate images to tie
    predictions = knn_classify(features, fmnist["train_labels"], features, k=1)
    assert torch.equal(predictions, fmnist["train_labels"].long())


def test_chunking_does_not_change_the_result(fmnist):
    train, labels, test = pixels(fmnist["train_images"]), fmnist["train_labels"], pixels(fmnist["test_images"])
    whole = knn_scores(train, labels, test, chunk=10_000)
    chunked = knn_scores(train, labels, test, chunk=37)  # 500 = 13 * 37 + 19: a ragged last chunk
    assert chunked.shape == (500, 10)
    assert torch.allclose(chunked, whole, rtol=1e-5)
    assert torch.equal(knn_classify(train, labels, test, chunk=37), whole.argmax(dim=1))


def test_votes_are_weighted_by_similarity():
    # Two class-0 neighbours at cosine 0.6 outvote one class-1 neighbour at cosine 0.8 only when the
    # temperature is high (weights nearly equal); at DINO's 0.07 the closer neighbour wins.
    train = torch.tensor([[0.6, 0.8], [0.6, -0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_classify(train, labels, test, k=3, temperature=0.07).item() == 1
    assert knn_classify(train, labels, test, k=3, temperature=10.0).item() == 0
    scores = knn_scores(train, labels, test, k=3, temperature=0.5)
    assert torch.allclose(scores, torch.tensor([[2 * np.exp(0.6 / 0.5), np.exp(0.8 / 0.5)]], dtype=torch.float32))


def test_rejects_inputs_it_cannot_score():
    features, labels = torch.randn(5, 3), torch.arange(5)
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(features, labels, features, k=6)
    with pytest.raises(ValueError, match="dims"):
        knn_classify(features, labels, torch.randn(2, 4))
    with pytest.raises(ValueError, match="train_labels"):
        knn_classify(features, labels[:4], features)


def test_extract_features_batches_like_one_pass_and_restores_training_flag(fmnist):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=2, drop_path_rate=0.3).train()
    images = fmnist["train_images"][:300, None]  # (300, 1, 28, 28) uint8

    def transform(batch: torch.Tensor) -> torch.Tensor:
        assert batch.dtype == torch.uint8
        return (batch.float() / 255 - 0.2860) / 0.3530

    features = extract_features(encoder, images, transform=transform, batch_size=128, progress=False)
    assert encoder.training
    assert features.shape == (300, 192) and features.dtype == torch.float32 and not features.requires_grad
    encoder.eval()
    with torch.no_grad():
        expected = encoder.forward_features(transform(images), pool="avg")
    averaged = extract_features(encoder, images, transform=transform, batch_size=77, pool="avg", desc="avg features")
    assert not encoder.training
    assert torch.allclose(averaged, expected, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(features, encoder.forward_features(transform(images)), atol=1e-5)


def test_knn_on_random_vit_features_beats_chance(fmnist):
    """Even an untrained ViT's features carry class information; the pipeline must preserve it."""
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=1)

    def transform(batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() / 255 - 0.2860) / 0.3530

    train = extract_features(encoder, fmnist["train_images"][:1000, None], transform=transform, progress=False)
    test = extract_features(encoder, fmnist["test_images"][:300, None], transform=transform, progress=False)
    shuffled = fmnist["train_labels"][:1000][torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    accuracy = knn_accuracy(train, fmnist["train_labels"][:1000], test, fmnist["test_labels"][:300])["top1"]
    shuffled_accuracy = knn_accuracy(train, shuffled, test, fmnist["test_labels"][:300])["top1"]
    assert accuracy > 0.4
    assert shuffled_accuracy < 0.25
