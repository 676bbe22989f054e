import re
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


# the mask section as configs written before the masker's sections stored it (the keys flat)
FLAT_MASK = {
    "type": "self_guided",
    "ratio": 0.75,
    "min_num_patches": 4,
    "min_aspect": 0.3,
    "max_aspect": None,
    "random_offset": False,
    "mode": "hide",
    "temperature": 1.0,
    "source": "encoder",
    "hint_ratio": 0.2,
    "hint_ratio_end": 0.0,
    "trigger": "epoch",
    "trigger_patience": 1,
    "start_epoch": 1.0,
    "layer": None,
    "setting": "ideal",
    "graph": "weighted",
    "foreground": "border",
    "tau": 0.3,
    "hint_choice": "random",
    "exploitation_every_steps": 10,
    "trigger_every_steps": None,
}


def test_each_mask_section_holds_its_masker_constructor_arguments() -> None:
    import inspect
    from dataclasses import fields

    from mimkit.config.pretrain import MASK_SECTIONS
    from mimkit.masking import MASKERS

    for kind, section in MASK_SECTIONS.items():
        arguments = [name for name in inspect.signature(MASKERS[kind]).parameters if name != "ratio"]
        assert [f.name for f in fields(section)] == arguments, kind
    assert set(MASKERS) - set(MASK_SECTIONS) == {"random", "fine_random"}  # no options (fine_random's: the model's)


def test_nested_mask_sections_take_dotted_overrides_and_typos_name_the_full_key() -> None:
    cfg = load_config(None, ["mask.type=self_guided", "mask.self_guided.hint_ratio=0.2", "mask.block.min_aspect=0.5"])
    assert cfg.mask.self_guided.hint_ratio == 0.2 and cfg.mask.block.min_aspect == 0.5
    assert cfg.mask.section() is cfg.mask.self_guided
    with pytest.raises(
        ConfigError, match=r"mask\.self_guided\.hint_ratoi .*did you mean mask\.self_guided\.hint_ratio\?"
    ):
        load_config(None, ["mask.self_guided.hint_ratoi=0.2"])
    with pytest.raises(ConfigError, match=r"mask\.block\.min_num_patch .*did you mean mask\.block\.min_num_patches\?"):
        load_config(None, ["mask.block.min_num_patch=9"])


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("mask.hint_ratio=0.2", "mask.self_guided.hint_ratio"),
        ("mask.min_num_patches=9", "mask.block.min_num_patches"),
        ("mask.random_offset=true", "mask.grid.random_offset"),
        ("mask.source=teacher", "mask.attention.source"),
        ("mask.trigger_patience=2", "mask.self_guided.trigger_patience"),
    ],
)
def test_a_flat_mask_key_in_a_recipe_or_override_names_its_new_key(old: str, new: str, tmp_path: Path) -> None:
    key = old.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} moved to {new}"):
        load_config(None, [old])
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"mask": {key.split(".")[1]: yaml.safe_load(old.split("=")[1])}}))
    with pytest.raises(ConfigError, match=rf"{key} moved to {new}"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"did you mean mask\.self_guided\.hint_ratio\?"):
        load_config(None, ["mask.hint_ratoi=0.2"])  # a misspelt old key is pointed to the new one


def test_a_stored_config_with_flat_mask_keys_is_read_nested() -> None:
    from mimkit.config.pretrain import nest_mask_keys

    stored = {**Config().to_dict(), "mask": dict(FLAT_MASK)}
    cfg = config_from_dict(stored)
    assert cfg.mask.type == "self_guided" and cfg.mask.exploitation_every_steps == 10
    assert (cfg.mask.self_guided.hint_ratio, cfg.mask.self_guided.tau, cfg.mask.self_guided.start_epoch) == (
        0.2,
        0.3,
        1.0,
    )
    assert cfg.mask.self_guided.trigger == "epoch" and cfg.mask.block.min_aspect == 0.3
    assert nest_mask_keys(stored)["mask"] == cfg.to_dict()["mask"]
    current = Config().to_dict()
    assert nest_mask_keys(current) is current  # a config of today is left as it is
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_an_old_checkpoint_with_flat_mask_keys_loads(tmp_path: Path) -> None:
    import torch

    from mimkit.build import build_model, load_checkpoint

    small = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder=micro", "model.img_size=16"]
    cfg = load_config(None, [*small, "mask.type=self_guided", "mask.self_guided.hint_ratio=0.2"])
    model = build_model(cfg)
    stored = cfg.to_dict()
    stored["mask"] = {**FLAT_MASK, "trigger": "exploitation", "start_epoch": None, "tau": 0.2}
    path = tmp_path / "old.pt"
    torch.save({"model": model.state_dict(), "config": stored}, path)  # no model_args: built from the config
    loaded = load_checkpoint(path)
    assert loaded.run_config == cfg
    assert loaded.config["mask_options"] == model.config["mask_options"]
    assert loaded.masker.hint_ratio == 0.2
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# the target section as configs written before the teacher's and the class-token head's sections stored it
FLAT_TARGET = {
    "type": "maskdistill",
    "norm_pix": True,
    "loss": None,
    "loss_on": "hidden",
    "norm_features": None,
    "teacher": "efficientnet_lite0",
    "teacher_stage": 3,
    "teacher_input_size": 64,
    "teacher_cache": "/tmp/teacher-cache",
    "tokenizer": None,
    "cls_pretraining": False,
    "cls_layer": None,
    "cls_depth": 2,
}


