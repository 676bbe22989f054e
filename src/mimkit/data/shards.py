"""WebDataset-style tar shards read by random access, for data sets too many files to keep as a folder.

A shard is an uncompressed tar file; the members that share a key (the name up to the first dot of its
last path component, as in WebDataset) form one sample: one image (any of
:data:`~mimkit.data.folder.IMAGE_EXTENSIONS`) and optionally its class index as text in a ``.cls``
member. Other members (``.json``, ``.txt``, ...) are ignored. Shards are indexed once at construction
(tar headers only: one seek per member, no pixel decoded), after which every sample is a seek and a
read, so the epoch-seeded, rank-split batch order of :mod:`mimkit.data.loader` applies unchanged: each
rank and each loader worker reads exactly its own batches, no sample twice, and a resumed run reads the
batches the uninterrupted one would have.

``data.root`` names the shards: a folder of ``*.tar`` files (with ``train/`` and ``test/`` subfolders for
two splits, as for image folders), one ``.tar`` file, a glob (``/data/shard-*.tar``) or WebDataset's brace
range (``/data/shard-{000000..000127}.tar``).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from mimkit.data.folder import (
    DEFAULT_MEMORY_BUDGET,
    IMAGE_EXTENSIONS,
    BadImageError,
    check_crop_ratio,
    check_image_args,
    decode_in_memory,
    decode_or_next,
    load_image,
    report_skipped,
)

log = logging.getLogger(__name__)

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shard_pattern(pattern: str) -> list[str]:
    """Expand WebDataset brace ranges: ``a-{00..02}.tar`` -> ``a-00.tar, a-01.tar, a-02.tar`` (zero padding
    kept from the first bound; several ranges multiply)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    low, high = match.group(1), match.group(2)
    if int(high) < int(low):
        raise ValueError(f"shard range {match.group(0)} in {pattern!r} runs backwards")
    width = len(low)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        name
        for index in range(int(low), int(high) + 1)
        for name in expand_shard_pattern(f"{head}{index:0{width}d}{tail}")
    ]


def resolve_shards(root: str | Path, split: str = "train") -> list[Path]:
    """The shard files of one split (see the module docstring for the forms of ``root``).

    Raises:
        FileNotFoundError: nothing matches, a named shard is missing, or the split does not exist.
    """
    text = str(root)
    path = Path(text)
    if path.is_dir():
        for name in (split,) if split == "train" else (split, "val"):
            if (path / name).is_dir():
                path = path / name
                break
        else:
            if split != "train":
                raise FileNotFoundError(f"{root} has no {split} split: expected {path / split} or {path / 'val'}")
        found = sorted(path.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"no .tar shards in {path}")
        return found
    if split != "train":
        raise FileNotFoundError(
            f"a shard pattern or file ({root}) holds one split; for a test split, put shards in "
            f"{split}/ beside train/ under a common folder"
        )
    names = expand_shard_pattern(text)
    shards: list[Path] = []
    for name in names:
        matched = sorted(glob.glob(name)) if glob.has_magic(name) else ([name] if Path(name).is_file() else [])
        if not matched:
            raise FileNotFoundError(f"shard {name} does not exist" if name != text else f"no shard matches {root}")
        shards += [Path(item) for item in matched]
    return shards


@dataclass(frozen=True)
class ShardMember:
    """Where one image's bytes lie: shard index, byte offset and size, and its name for messages."""

    shard: int
    offset: int
    size: int
    name: str


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): the extension starts at the first dot of the last path component."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (extension.lower() if dot else "")


