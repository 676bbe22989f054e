"""Shared pieces of the engine tests: a small real recipe on Fashion-MNIST and a weight snapshot.

They are fixtures because tests are imported in importlib mode, where test modules cannot import each other.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from mimkit.config import Config, load_config
from mimkit.engine.pretrain import Pretrainer

SMALL = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.decoder=micro",
    "model.img_size=16",
    "data.limit=64",
    "train.batch_size=16",
    "train.progress=false",
    "log.tensorboard=false",
    "log.every_steps=2",
    "eval.reconstruct=false",
    "eval.knn=false",
    "optim.blr=1e-3",
    "optim.warmup_epochs=1",
]


@pytest.fixture
def small_config() -> Callable[..., Config]:
    """``small_config(output_dir, *overrides)``: a tiny ViT on 64 Fashion-MNIST images, 4 steps per epoch."""

    def build(output_dir: Path, *extra: str) -> Config:
        return load_config(None, [*SMALL, f"train.output_dir={output_dir}", *extra])

    return build


@pytest.fixture
def weights() -> Callable[[Pretrainer], dict[str, torch.Tensor]]:
    """``weights(trainer)``: a detached copy of the model's state dict."""

    def snapshot(trainer: Pretrainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    return snapshot


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The in-process reference run uses one thread, like the subprocesses, so results are bit-identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_recipe() -> Callable[[Path, Config], Path]:
    """``write_recipe(path, config)``: ``config`` as the YAML recipe a ``mimkit pretrain`` subprocess reads."""

    def write(path: Path, config: Config) -> Path:
        path.write_text(yaml.safe_dump(config.to_dict()))
        return path

    return write
