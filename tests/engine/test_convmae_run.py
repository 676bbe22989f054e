"""ConvMAE through the recipe, the training loop, resume and the reconstruction picture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mimkit.build import load_checkpoint
from mimkit.config import ConfigError, load_config
from mimkit.engine.pretrain import Pretrainer
from mimkit.models.convvit import ConvViT
from mimkit.tasks.pretrain import run_pretraining

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
    with pytest.raises(ConfigError, match=r"model\.embed_dim: not for convmae_tiny"):
        load_config(RECIPE, ["model.embed_dim=64"])
    with pytest.raises(ConfigError, match=r"model\.patch_sizes: not for vit_tiny"):
        load_config(None, ["model.patch_sizes=[1,2,2]"])
    with pytest.raises(ConfigError, match=r"model\.patch_sizes: ConvMAE has 3 stages"):
        load_config(RECIPE, ["model.patch_sizes=[2,2]"])
    with pytest.raises(ConfigError, match=r"model\.img_size"):
        load_config(RECIPE, ["model.patch_sizes=[2,2,4]", "model.img_size=24"])  # stride 16 does not divide 24
    # the fine-grained masker hides parts of patches: ConvMAE only, scored pixel by pixel
    assert load_config(RECIPE, ["mask.type=fine_random"]).mask.type == "fine_random"
    with pytest.raises(ConfigError, match=r"mask\.type: fine_random masks ConvMAE's stage-1 grid"):
        load_config(None, ["mask.type=fine_random"])
    with pytest.raises(ConfigError, match=r"target\.loss: fine_random scores single pixels"):
        load_config(RECIPE, ["mask.type=fine_random", "target.loss=cosine"])
    with pytest.raises(ConfigError, match=r"mask\.ratio"):
        load_config(RECIPE, ["mask.type=fine_random", "mask.ratio=0.98"])


@pytest.fixture(scope="module")
def convmae_checkpoint(tmp_path_factory) -> Path:
    """A ConvMAE checkpoint from two steps of the recipe."""
    out = tmp_path_factory.mktemp("convmae")
    Pretrainer(
        load_config(RECIPE, [*SMALL, "train.max_steps=2", "eval.reconstruct=false", f"train.output_dir={out}"])
    ).fit()
    return out / "last.pt"


def test_every_command_takes_a_convmae_checkpoint(convmae_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from mimkit.cli import main
    from mimkit.data.fashion_mnist import load_fashion_mnist

    images = tmp_path / "images"
    images.mkdir()
    for index, pixels in enumerate(load_fashion_mnist(split="test")[0][:4]):
        Image.fromarray(pixels[0].numpy()).save(images / f"{index}.png")
    checkpoint, out = str(convmae_checkpoint), tmp_path / "out"

    assert main(["info", "--config", str(RECIPE)]) == 0
    assert "16 visible at mask ratio 0.75" in capsys.readouterr().out
    assert main(["reconstruct", "--checkpoint", checkpoint, "--images", str(images), "--out", str(out / "r.png")]) == 0
    assert (out / "r.png").stat().st_size > 1000
    for setting in ("practical", "ideal"):
        argv = ["analyze", "--checkpoint", checkpoint, "--images", str(images), "--out", str(out / setting)]
        assert main([*argv, "--setting", setting]) == 0
        layers = [layer["layer"] for layer in json.loads((out / setting / "relations.json").read_text())["layers"]]
        assert layers[:4] == ["encoder.0", "encoder.1", "encoder.2", "encoder.3"]  # the transformer stage
        assert len(layers) == (8 if setting == "practical" else 4)  # + the tiny decoder's 4 blocks
    probe = ["probe", "--checkpoint", checkpoint, "--protocol", "knn", "--train-limit", "200", "--test-limit", "50"]
    assert main([*probe, "--out", str(out / "probe"), "--no-progress"]) == 0
    assert json.loads((out / "probe" / "knn" / "pretrained" / "results.json").read_text())["pools"] == ["avg"]
    tune = ["finetune", "--checkpoint", checkpoint, "--out", str(out / "ft"), "--no-progress", "--partial-blocks", "1"]
    assert main([*tune, "epochs=1", "batch_size=32", "train_limit=128", "test_limit=50"]) == 0
    results = json.loads((out / "ft" / "partial1" / "pretrained" / "results.json").read_text())
    assert results["model"] == "convmae_tiny" and results["steps"] == 4
    capsys.readouterr()
    assert main([*tune, "pool=cls"]) == 2
    assert "ConvViT has no class token" in capsys.readouterr().err


def test_photo_folder_recipe_pretrains_on_real_photos(tmp_path: Path) -> None:
    from matplotlib import cbook
    from PIL import Image

    photos = tmp_path / "photos" / "any_subfolder"
    photos.mkdir(parents=True)
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        with cbook.get_sample_data(name) as handle:
            photo = Image.open(handle).convert("RGB")
        for index, box in enumerate([(0, 0, 300, 300), (100, 50, 400, 350), (0, 0, *photo.size)]):
            photo.crop(box).save(photos / f"{Path(name).stem}_{index}.jpg")  # 6 real photos
    recipe = RECIPE.with_name("convmae_base_folder.yaml")
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(recipe)
    overrides = [
        f"data.root={tmp_path / 'photos'}", "data.num_workers=0", "model.img_size=64", "model.depths=[1,1,2]",
        "train.batch_size=3", "train.max_steps=2", "train.progress=false", "log.tensorboard=false",
        f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    config = load_config(recipe, overrides)
    assert (config.model.name, config.mask.type, config.optim.warmup_epochs) == ("convmae_base", "random", 40)
    summary = run_pretraining(config)
    assert summary["steps"] == 2 and summary["skipped_images"] == 0
    assert Path(summary["reconstruction"]).stat().st_size > 1000
    encoder = load_checkpoint(tmp_path / "run" / "last.pt").encoder
    assert encoder.embed_dims == (256, 384, 768) and encoder.in_chans == 3 and encoder.grid == (4, 4)
