"""Shared pieces of the detection tests: a small shapes set and a tiny detection recipe.

They are fixtures because tests are imported in importlib mode, where test modules cannot import each other.
"""

from pathlib import Path

import pytest
import torch

from mimkit.dense.data.shapes import generate_shapes
from mimkit.tasks.detect import DetectConfig

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """Eight 32x32 shapes images (seed 3) as a COCO folder."""
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "set", 8, size=32, max_objects=2, seed=3)


@pytest.fixture
def tiny_config() -> DetectConfig:
    """A randomly initialized 2-block, 64-wide ViT/8 on 32x32 RGB images with narrow heads (MIMDet)."""
    config = DetectConfig()
    e = config.encoder
    e.name, e.img_size, e.patch_size, e.in_chans = "vit_tiny", 32, 8, 3
    e.depth, e.embed_dim, e.num_heads, e.decoder = 2, 64, 2, "micro"
    m = config.model
    m.fpn_channels, m.box_head_dim = 32, 128  # the ConvStem's widths follow the encoder: 16, 32, 64
    t = config.train
    t.batch_size, t.warmup_steps, t.tensorboard, t.progress, t.layer_decay = 4, 10, False, False, 1.0
    config.data.hflip = False
    return config