def index_shard(path: Path, shard: int) -> tuple[list[tuple[str, ShardMember]], dict[str, int], list[str]]:
    """Scan one shard's headers.

    Returns:
        images: (key, member) of each sample's image, in tar order.
        labels: key -> class index from ``.cls`` members.
        problems: what was wrong (truncated shard, unreadable ``.cls``), for the report.

    Raises:
        ValueError: the file is not an uncompressed tar (compressed shards cannot be read by seeking).
    """
    images: list[tuple[str, ShardMember]] = []
    labels: dict[str, int] = {}
    problems: list[str] = []
    size = path.stat().st_size
    try:
        archive = tarfile.open(path, mode="r:")  # noqa: SIM115  # closed by the with below
    except tarfile.ReadError as error:
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zX":
            raise ValueError(
                f"shard {path} is compressed; samples are read by seeking, which needs uncompressed .tar shards "
                "(WebDataset's default): repack it with `tar -cf` or decompress it with gunzip"
            ) from None
        raise ValueError(f"shard {path} is not a tar file ({error})") from None
    last_key = None
    truncated = False
    with archive:
        try:
            for info in archive:
                if not info.isfile():
                    continue
                key, extension = _split_key(info.name)
                if info.offset_data + info.size > size:
                    problems.append(f"{path}: member {info.name} is cut off (truncated shard)")
                    truncated = True
                    break
                last_key = key
                if f".{extension}" in IMAGE_EXTENSIONS:
                    images.append((key, ShardMember(shard, info.offset_data, info.size, f"{path}/{info.name}")))
                elif extension == "cls":
                    content = archive.extractfile(info)
                    text = content.read(64).decode("utf-8", "replace").strip() if content else ""
                    if text.isdigit():
                        labels[key] = int(text)
                    else:
                        problems.append(f"{path}: {info.name} holds {text[:20]!r}, not a class index")
        except (tarfile.ReadError, EOFError, OSError) as error:
            problems.append(f"{path}: unreadable after {len(images)} images ({error}); the shard is truncated")
            truncated = True
        if not truncated:  # a whole tar ends with zero blocks; a copy cut at a member boundary does not
            with path.open("rb") as handle:
                handle.seek(archive.offset)
                end = handle.read(512)
            if len(end) < 512 or any(end):
                problems.append(f"{path}: no end-of-archive marker after {len(images)} images; the shard is truncated")
                truncated = True
    if truncated and last_key is not None:  # the last sample may be missing members (e.g. its .cls)
        images = [(key, member) for key, member in images if key != last_key]
        labels.pop(last_key, None)
    return images, labels, problems


def _read(handles: dict[int, BinaryIO], shards: list[Path], member: ShardMember) -> bytes:
    handle = handles.get(member.shard)
    if handle is None:
        handle = handles[member.shard] = shards[member.shard].open("rb")
    handle.seek(member.offset)
    return handle.read(member.size)


