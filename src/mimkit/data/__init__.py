"""Data sets (Fashion-MNIST, image folders, tar shards) as uint8, random-resized crops of the originals, loaders
and batched augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mimkit.data.crops import CropDataset, CropRecord
from mimkit.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, load_fashion_mnist
from mimkit.data.folder import BadImageError, BadImageWarning, ImageFolderDataset, load_image, scan_image_folder
from mimkit.data.loader import EpochDataLoader, ImageDataset, TensorBatchLoader, build_loader
from mimkit.data.shards import TarShardDataset
from mimkit.data.transforms import EvalTransform, MAEAugment, Normalize, default_normalization, denormalize

DATASETS = ("fashion_mnist", "folder", "shards")

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "BadImageError",
    "BadImageWarning",
    "CropDataset",
    "CropRecord",
    "EpochDataLoader",
    "EvalTransform",
    "FashionMNIST",
    "ImageDataset",
    "ImageFolderDataset",
    "MAEAugment",
    "Normalize",
    "TarShardDataset",
    "TensorBatchLoader",
    "build_dataset",
    "build_loader",
    "build_training_dataset",
    "default_normalization",
    "denormalize",
    "load_fashion_mnist",
    "load_image",
    "resolve_folder_split",
    "scan_image_folder",
    "training_transform",
]


def resolve_folder_split(root: str | Path, split: str) -> Path:
    """The folder holding one split of an image-folder data set.

    A root with a ``train/`` subfolder is split: ``train`` reads ``root/train`` and ``test`` reads
    ``root/test`` (or ``root/val`` when there is no ``test/``). Any other root is a single training set:
    ``train`` reads ``root`` itself and ``test`` is an error.

    Raises:
        FileNotFoundError: ``root`` is missing, or the test split is asked for and does not exist.
        ValueError: unknown split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not (root / "train").is_dir():
        if split == "train":
            return root
        raise FileNotFoundError(
            f"{root} has no test split: expected {root / 'train'} with {root / 'test'} or {root / 'val'} beside it"
        )
    if split == "train":
        return root / "train"
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root} has no test split: expected {root / 'test'} or {root / 'val'}")


