"""Teachers' features kept on disk, keyed by the content of each image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class FeatureCache:
    """A teacher's per-patch features on disk, keyed by the exact content of each image.

    For small data sets trained without augmentation (``data.crop_scale=[1,1] data.crop_ratio=[1,1]
    data.hflip=false``) every epoch shows the teacher the same images, so after the first epoch the
    teacher never runs again; with augmentation every crop is new and the cache only costs disk. Each
    image's features ``(L, D)`` go to ``<directory>/<sha1[:2]>/<sha1>.pt`` (written atomically) and stay
    in memory once read. ``meta.json`` records what the features are (teacher, options, grid,
    normalization); a directory made for another teacher is refused rather than silently reused.

    Args:
        directory: where the features live (created when missing).
        identity: what the features depend on, as plain JSON values.

    Attributes:
        hits, misses: images served from the cache and computed, since construction.
    """

    def __init__(self, directory: str | Path, identity: dict[str, Any]) -> None:
        from mimkit.files import atomic_write

        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "meta.json"
        identity = json.loads(json.dumps(identity))  # tuples -> lists, as read back
        if meta.is_file():
            stored = json.loads(meta.read_text())
            if stored != identity:
                raise ValueError(
                    f"teacher feature cache {self.directory} holds features of {stored}, not {identity}; "
                    "use another directory (or delete this one)"
                )
        else:
            atomic_write(meta, lambda handle: handle.write(json.dumps(identity, indent=2).encode()))
        self.memory: dict[str, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, images: Tensor, compute: Any) -> Tensor:
        """Features of ``images`` (B, C, H, W): cached ones read, the others ``compute(images[missing])``
        (-> (M, L, D)) and stored. Returns (B, L, D) on the images' device."""
        import hashlib

        from mimkit.files import atomic_write

        pixels = images.detach().float().contiguous().cpu()  # (B, C, H, W)
        keys = [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in pixels]
        found: dict[int, Tensor] = {}
        for index, key in enumerate(keys):
            if key not in self.memory and self._path(key).is_file():
                self.memory[key] = torch.load(self._path(key), map_location="cpu", weights_only=True)
            if key in self.memory:
                found[index] = self.memory[key]
        missing = [index for index in range(len(keys)) if index not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            computed = compute(images[missing]).detach().float().cpu()  # (M, L, D)
            for index, features in zip(missing, computed, strict=True):
                key = keys[index]
                features = features.clone()  # its own storage, not a view of the batch
                atomic_write(self._path(key), lambda handle, value=features: torch.save(value, handle))
                self.memory[key] = features
                found[index] = features
        return torch.stack([found[index] for index in range(len(keys))]).to(images.device)  # (B, L, D)