def test_the_target_sections_hold_their_parts_constructor_arguments() -> None:
    import inspect
    from dataclasses import fields

    from mimkit.config import ClassTokenConfig, TeacherConfig
    from mimkit.models.cls_pretraining import ClassTokenPretraining
    from mimkit.targets.teachers.efficientnet import EfficientNetLite0Teacher

    teacher = TeacherConfig(spec="efficientnet_lite0", stage=3, input_size=64)
    assert teacher.options() == {"stage": 3, "input_size": 64}
    assert set(teacher.options() or {}) <= set(inspect.signature(EfficientNetLite0Teacher).parameters)
    assert TeacherConfig(stage=3).options() is None  # no teacher, no options
    head = [f.name for f in fields(ClassTokenConfig) if f.name != "enabled"]
    assert head == ["layer", "depth"] and set(head) <= set(inspect.signature(ClassTokenPretraining).parameters)


def test_the_tokenizer_teacher_is_the_target_teacher_section_with_a_teacher_by_default() -> None:
    from mimkit.config import TeacherConfig

    config = load_config(None, ["teacher.stage=3", "teacher.input_size=64"], schema=TokenizerConfig)
    assert isinstance(config.teacher, TeacherConfig) and config.teacher.spec == "efficientnet_lite0"
    assert config.teacher.options() == {"stage": 3, "input_size": 64}
    assert list(to_plain(config)["teacher"]) == ["spec", "stage", "input_size", "cache"]
    with pytest.raises(ConfigError, match=r"^teacher\.cache: the tokenizer keeps no feature cache"):
        load_config(None, ["teacher.cache=/tmp/features"], schema=TokenizerConfig)
    with pytest.raises(ConfigError, match=r"^teacher\.spec: expected a string"):
        load_config(None, ["teacher.spec=null"], schema=TokenizerConfig)
    with pytest.raises(ConfigError, match=r"^teacher\.spec: must name a teacher"):
        load_config(None, ["teacher.spec=''"], schema=TokenizerConfig)
    # a config stored before the section had a cache key loads as it was written
    stored = to_plain(TokenizerConfig())
    del stored["teacher"]["cache"]
    assert from_dict(TokenizerConfig, stored).validate() == TokenizerConfig()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("target.teacher=efficientnet_lite0", "target.teacher.spec"),
        ("target.teacher_stage=3", "target.teacher.stage"),
        ("target.teacher_input_size=64", "target.teacher.input_size"),
        ("target.teacher_cache=/tmp/cache", "target.teacher.cache"),
        ("target.cls_pretraining=true", "target.cls.enabled"),
        ("target.cls_layer=0", "target.cls.layer"),
        ("target.cls_depth=1", "target.cls.depth"),
    ],
)
def test_a_flat_target_key_in_a_recipe_or_override_names_its_new_key(old: str, new: str, tmp_path: Path) -> None:
    key = old.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} moved to {new}"):
        load_config(None, ["target.type=maskdistill", old])
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"target": {key.split(".")[1]: yaml.safe_load(old.split("=")[1])}}))
    with pytest.raises(ConfigError, match=rf"{key} moved to {new}"):
        load_config(recipe)


def test_old_target_keys_are_all_named_and_misspelt_ones_pointed_to_their_section(tmp_path: Path) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"target": FLAT_TARGET}))
    with pytest.raises(ConfigError) as raised:
        load_config(recipe)
    assert re.findall(r"target\.(\w+) moved to target\.([\w.]+)", str(raised.value)) == [
        ("cls_depth", "cls.depth"),
        ("cls_layer", "cls.layer"),
        ("cls_pretraining", "cls.enabled"),
        ("teacher", "teacher.spec"),
        ("teacher_cache", "teacher.cache"),
        ("teacher_input_size", "teacher.input_size"),
        ("teacher_stage", "teacher.stage"),
    ]
    with pytest.raises(ConfigError, match=r"did you mean target\.teacher\.stage\?"):
        load_config(None, ["target.teacher_stag=3"])
    with pytest.raises(ConfigError, match=r"target\.teacher\.stge .*did you mean target\.teacher\.stage\?"):
        load_config(None, ["target.teacher.stge=3"])
    cfg = load_config(
        None, ["target.type=maskdistill", "target.teacher.spec=efficientnet_lite0", "target.teacher.input_size=64"]
    )
    assert (cfg.target.teacher.spec, cfg.target.teacher.input_size, cfg.target.teacher.stage) == (
        "efficientnet_lite0",
        64,
        None,
    )


