"""Epoch-seeded loaders: coverage, reproducibility, resume mid-epoch, sharding, and worker parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.data import FashionMNIST, ImageFolderDataset, TensorBatchLoader, build_loader
from mimkit.data.loader import EpochBatchSampler, EpochDataLoader

NUM = 103  # not a multiple of the batch size


@pytest.fixture(scope="module")
def data() -> FashionMNIST:
    return FashionMNIST(split="test", limit=NUM)


def epoch_indices(sampler: EpochBatchSampler, epoch: int, start_batch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return [batch.tolist() for batch in sampler.batches(start_batch)]


def test_each_epoch_covers_every_index_once() -> None:
    sampler = EpochBatchSampler(NUM, 10, seed=3)
    for epoch in range(3):
        batches = epoch_indices(sampler, epoch)
        assert len(batches) == len(sampler) == 11 and len(batches[-1]) == 3
        assert sorted(i for batch in batches for i in batch) == list(range(NUM))


def test_order_is_a_function_of_seed_and_epoch() -> None:
    first, second = EpochBatchSampler(NUM, 10, seed=3), EpochBatchSampler(NUM, 10, seed=3)
    assert epoch_indices(first, 4) == epoch_indices(second, 4)
    assert epoch_indices(first, 4) != epoch_indices(first, 5)
    assert epoch_indices(first, 4) != epoch_indices(EpochBatchSampler(NUM, 10, seed=4), 4)
    unshuffled = EpochBatchSampler(NUM, 10, shuffle=False)
    assert epoch_indices(unshuffled, 7)[0] == list(range(10))


def test_drop_last_gives_full_batches_only() -> None:
    sampler = EpochBatchSampler(NUM, 10, seed=0, drop_last=True)
    batches = epoch_indices(sampler, 0)
    assert len(batches) == len(sampler) == 10 and all(len(batch) == 10 for batch in batches)
    assert len({i for batch in batches for i in batch}) == 100
    with pytest.raises(ValueError, match="no full batch"):
        EpochBatchSampler(5, 10, drop_last=True)


def test_start_batch_is_the_tail_of_the_epoch(data: FashionMNIST) -> None:
    loader = TensorBatchLoader(data, 16, seed=1, drop_last=True)
    loader.set_epoch(2)
    full = list(loader)
    resumed = TensorBatchLoader(data, 16, seed=1, drop_last=True)  # a fresh process after a restart
    resumed.set_epoch(2)
    tail = list(resumed.iter_from(4))
    assert len(full) == 6 and len(tail) == 2
    for (images, labels), (tail_images, tail_labels) in zip(full[4:], tail, strict=True):
        assert torch.equal(images, tail_images) and torch.equal(labels, tail_labels)
    assert list(resumed.iter_from(6)) == []


def test_tensor_loader_yields_the_indexed_images_and_labels(data: FashionMNIST) -> None:
    loader = TensorBatchLoader(data, 10, seed=5)
    loader.set_epoch(1)
    order = epoch_indices(EpochBatchSampler(NUM, 10, seed=5), 1)
    for (images, labels), indices in zip(loader, order, strict=True):
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
        assert torch.equal(images, data.images[indices]) and torch.equal(labels, data.labels[indices])
    seen = torch.cat([labels for _, labels in loader])
    assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(data.labels, minlength=10))


def test_two_ranks_share_one_permutation_without_overlap() -> None:
    for drop_last in (False, True):
        ranks = [EpochBatchSampler(NUM, 8, seed=2, drop_last=drop_last, rank=r, world_size=2) for r in range(2)]
        shards = [epoch_indices(sampler, 3) for sampler in ranks]
        flat = [{i for batch in shard for i in batch} for shard in shards]
        assert not flat[0] & flat[1]
        if drop_last:  # every rank takes the same number of full steps
            assert len(shards[0]) == len(shards[1]) == 6
        else:
            assert flat[0] | flat[1] == set(range(NUM))
        single = epoch_indices(EpochBatchSampler(NUM, 8, seed=2, drop_last=drop_last), 3)
        assert shards[0] == single[0::2][: len(shards[0])] and shards[1] == single[1::2][: len(shards[1])]
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(NUM, 8, rank=2, world_size=2)


def test_unlabelled_batches_have_minus_one_labels(tmp_path: Path, data: FashionMNIST) -> None:
    for index in range(6):
        Image.fromarray(data.images[index, 0].numpy()).save(tmp_path / f"{index}.png")
    folder = ImageFolderDataset(tmp_path, img_size=28, in_chans=1)
    images, labels = next(iter(build_loader(folder, 4, seed=0)))
    assert images.shape == (4, 1, 28, 28) and labels.tolist() == [-1] * 4


def test_worker_loader_matches_in_memory_loader(tmp_path: Path, data: FashionMNIST) -> None:
    for index in range(40):
        folder = tmp_path / f"class{int(data.labels[index])}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(data.images[index, 0].numpy()).save(folder / f"{index:03d}.png")
    memory = ImageFolderDataset(tmp_path, img_size=24, in_chans=3)
    lazy = ImageFolderDataset(tmp_path, img_size=24, in_chans=3, in_memory=False)
    tensor_loader = build_loader(memory, 8, seed=9, drop_last=True)
    worker_loader = build_loader(lazy, 8, seed=9, drop_last=True, num_workers=2)
    assert isinstance(tensor_loader, TensorBatchLoader) and isinstance(worker_loader, EpochDataLoader)
    assert worker_loader.persistent_workers and len(worker_loader) == len(tensor_loader) == 5
    for epoch, start_batch in ((0, 0), (1, 3), (2, 0)):  # persistent workers across epochs and a resume
        tensor_loader.set_epoch(epoch)
        worker_loader.set_epoch(epoch)
        expected = list(tensor_loader.iter_from(start_batch))
        got = list(worker_loader.iter_from(start_batch))
        assert len(got) == len(expected) == 5 - start_batch
        for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
            assert images.dtype == torch.uint8 and labels.dtype == torch.int64
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    assert len(list(worker_loader)) == 5  # a plain iteration starts at batch 0 again


def test_tensor_loader_needs_images_in_memory(tmp_path: Path, data: FashionMNIST) -> None:
    Image.fromarray(data.images[0, 0].numpy()).save(tmp_path / "a.png")
    lazy = ImageFolderDataset(tmp_path, img_size=8, in_chans=1, in_memory=False)
    with pytest.raises(ValueError, match="in-memory"):
        TensorBatchLoader(lazy, 1)
