"""What every evaluation protocol starts from: labelled train/test splits and the encoder to measure.

Data is ``"fashion_mnist"`` or a folder holding ``train/`` and ``test/`` (or ``val/``), each with one
subfolder of images per class, the same classes in both; the encoder comes from any checkpoint layout
:func:`~mimkit.build.load_checkpoint` reads, or is the same architecture untrained (a baseline).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SPLITS = ("train", "test")


def data_source(data: str | Path) -> tuple[str, Path | None]:
    """(``"fashion_mnist"`` or ``"folder"``, the folder) of a ``data`` argument.

    Raises:
        FileNotFoundError: ``data`` is neither ``"fashion_mnist"`` nor an existing folder.
    """
    if str(data) == "fashion_mnist":
        return "fashion_mnist", None
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data {str(data)!r} is neither 'fashion_mnist' nor an existing folder")
    return "folder", folder.resolve()


def folder_listing(folder: Path, split: str) -> tuple[list[str], list[str]]:
    """(relative file paths, classes) of a labelled split, checked to be one subfolder per class."""
    from mimkit.data import resolve_folder_split
    from mimkit.data.folder import scan_image_folder

    if not (folder / "train").is_dir():
        raise FileNotFoundError(
            f"{folder} has no train/ subfolder; labelled evaluation needs {folder / 'train'} and "
            f"{folder / 'test'}, each with one subfolder of images per class"
        )
    root = resolve_folder_split(folder, split)
    try:
        paths, labels, classes = scan_image_folder(root)
    except NotADirectoryError as err:
        raise FileNotFoundError(str(err)) from None
    if labels is None:
        raise ValueError(f"evaluation needs labelled images: put the images of {root} in one subfolder per class")
    return [str(p.relative_to(root)) for p in paths], classes


def check_labelled_folder(folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Both splits' listings (see :func:`folder_listing`), checked to have the same classes.

    Runs before any encoder pass, so a layout mistake costs nothing.

    Raises:
        FileNotFoundError: a split is missing.
        ValueError: unlabelled images, or train and test classes differ.
    """
    listings = {split: folder_listing(folder, split) for split in SPLITS}
    (_, train_classes), (_, test_classes) = listings["train"], listings["test"]
    if train_classes != test_classes:
        raise ValueError(
            f"the class subfolders of the test split {test_classes} differ from those of the train split "
            f"{train_classes} in {folder}; give both splits the same classes"
        )
    return listings


def listing_digest(listing: tuple[list[str], list[str]]) -> str:
    """SHA-256 of a split's classes and file names (part of a feature-cache key)."""
    files, classes = listing
    return hashlib.sha256("\n".join([*classes, "", *files]).encode()).hexdigest()


