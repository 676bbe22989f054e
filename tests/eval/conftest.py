"""Shared pieces of the evaluation tests: a tiny real ViT checkpoint and a labelled folder of real images.

They are fixtures because tests are imported in importlib mode, where test modules cannot import each other.
"""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.build import create_model
from mimkit.checkpoints.load import save_checkpoint_as
from mimkit.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

TINY = dict(img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro")


@pytest.fixture
def tiny_args() -> dict:
    """``create_model("vit_tiny", **tiny_args)``: a 2-block, 64-wide ViT on 32x32 gray images."""
    return dict(TINY)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained ViT (seed 0) saved in the mimkit layout."""
    if not DEFAULT_ROOT.is_dir():
        pytest.fail(f"Fashion-MNIST is missing at {DEFAULT_ROOT}: `apt-get install dataset-fashion-mnist`")
    torch.manual_seed(0)
    model = create_model("vit_tiny", **TINY)
    return save_checkpoint_as(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt", "mimkit")


def _write_split_folder(root: Path, test_classes: tuple[str, ...] = ("bag", "trouser")) -> Path:
    """Fashion-MNIST bags (label 8) and trousers (label 1) as train/<class>/ and test/<class>/ PNG files."""
    images, labels = load_fashion_mnist(split="test")
    names = {8: "bag", 1: "trouser", 7: "sneaker"}
    for split, rows in (("train", range(0, 400)), ("test", range(400, 600))):
        for index in rows:
            name = names.get(int(labels[index]))
            if (
                name is None
                or (split == "train" and name == "sneaker")
                or (split == "test" and name not in test_classes)
            ):
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index, 0].numpy(), "L").save(folder / f"{index}.png")
    return root


@pytest.fixture
def write_split_folder() -> Callable[..., Path]:
    """``write_split_folder(root, test_classes=("bag", "trouser"))``: a labelled train/ + test/ folder."""
    return _write_split_folder