class TarShardDataset(torch.utils.data.Dataset):
    """Images in tar shards as uint8 squares, decoded once into memory or on the fly.

    Follows :class:`~mimkit.data.loader.ImageDataset` like :class:`~mimkit.data.folder.ImageFolderDataset`
    and with the same conventions: :func:`~mimkit.data.folder.load_image` decoding and resizing, bad images
    skipped and reported (in memory) or replaced by the next decodable one (on the fly), labels when every
    image has a ``.cls`` (class names are the indices as text), else unlabelled.

    Args:
        root: the shards (see the module docstring).
        img_size: side of the stored squares.
        in_chans: 1 (luminance) or 3 (RGB).
        split: ``"train"`` or ``"test"``.
        in_memory: hold all decoded images in memory; ``None`` chooses True when they fit in ``memory_budget``.
        limit: keep at most this many samples, evenly spaced.
        progress: tqdm bar while decoding (None: only on a terminal).
        num_workers: decoding threads at construction.
        memory_budget: bytes for the ``in_memory=None`` decision.
        crop_ratio: the evaluation view's crop ratio (see :class:`~mimkit.data.folder.ImageFolderDataset`).

    Attributes:
        shards: the shard files; ``members``: where each kept image lies; ``images``, ``labels``,
        ``classes``, ``skipped`` as for image folders; ``problems``: shard-level defects found while indexing.

    Raises:
        FileNotFoundError: no shards. ValueError: compressed shards, or no image at all.
    """

    def __init__(
        self,
        root: str | Path,
        img_size: int,
        in_chans: int = 3,
        split: str = "train",
        in_memory: bool | None = None,
        *,
        limit: int | None = None,
        progress: bool | None = None,
        num_workers: int = 2,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        crop_ratio: float = 1.0,
    ) -> None:
        check_image_args(in_chans, img_size, limit)
        check_crop_ratio(crop_ratio)
        self.crop_ratio = crop_ratio
        self.root = str(root)
        self.img_size, self.in_chans = img_size, in_chans
        self.shards = resolve_shards(root, split)
        members: list[tuple[str, ShardMember]] = []
        labels: dict[str, int] = {}
        self.problems: list[str] = []
        for shard, path in enumerate(self.shards):
            found, found_labels, problems = index_shard(path, shard)
            members += found
            labels.update(found_labels)
            self.problems += problems
        for problem in self.problems:
            log.warning(problem)
        if not members:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the {len(self.shards)} shard(s) of {root}")
        if limit is not None and limit < len(members):
            members = [members[index * len(members) // limit] for index in range(limit)]
        labelled = all(key in labels for key, _ in members)
        if labels and not labelled:
            missing = sum(key not in labels for key, _ in members)
            log.warning("%d of %d images in %s have no .cls; treating all as unlabelled", missing, len(members), root)
        self._handles: dict[int, BinaryIO] = {}
        self._pid = os.getpid()
        self.in_memory = len(members) * in_chans * img_size**2 <= memory_budget if in_memory is None else in_memory
        self.skipped: list[tuple[Path, str]] = []
        self.images: Tensor | None = None
        keep = np.ones(len(members), dtype=bool)
        if self.in_memory:
            show = sys.stderr.isatty() if progress is None else progress
            decode: Callable[[ShardMember], np.ndarray] = partial(self._decode_member, handles=None)
            self.images, keep, self.skipped = decode_in_memory(
                decode,
                [m for _, m in members],
                (in_chans, img_size, img_size),
                num_workers=num_workers,
                progress=show,
                desc="decode shards",
            )
            if self.skipped:
                report_skipped(self.skipped, Path(self.root), len(members))
        kept = [pair for pair, ok in zip(members, keep, strict=True) if ok]
        if not kept:
            raise ValueError(f"none of the {len(members)} images in the shards of {root} could be read")
        self.members = [member for _, member in kept]
        self.labels: Tensor | None = None
        self.classes: list[str] = []
        if labels and labelled:
            values = [labels[key] for key, _ in kept]
            self.labels = torch.tensor(values, dtype=torch.int64)
            self.classes = [str(index) for index in range(max(labels.values()) + 1)]
        self._failed: set[int] = set()

    @property
    def num_skipped(self) -> int:
        """Number of images left out because they could not be read."""
        return len(self.skipped)

    def _decode_member(self, member: ShardMember, handles: dict[int, BinaryIO] | None) -> np.ndarray:
        """One image's pixels; ``handles=None`` opens the shard for this read only (thread-safe)."""
        try:
            if handles is None:
                with self.shards[member.shard].open("rb") as handle:
                    handle.seek(member.offset)
                    data = handle.read(member.size)
            else:
                data = _read(handles, self.shards, member)
        except OSError as error:
            raise BadImageError(member.name, f"{type(error).__name__}: {error}") from error
        return load_image(member.name, self.in_chans, self.img_size, data=data, crop_ratio=self.crop_ratio)

    def __len__(self) -> int:
        return len(self.members)

    def name(self, index: int) -> str:
        """Image ``index``'s shard member, as ``shard/member``."""
        return self.members[index].name

    def source(self, index: int, private: bool = False) -> tuple[str, bytes]:
        """(name, bytes) of image ``index``, for :class:`~mimkit.data.crops.CropDataset`; ``private`` opens
        the shard for this read only (safe from several threads).

        Raises:
            BadImageError: the shard cannot be read.
        """
        if os.getpid() != self._pid:  # a forked loader worker: open its own file handles
            self._handles, self._pid = {}, os.getpid()
        member = self.members[index]
        try:
            if not private:
                return member.name, _read(self._handles, self.shards, member)
            with self.shards[member.shard].open("rb") as handle:
                handle.seek(member.offset)
                return member.name, handle.read(member.size)
        except OSError as error:
            raise BadImageError(member.name, f"{type(error).__name__}: {error}") from error

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The (C, S, S) uint8 image and its label (-1 when unlabelled)."""
        label = lambda i: -1 if self.labels is None else int(self.labels[i])  # noqa: E731
        if self.images is not None:
            return self.images[index], label(index)
        if os.getpid() != self._pid:  # a forked loader worker: open its own file handles
            self._handles, self._pid = {}, os.getpid()
        candidate, pixels = decode_or_next(
            index,
            len(self.members),
            self._failed,
            lambda i: self._decode_member(self.members[i], self._handles),
            f"in the shards of {self.root}",
        )
        return torch.from_numpy(pixels), label(candidate)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross process boundaries
        return state

    def __del__(self) -> None:
        for handle in getattr(self, "_handles", {}).values():
            handle.close()

    def __repr__(self) -> str:
        return (
            f"TarShardDataset(root={self.root!r}, shards={len(self.shards)}, n={len(self)}, img_size={self.img_size}, "
            f"in_chans={self.in_chans}, classes={len(self.classes)}, in_memory={self.in_memory})"
        )