def test_a_stored_config_with_flat_target_keys_is_read_nested() -> None:
    from mimkit.config import nest_target_keys

    stored = {**Config().to_dict(), "target": dict(FLAT_TARGET)}
    cfg = config_from_dict(stored)
    assert cfg.target.type == "maskdistill" and cfg.target.norm_pix and cfg.target.loss_on == "hidden"
    assert (cfg.target.teacher.spec, cfg.target.teacher.stage, cfg.target.teacher.input_size) == (
        "efficientnet_lite0",
        3,
        64,
    )
    assert cfg.target.teacher.cache == "/tmp/teacher-cache"
    assert (cfg.target.cls.enabled, cfg.target.cls.layer, cfg.target.cls.depth) == (False, None, 2)
    assert nest_target_keys(stored)["target"] == cfg.to_dict()["target"]
    no_teacher = {**FLAT_TARGET, "type": "pixel", "teacher": None, "teacher_stage": None, "teacher_input_size": None}
    no_teacher.update(teacher_cache=None, cls_pretraining=True, cls_layer=0, cls_depth=1)
    cfg = config_from_dict({**Config().to_dict(), "target": no_teacher})
    assert cfg.target.teacher.spec is None and cfg.target.teacher.options() is None
    assert (cfg.target.cls.enabled, cfg.target.cls.layer, cfg.target.cls.depth) == (True, 0, 1)
    current = Config().to_dict()
    assert nest_target_keys(current) is current  # a config of today is left as it is
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["mask.type=block", "mask.block.min_num_patches=0"], "mask.block.min_num_patches"),
        (["mask.type=block", "mask.block.max_aspect=0.1"], "mask.block.max_aspect"),
        (["mask.type=attention", "mask.attention.mode=x"], "mask.attention.mode"),
        (["mask.type=attention", "mask.attention.temperature=-1"], "mask.attention.temperature"),
        (["mask.type=self_guided", "mask.self_guided.trigger_patience=0"], "mask.self_guided.trigger_patience"),
        (["mask.type=self_guided", "mask.self_guided.trigger_every_steps=0"], "mask.self_guided.trigger_every_steps"),
        (["mask.type=self_guided", "mask.self_guided.graph=x"], "mask.self_guided.graph"),
        (["mask.type=self_guided", "mask.self_guided.foreground=x"], "mask.self_guided.foreground"),
        (["mask.type=self_guided", "mask.self_guided.hint_choice=x"], "mask.self_guided.hint_choice"),
        (["mask.type=self_guided", "mask.self_guided.hint_ratio=1.2"], "mask.self_guided.hint_ratio"),
        (["mask.type=self_guided", "mask.self_guided.hint_ratio_end=0.5"], "mask.self_guided.hint_ratio_end"),
        (["mask.type=self_guided", "mask.ratio=-0.1"], "mask.ratio"),
    ],
)
def test_the_masker_checks_its_own_section_and_the_error_names_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
        load_config(None, overrides)


def test_an_inactive_mask_section_is_kept_but_neither_used_nor_checked() -> None:
    cfg = load_config(None, ["mask.self_guided.trigger_patience=0", "mask.block.min_num_patches=0"])
    assert cfg.mask.type == "random" and cfg.mask.section() is None
    assert cfg.mask.self_guided.trigger_patience == 0 and cfg.mask.block.min_num_patches == 0  # saved as set


def test_the_model_is_built_on_the_meta_device_and_its_refusals_name_the_part() -> None:
    """The encoder and its head check their own sizes when the config is read (built without memory), so a
    head count that does not divide the width fails before any data is read, naming the part."""
    with pytest.raises(
        ConfigError, match=r"^model: the encoder vit_tiny cannot be built: .*not divisible by num_heads 5"
    ):
        load_config(None, ["model.num_heads=5"])
    with pytest.raises(ConfigError, match=r"^model\.decoder: the mae head cannot be built: .*num_heads 7"):
        load_config(None, ["model.decoder_num_heads=7"])
    with pytest.raises(ConfigError, match=r"^model: .*negative dimension"):
        load_config(None, ["model.mlp_ratio=-1"])
    config = load_config(None, ["model.name=vit_large", "model.img_size=224", "model.patch_size=16"])
    assert config.model.name == "vit_large"  # 300 M parameters checked without allocating them
