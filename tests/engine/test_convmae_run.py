"""ConvMAE through the recipe, the training loop, resume and the reconstruction picture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkit.config import ConfigError, load_config
from mimkit.engine.pretrain import Pretrainer
from mimkit.engine.run import run_pretraining
from mimkit.models import load_checkpoint
from mimkit.models.convvit import ConvViT

RECIPE = Path(__file__).parents[2] / "configs" / "convmae_tiny_fmnist.yaml"
SMALL = ["data.limit=64", "train.batch_size=16", "train.progress=false", "log.tensorboard=false", "eval.knn=false"]


def test_recipe_pretrains_resumes_and_draws(tmp_path: Path) -> None:
    overrides = [*SMALL, "train.epochs=2", f"train.output_dir={tmp_path / 'full'}"]
    full = Pretrainer(load_config(RECIPE, overrides))
    assert isinstance(full.model.encoder, ConvViT) and full.model.grid == (8, 8)
    full.fit()
    split = [*SMALL, "train.epochs=2", f"train.output_dir={tmp_path / 'split'}"]
    Pretrainer(load_config(RECIPE, [*split, "train.max_steps=3"])).fit()
    resumed = Pretrainer(load_config(RECIPE, split), resume=True)
    resumed.fit()
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    summary = run_pretraining(load_config(RECIPE, [*SMALL, "train.max_steps=2", f"train.output_dir={tmp_path / 'r'}"]))
    assert Path(summary["reconstruction"]).stat().st_size > 1000
    model = load_checkpoint(tmp_path / "r" / "last.pt")
    assert model.config["patch_sizes"] == (1, 2, 2) and model.run_config.model.name == "convmae_tiny"


def test_conv_and_vit_keys_are_not_mixed() -> None:
    with pytest.raises(ConfigError, match="model.embed_dim: not for convmae_tiny"):
        load_config(RECIPE, ["model.embed_dim=64"])
    with pytest.raises(ConfigError, match="model.patch_sizes: not for vit_tiny"):
        load_config(None, ["model.patch_sizes=[1,2,2]"])
    with pytest.raises(ConfigError, match="model.patch_sizes: ConvMAE has 3 stages"):
        load_config(RECIPE, ["model.patch_sizes=[2,2]"])
    with pytest.raises(ConfigError, match="model.img_size"):
        load_config(RECIPE, ["model.patch_sizes=[2,2,4]", "model.img_size=24"])  # stride 16 does not divide 24


def test_info_refuses_convmae_with_a_clear_message(capsys) -> None:
    from mimkit.cli import main

    assert main(["info", "--config", str(RECIPE)]) == 2
    assert "ConvMAE is not counted yet" in capsys.readouterr().err