def build_dataset(
    dataset: str,
    root: str | Path | None = None,
    split: str = "train",
    img_size: int | None = None,
    in_chans: int | None = None,
    *,
    in_memory: bool | None = None,
    limit: int | None = None,
    progress: bool | None = None,
    num_workers: int = 2,
    crop_ratio: float = 1.0,
) -> FashionMNIST | ImageFolderDataset | TarShardDataset:
    """A data set by name, as uint8 squares of side ``img_size`` (the evaluation view).

    Args:
        dataset: ``"fashion_mnist"``, ``"folder"`` or ``"shards"``.
        root: the data folder; Fashion-MNIST defaults to ``/usr/share/datasets/fashion-mnist``, folders
            need one (see :func:`resolve_folder_split` for the train/test layout), shards a folder, file,
            glob or brace range (see :mod:`mimkit.data.shards`).
        split: ``"train"`` or ``"test"``.
        img_size: stored image side; defaults to 28 for Fashion-MNIST (its native size), required for
            folders.
        in_chans: 1 or 3; defaults to 1 for Fashion-MNIST and 3 for folders.
        in_memory: folders and shards (Fashion-MNIST is always in memory); see :class:`ImageFolderDataset`.
        limit: keep at most this many images (the first ones for Fashion-MNIST, evenly spaced ones for
            folders).
        progress: decoding progress bar for folders (None: only on a terminal).
        num_workers: decoding threads for folders.
        crop_ratio: folders and shards: the shorter side is resized to ``img_size / crop_ratio`` before the
            central square is cut (MAE's evaluation: 0.875); Fashion-MNIST keeps its whole square.

    Returns:
        A :class:`FashionMNIST` or :class:`ImageFolderDataset` (both follow :class:`ImageDataset`).

    Raises:
        ValueError: unknown data set or split, or bad arguments.
        FileNotFoundError: missing data.
    """
    if dataset == "fashion_mnist":
        return FashionMNIST(
            root,
            split,
            img_size=28 if img_size is None else img_size,
            in_chans=1 if in_chans is None else in_chans,
            limit=limit,
        )
    if dataset == "folder":
        if root is None:
            raise ValueError("dataset 'folder' needs a root folder (set data.root)")
        if img_size is None:
            raise ValueError("dataset 'folder' needs img_size")
        return ImageFolderDataset(
            resolve_folder_split(root, split),
            img_size,
            in_chans=3 if in_chans is None else in_chans,
            in_memory=in_memory,
            limit=limit,
            progress=progress,
            num_workers=num_workers,
            crop_ratio=crop_ratio,
        )
    if dataset == "shards":
        if root is None:
            raise ValueError(
                "dataset 'shards' needs its shards (set data.root to a folder, file, glob or {a..b} range)"
            )
        if img_size is None:
            raise ValueError("dataset 'shards' needs img_size")
        return TarShardDataset(
            root,
            img_size,
            in_chans=3 if in_chans is None else in_chans,
            split=split,
            in_memory=in_memory,
            limit=limit,
            progress=progress,
            num_workers=num_workers,
            crop_ratio=crop_ratio,
        )
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def build_training_dataset(
    data: Any, img_size: int, in_chans: int, batch_size: int, world_size: int = 1, seed: int = 0
) -> FashionMNIST | CropDataset:
    """The training split a run's ``data`` section names, refused when it cannot fill one batch of
    ``batch_size`` on each of ``world_size`` ranks.

    Folders and shards give a :class:`~mimkit.data.crops.CropDataset`: random-resized crops of the original
    images (``data.crop_scale``, ``data.crop_ratio``, ``data.hflip``) drawn per ``(seed, epoch, index)``,
    streamed from the files or cut from the in-memory cache (``data.in_memory``, ``data.cache_size``).
    Fashion-MNIST stays a tensor of 28-pixel squares, augmented per batch by :class:`MAEAugment`.

    Raises:
        ValueError: too few images for one batch (with what to do), a cache over the memory budget, or bad
            arguments.
        FileNotFoundError: missing data.
    """
    dataset: FashionMNIST | CropDataset
    if data.dataset == "fashion_mnist":
        dataset = FashionMNIST(data.root, "train", img_size=img_size, in_chans=in_chans, limit=data.limit)
    else:
        base = build_dataset(
            data.dataset,
            root=data.root,
            split="train",
            img_size=img_size,
            in_chans=in_chans,
            in_memory=False,
            limit=data.limit,
            num_workers=data.num_workers,
        )
        assert isinstance(base, (ImageFolderDataset, TarShardDataset))
        dataset = CropDataset(
            base,
            img_size,
            in_chans,
            scale=data.crop_scale,
            ratio=data.crop_ratio,
            hflip=data.hflip,
            seed=seed,
            in_memory=data.in_memory,
            cache_size=data.cache_size,
            num_workers=data.num_workers,
        )
    if len(dataset) < batch_size * world_size:
        ranks = f" x {world_size} ranks" if world_size > 1 else ""
        raise ValueError(
            f"the data set has {len(dataset)} images, fewer than train.batch_size {batch_size}{ranks}; "
            "lower the batch size or add images"
        )
    return dataset


def training_transform(
    data: Any, img_size: int, dataset: Any, mean: tuple[float, ...], std: tuple[float, ...]
) -> MAEAugment | Normalize:
    """What the training loop applies to each uint8 batch: normalization alone for a
    :class:`~mimkit.data.crops.CropDataset` (its samples are crops already), else :class:`MAEAugment` with
    the ``data`` section's crop scale, ratio and flip."""
    if isinstance(dataset, CropDataset):
        return Normalize(mean=mean, std=std)
    return MAEAugment(img_size, scale=data.crop_scale, ratio=data.crop_ratio, hflip=data.hflip, mean=mean, std=std)
