"""Epoch-seeded batch loaders: the order of every epoch is a pure function of (seed, epoch).

A resumed run calls ``set_epoch(epoch)`` and ``iter_from(start_batch)`` and sees exactly the batches the
uninterrupted run would have seen. In-memory data sets are batched by indexing their uint8 tensor in
the main process (no workers needed); others go through a torch ``DataLoader`` with persistent workers
driven by the same batch order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mimkit.data.crops import CropDataset


class ImageDataset(Protocol):
    """What loaders, training and evaluation read from a data set.

    ``images`` is (N, C, S, S) uint8 when held in memory, else None; ``labels`` is (N,) int64 or None;
    ``__getitem__`` gives a (C, S, S) uint8 tensor and an int label (-1 when unlabelled).
    """

    images: Tensor | None
    labels: Tensor | None
    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """The sample order of one epoch: a permutation that depends only on ``(seed, epoch)``.

    Returns:
        (num_samples,) int64.
    """
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_samples, generator=generator)


class EpochBatchSampler:
    """Batches of indices for one rank, from a global permutation seeded per epoch.

    The global permutation is cut into consecutive batches; rank ``r`` of ``world_size`` takes batches
    ``r, r + world_size, ...``. With ``drop_last`` the incomplete last batch is dropped and the global
    batch count is rounded down to a multiple of ``world_size``, so every rank takes the same number of
    steps (what distributed training needs). Without it the last batch may be short and ranks may
    differ by one batch (fine for evaluation).

    Args:
        num_samples: data set size.
        batch_size: samples per batch, per rank.
        seed: base seed; the order of epoch ``e`` is :func:`epoch_permutation` ``(seed, e)``.
        shuffle: False keeps index order.
        drop_last: see above.
        rank, world_size: this process's shard.
        keyed: yield ``(index, epoch)`` keys instead of indices, for data sets whose samples depend on the
            epoch (:class:`~mimkit.data.crops.CropDataset` draws each crop from ``(seed, epoch, index)``).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        keyed: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        if drop_last and num_samples < batch_size * world_size:
            raise ValueError(
                f"{num_samples} samples make no full batch of {batch_size} for each of {world_size} ranks "
                f"with drop_last; lower the batch size or add data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.keyed = keyed
        self.epoch = 0
        self.start_batch = 0  # read (and reset) by DataLoader iteration, see EpochDataLoader.iter_from

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch`` for the following iterations."""
        self.epoch = epoch

    def _num_global_batches(self) -> int:
        if self.drop_last:
            full = self.num_samples // self.batch_size
            return full - full % self.world_size
        return -(-self.num_samples // self.batch_size)

    def __len__(self) -> int:
        """Batches this rank takes in a whole epoch."""
        return len(range(self.rank, self._num_global_batches(), self.world_size))

    def batches(self, start_batch: int = 0) -> list[Tensor]:
        """This rank's batches of the current epoch, skipping its first ``start_batch``.

        Returns:
            A list of (B,) int64 index tensors.
        """
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        order = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)  # (N,)
        ranks_batches = range(self.rank, self._num_global_batches(), self.world_size)[start_batch:]
        return [order[index * self.batch_size : (index + 1) * self.batch_size] for index in ranks_batches]

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        # Built eagerly so that ``start_batch`` is read when iteration starts, not at the first batch.
        batches = [batch.tolist() for batch in self.batches(self.start_batch)]
        if self.keyed:
            return iter([[(index, self.epoch) for index in batch] for batch in batches])
        return iter(batches)


class TensorBatchLoader:
    """Shuffled uint8 batches straight from an in-memory data set, reproducible per epoch.

    Args:
        dataset: has ``images`` (N, C, S, S) uint8 and ``labels`` (N,) int64 or None.
        batch_size: images per batch (per rank).
        seed, shuffle, drop_last, rank, world_size: see :class:`EpochBatchSampler`.

    Yields:
        (images (B, C, S, S) uint8, labels (B,) int64), labels -1 for unlabelled data sets.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if dataset.images is None:
            raise ValueError("TensorBatchLoader needs an in-memory data set (images is None); use build_loader")
        self.dataset = dataset
        self.images: Tensor = dataset.images
        self.labels = dataset.labels if dataset.labels is not None else torch.full((len(dataset),), -1)
        self.sampler = EpochBatchSampler(
            len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch`` for the following iterations."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate the current epoch from its ``start_batch``-th batch (resume mid-epoch)."""
        for indices in self.sampler.batches(start_batch):
            yield self.images[indices], self.labels[indices]  # (B, C, S, S), (B,)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochBatchSampler`, with ``set_epoch`` and ``iter_from``.

    Yields the same (uint8 images, int64 labels) batches, in the same order, as
    :class:`TensorBatchLoader` on the in-memory version of the data set.
    """

    batch_sampler: EpochBatchSampler

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch`` for the following iterations."""
        self.batch_sampler.set_epoch(epoch)

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate the current epoch from its ``start_batch``-th batch (resume mid-epoch)."""
        self.batch_sampler.start_batch = start_batch
        try:
            return super().__iter__()  # the sampler's batch list is built here, with start_batch
        finally:
            self.batch_sampler.start_batch = 0


def build_loader(
    dataset: Dataset | ImageDataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> TensorBatchLoader | EpochDataLoader:
    """The right loader for a data set: direct tensor batching in memory, decoding workers otherwise.

    Both kinds have ``set_epoch(epoch)``, ``iter_from(start_batch)``, ``__iter__`` and ``__len__``, and
    yield the same batches for the same ``seed`` and epoch.

    Args:
        dataset: an :class:`ImageDataset`.
        batch_size: images per batch (per rank).
        seed, shuffle, drop_last, rank, world_size: see :class:`EpochBatchSampler`.
        num_workers: decoding processes for data sets not in memory (persistent across epochs);
            0 decodes in the main process.
        pin_memory: pin worker batches (for faster host-to-GPU copies).

    Returns:
        A :class:`TensorBatchLoader` when ``dataset.images`` is set, else an :class:`EpochDataLoader`.
    """
    order: dict[str, Any] = dict(seed=seed, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size)
    if getattr(dataset, "images", None) is not None:
        return TensorBatchLoader(cast(ImageDataset, dataset), batch_size, **order)
    keyed = isinstance(dataset, CropDataset)  # its crops are drawn per (seed, epoch, index)
    sampler = EpochBatchSampler(len(cast(ImageDataset, dataset)), batch_size, keyed=keyed, **order)
    return EpochDataLoader(
        cast(Dataset, dataset),
        batch_sampler=cast(Sampler[list[int]], sampler),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