@dataclass
class LabelledSplit:
    """One split in memory.

    Attributes:
        images: (N, C, S, S) uint8, S = the encoder's ``img_size``.
        labels: (N,) int64 in [0, len(classes)).
        classes: class names, in label order.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]


def load_labelled_split(
    dataset: str,
    folder: Path | None,
    split: str,
    *,
    img_size: int,
    in_chans: int,
    limit: int | None = None,
    progress: bool = True,
    crop_ratio: float = 1.0,
) -> LabelledSplit:
    """A labelled split held in memory as uint8 (Fashion-MNIST or a folder with class subfolders).

    Args:
        dataset, folder: from :func:`data_source`.
        split: ``"train"`` or ``"test"``.
        img_size: stored image side.
        in_chans: 1 or 3.
        limit: keep only this many images (the first ones of Fashion-MNIST, evenly spaced files of a
            folder, so every class keeps its share).
        progress: decoding progress bar for folders.
        crop_ratio: folders: MAE's evaluation view, the shorter side resized to ``img_size / crop_ratio``
            then the central square (:attr:`EvalModel.eval_crop_ratio`); Fashion-MNIST keeps its square.

    Raises:
        ValueError: unlabelled data or a non-positive limit.
        FileNotFoundError: missing data.
    """
    from mimkit.data import build_dataset

    if limit is not None and limit <= 0:
        raise ValueError(f"{split}_limit must be positive, got {limit}")
    data = build_dataset(
        dataset,
        root=folder,
        split=split,
        img_size=img_size,
        in_chans=in_chans,
        in_memory=True,
        limit=limit,
        progress=progress,
        crop_ratio=crop_ratio,
    )
    if data.images is None or data.labels is None:
        raise ValueError(f"the {split} split of {folder or dataset} has no labelled images in memory")
    return LabelledSplit(
        images=data.images,
        labels=torch.as_tensor(data.labels).long(),
        classes=[str(name) for name in data.classes],
    )


def load_training_crops(
    folder: Path,
    *,
    img_size: int,
    in_chans: int,
    scale: tuple[float, float],
    hflip: bool,
    seed: int,
    limit: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
) -> Any:
    """The train split of a labelled folder as training sees it: a random-resized crop of each original
    image per epoch, drawn from ``(seed, epoch, index)`` as in pretraining
    (:class:`~mimkit.data.crops.CropDataset`), cut from the aspect-ratio cache when it fits in memory.

    Args:
        folder: from :func:`data_source`.
        img_size: crop side; in_chans: 1 or 3.
        scale: crop area fraction range; hflip: mirror half the crops.
        seed: base seed of the per-sample crops.
        limit: keep only this many images (evenly spaced files, as :func:`load_labelled_split`).
        num_workers: decoding threads for the cache.
        progress: decoding progress bar.

    Returns:
        A :class:`~mimkit.data.crops.CropDataset` with ``labels`` and ``classes``.

    Raises:
        ValueError: unlabelled images or a non-positive limit.
        FileNotFoundError: missing data.
    """
    from mimkit.data import CropDataset, ImageFolderDataset, resolve_folder_split

    if limit is not None and limit <= 0:
        raise ValueError(f"train_limit must be positive, got {limit}")
    root = resolve_folder_split(folder, "train")
    base = ImageFolderDataset(
        root, img_size, in_chans, in_memory=False, limit=limit, progress=progress, num_workers=num_workers
    )
    if base.labels is None:
        raise ValueError(f"the train split of {folder} has no labelled images")
    return CropDataset(
        base, img_size, in_chans, scale=scale, hflip=hflip, seed=seed, num_workers=num_workers, progress=progress
    )


@dataclass
class EvalModel:
    """The encoder an evaluation measures, with what it needs to see images as in pretraining.

    Attributes:
        encoder: the pretraining run's encoder module (or the same architecture untrained).
        config: the model's ``create_model`` arguments (``name``, ``img_size``, ...).
        mean, std: per-channel normalization the encoder was trained with.
        img_size, in_chans: its input.
        eval_crop_ratio: the pretraining run's ``data.eval_crop_ratio`` (MAE's 0.875 when the checkpoint has no
            run config) for folders of photos; 1.0 for Fashion-MNIST, whose pictures fill the frame.
    """

    encoder: nn.Module
    config: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    in_chans: int
    eval_crop_ratio: float = 1.0


def untrained_model(config: dict[str, Any], seed: int) -> Any:
    """A freshly initialised model of the same architecture, seeded (without touching the global RNG)."""
    from mimkit.build import create_model

    args = dict(config)
    name = args.pop("name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **args)


def load_eval_model(checkpoint: str | Path, *, random_init: bool = False, seed: int = 0, dataset: str) -> EvalModel:
    """The encoder of a checkpoint in any layout, or its architecture untrained with ``random_init``.

    Normalization comes from the pretraining run's config when the checkpoint has one, else from the
    data set's defaults (:func:`~mimkit.data.transforms.default_normalization`).

    Raises:
        CheckpointError: unreadable checkpoint.
    """
    from mimkit.build import load_checkpoint
    from mimkit.data.folder import DEFAULT_EVAL_CROP_RATIO
    from mimkit.data.transforms import default_normalization

    model = load_checkpoint(checkpoint)
    config = dict(model.config)
    run_config = model.run_config
    in_chans, img_size = int(config["in_chans"]), int(config["img_size"])
    crop_ratio = DEFAULT_EVAL_CROP_RATIO
    if run_config is not None:
        mean, std = run_config.normalization()
        crop_ratio = run_config.data.eval_crop_ratio
    else:
        mean, std = default_normalization(in_chans, dataset)
    if random_init:
        model = untrained_model(config, seed)
    return EvalModel(
        encoder=model.encoder,
        config=config,
        mean=tuple(mean),
        std=tuple(std),
        img_size=img_size,
        in_chans=in_chans,
        eval_crop_ratio=1.0 if dataset == "fashion_mnist" else crop_ratio,
    )
