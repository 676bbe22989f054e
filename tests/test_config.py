from pathlib import Path

import pytest
import yaml

from mimkit.config import Config, ConfigError, config_from_dict, from_dict, load_config, to_plain
from mimkit.tasks.tokenizer import TokenizerConfig

RECIPES = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_dotted_overrides() -> None:
    cfg = load_config(None, ["optim.blr=1e-3", "train.epochs=2", "data.crop_scale=[0.3, 1]", "data.root=/x"])
    assert cfg.optim.blr == 1e-3 and cfg.train.epochs == 2
    assert cfg.data.crop_scale == (0.3, 1.0) and cfg.data.root == "/x"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    recipe = yaml.safe_load(path.read_text())
    if "spec" in recipe.get("teacher", {}):  # a tokenizer recipe (mimkit tokenizer-train)
        assert load_config(path, schema=TokenizerConfig).teacher.spec == recipe["teacher"]["spec"]
        return
    if path.name.startswith(("detect_", "seg_")):  # mimkit detect-train / seg-train recipes
        from mimkit.tasks.detect import DetectConfig
        from mimkit.tasks.segment import SegConfig

        kind = DetectConfig if path.name.startswith("detect_") else SegConfig
        loaded = load_config(path, schema=kind)
        assert from_dict(kind, yaml.safe_load(yaml.safe_dump(to_plain(loaded)))) == loaded
        return
    folder = recipe["data"]["dataset"] == "folder"
    cfg = load_config(path, [f"data.root={tmp_path}"] if folder else [])  # a photo recipe names no folder
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_required_key_names_exist() -> None:
    cfg = Config()
    for dotted in [
        "model.name",
        "model.img_size",
        "model.patch_size",
        "mask.type",
        "mask.ratio",
        "target.norm_pix",
        "data.dataset",
        "data.root",
        "train.epochs",
        "train.batch_size",
        "train.output_dir",
        "train.seed",
        "optim.blr",
    ]:
        section, key = dotted.split(".")
        assert hasattr(getattr(cfg, section), key), dotted


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=2", "unknown key.*train.epoch"),
        ("nosuch.key=1", "unknown key.*nosuch"),
        ("train.epochs=two", "train.epochs: expected an integer"),
        ("data.hflip=3", "data.hflip: expected true/false"),
        ("model.img_size=30", "model.img_size.*30 is not divisible by patch_size 4"),
        ("mask.ratio=1.5", "mask.ratio"),
        ("mask.type=spiral", "mask.type"),
        ("data.dataset=cifar", "data.dataset"),
        ("data.crop_scale=[0.2]", "data.crop_scale: expected 2 values"),
        ("optim.accum_steps=3", "optim.accum_steps"),
        ("train", "must look like key.sub=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_folder_needs_root_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(None, ["data.dataset=folder"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
