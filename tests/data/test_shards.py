"""Tar shards of real Fashion-MNIST PNGs: same pixels as the source, split across ranks and workers without
duplicates, damaged shards reported, and a pretraining run that reads them."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import load_config
from mimkit.data import build_dataset, build_loader
from mimkit.data.fashion_mnist import load_fashion_mnist
from mimkit.data.shards import TarShardDataset, expand_shard_pattern, resolve_shards
from mimkit.engine.pretrain import Pretrainer

NUM, PER_SHARD = 96, 40  # three shards: 40 + 40 + 16 samples


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def source() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(split="test")  # (N, 1, 28, 28) uint8, (N,)
    return images[:NUM, 0], labels[:NUM]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, source) -> Path:
    """WebDataset layout: ``shard-000000.tar`` ... with ``{key}.png``, ``{key}.cls`` and a ``.json`` to ignore."""
    images, labels = source
    root = tmp_path_factory.mktemp("shards")
    for shard, start in enumerate(range(0, NUM, PER_SHARD)):
        with tarfile.open(root / f"shard-{shard:06d}.tar", "w") as archive:
            for index in range(start, min(start + PER_SHARD, NUM)):
                key = f"sample{index:05d}"
                add(archive, f"{key}.png", png_bytes(images[index].numpy()))
                add(archive, f"{key}.cls", str(int(labels[index])).encode())
                add(archive, f"{key}.json", b'{"source": "fashion-mnist"}')
    return root


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("in_memory", [True, False])
def test_shards_give_the_source_pixels_and_labels(shard_dir: Path, source, in_memory: bool) -> None:
    images, labels = source
    data = TarShardDataset(shard_dir, 28, in_chans=1, in_memory=in_memory, num_workers=2)
    assert len(data) == NUM and len(data.shards) == 3 and data.in_memory == in_memory
    assert data.classes == [str(k) for k in range(10)] and torch.equal(data.labels, labels)
    for index in (0, 39, 40, 95):
        image, label = data[index]
        assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
        assert torch.equal(image[0], images[index]) and label == int(labels[index])


def test_patterns_globs_and_splits(shard_dir: Path) -> None:
    assert expand_shard_pattern("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    by_range = resolve_shards(f"{shard_dir}/shard-{{000000..000002}}.tar")
    assert by_range == resolve_shards(f"{shard_dir}/shard-*.tar") == resolve_shards(shard_dir)
    assert len(TarShardDataset(shard_dir / "shard-000001.tar", 28, in_chans=1)) == PER_SHARD
    with pytest.raises(FileNotFoundError, match=r"shard .*shard-000003\.tar does not exist"):
        resolve_shards(f"{shard_dir}/shard-{{000000..000003}}.tar")
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        resolve_shards(f"{shard_dir}/other-*.tar")
    with pytest.raises(FileNotFoundError, match="has no test split"):
        resolve_shards(shard_dir, "test")
    data = build_dataset("shards", root=shard_dir, img_size=16, in_chans=3, limit=10)
    assert len(data) == 10 and data.images is not None and data.images.shape == (10, 3, 16, 16)


@pytest.mark.parametrize("in_memory", [True, False])
def test_ranks_and_workers_read_every_sample_once(shard_dir: Path, in_memory: bool) -> None:
    data = TarShardDataset(shard_dir, 28, in_chans=1, in_memory=in_memory)
    everything = [fingerprint(data[index][0]) for index in range(len(data))]
    assert len(set(everything)) == NUM  # every source image is distinct, so fingerprints name samples
    for epoch in (0, 1):
        seen: list[list[str]] = []
        for rank in (0, 1):
            loader = build_loader(data, 8, seed=3, drop_last=True, num_workers=2, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            seen.append([fingerprint(image) for batch, _ in loader for image in batch])
        assert len(seen[0]) == len(seen[1]) == NUM // 2
        assert not set(seen[0]) & set(seen[1])  # no sample on both ranks
        assert sorted(seen[0] + seen[1]) == sorted(everything)  # none twice, none missing


def test_damaged_shards_are_reported_and_what_is_whole_is_used(tmp_path: Path, source) -> None:
    images, labels = source
    root = tmp_path / "damaged"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as archive:
        for index in range(6):
            data = png_bytes(images[index].numpy())
            add(archive, f"k{index}.png", data[: len(data) // 2] if index == 2 else data)  # k2 is truncated
            add(archive, f"k{index}.cls", str(int(labels[index])).encode())
    with tarfile.open(root / "b.tar", "w") as archive:
        for index in range(10, 16):
            add(archive, f"k{index}.png", png_bytes(images[index].numpy()))
            add(archive, f"k{index}.cls", str(int(labels[index])).encode())
    whole = (root / "b.tar").read_bytes()
    (root / "b.tar").write_bytes(whole[: len(whole) // 2])  # a shard cut in the middle (a copy that died)
    with pytest.warns(UserWarning, match=r"skipped unreadable image .*k2\.png"):
        data = TarShardDataset(root, 28, in_chans=1)
    assert data.num_skipped == 1 and any("truncated" in problem for problem in data.problems)
    assert 5 < len(data) < 11  # 5 good images of a.tar and the complete members of b.tar
    assert torch.equal(data[5][0][0], images[10])  # b.tar's first image, after a.tar's five good ones
    lazy = TarShardDataset(root, 28, in_chans=1, in_memory=False)
    image, label = lazy[2]  # the truncated image is replaced by the next decodable one
    assert torch.equal(image[0], images[3]) and label == int(labels[3])

    (root / "c.tar").write_bytes(gzip.compress(whole))  # compressed content under a .tar name
    with pytest.raises(ValueError, match=r"is compressed; .*uncompressed \.tar shards"):
        TarShardDataset(root / "c.tar", 28)
    (root / "d.tar").write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(ValueError, match="is not a tar file"):
        TarShardDataset(root / "d.tar", 28)


def test_pretraining_reads_shards_through_loader_workers(tmp_path: Path, shard_dir: Path) -> None:
    config = load_config(
        None,
        [
            "data.dataset=shards",
            f"data.root={shard_dir}/shard-{{000000..000002}}.tar",
            "data.in_memory=false",
            "data.num_workers=2",
            "model.img_size=16",
            "model.in_chans=1",
            "model.embed_dim=32",
            "model.depth=2",
            "model.num_heads=2",
            "model.decoder=micro",
            "train.batch_size=16",
            "train.max_steps=3",
            f"train.output_dir={tmp_path / 'run'}",
            "train.progress=false",
            "log.tensorboard=false",
            "eval.reconstruct=false",
        ],
    )
    result = Pretrainer(config).fit()
    assert result.steps == 3 and np.isfinite(result.final_loss)
