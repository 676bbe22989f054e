"""Loading every kind of checkpoint, and lossless, atomic conversion between mimkit, MAE and HuggingFace."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mimkit
from mimkit.build import build_model, convert_checkpoint, create_model, load_checkpoint
from mimkit.checkpoints.convert import LAYOUTS, from_mimkit
from mimkit.checkpoints.load import HF_CONFIG_NAME, HF_WEIGHTS_NAME, MIMKIT_EXTRA_NAME, load_encoder, save_checkpoint_as
from mimkit.config import load_config
from mimkit.files import CheckpointError

TINY = dict(img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro")
# 192 wide is a registry width (vit_tiny, 3 heads): head counts can be inferred from bare weights.
REGISTRY_WIDTH = dict(img_size=32, patch_size=4, in_chans=1, depth=2, decoder="micro")
RUN_OVERRIDES = [
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "model.decoder=micro",
    "mask.ratio=0.6",
    "data.dataset=folder",
    "data.root=/images",
    "data.mean=[0.25]",
    "data.std=[0.4]",
    "train.batch_size=4",
]


@pytest.fixture
def transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers  # a dev dependency: a missing install must fail these tests, not skip them

    return transformers


def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Noise on every weight, so swapped or re-initialised tensors cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return module


def tiny_model(**overrides) -> nn.Module:
    return perturb(create_model("vit_tiny", **{**TINY, **overrides})).eval()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = a.state_dict(), b.state_dict()
    assert list(wa) == list(wb)
    for key, value in wa.items():
        assert value.dtype == wb[key].dtype and torch.equal(value, wb[key]), key


def outputs(model: nn.Module, chans: int = 1, seed: int = 0):
    images = torch.randn(3, chans, 32, 32, generator=torch.Generator().manual_seed(seed))
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return images, noise, model(images, noise)


def training_checkpoint(path: Path, *, with_model_args: bool = True) -> nn.Module:
    """A checkpoint shaped like the engine's ``last.pt``, for a model built from a run config."""
    config = load_config(None, RUN_OVERRIDES)
    model = perturb(build_model(config)).eval()
    state = {
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "step": 7,
        "epoch": 1,
        "config": config.to_dict(),
    }
    if with_model_args:
        state["model_args"] = dict(model.config)
    torch.save(state, path)
    model.run_config = config
    return model


@pytest.mark.parametrize("with_model_args", [True, False], ids=["model_args", "config-only"])
def test_training_checkpoint_loads_with_its_run_config(tmp_path: Path, with_model_args: bool) -> None:
    model = training_checkpoint(tmp_path / "last.pt", with_model_args=with_model_args)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert not loaded.training
    assert_same_weights(model, loaded)
    assert loaded.config == model.config
    assert loaded.run_config == model.run_config
    assert loaded.run_config.data.mean == (0.25,) and loaded.masker.ratio == 0.6
    _, _, expected = outputs(model)
    _, _, got = outputs(loaded)
    assert torch.equal(got.pred, expected.pred) and torch.equal(got.loss, expected.loss)


def test_mimkit_mae_hf_round_trips_are_bit_identical(tmp_path: Path, transformers) -> None:
    model = training_checkpoint(tmp_path / "last.pt")
    mae, back, hf_dir, final = tmp_path / "mae.pth", tmp_path / "back.pt", tmp_path / "hf", tmp_path / "final.pt"
    assert convert_checkpoint(tmp_path / "last.pt", mae, to="mae") == mae
    convert_checkpoint(mae, back, to="mimkit")
    convert_checkpoint(back, hf_dir, to="hf")
    convert_checkpoint(hf_dir, final, to="mimkit")

    # What the original MAE code reads: checkpoint["model"] with its own key names, via a plain torch.load.
    mae_state = torch.load(mae, weights_only=True)
    assert list(mae_state["model"]) == list(from_mimkit(model.state_dict(), "mae"))
    assert "decoder_blocks.1.attn.qkv.weight" in mae_state["model"] and "decoder_pred.bias" in mae_state["model"]
    assert sorted(path.name for path in hf_dir.iterdir()) == sorted(
        [HF_CONFIG_NAME, HF_WEIGHTS_NAME, MIMKIT_EXTRA_NAME]
    )

    _, _, expected = outputs(model)
    for path in (mae, back, hf_dir, final):
        loaded = load_checkpoint(path)
        assert_same_weights(model, loaded)
        assert loaded.config == model.config, path  # name, decoder preset, loss and mask type survive
        assert loaded.run_config == model.run_config, path  # and so does the run config (normalization)
        _, _, got = outputs(loaded)
        assert torch.equal(got.mask, expected.mask)
        assert torch.equal(got.pred, expected.pred) and torch.equal(got.loss, expected.loss), path
    assert torch.load(final, weights_only=True).keys() == {"model", "model_args", "config"}


def test_load_encoder_builds_the_encoder_alone_from_every_layout(tmp_path: Path, transformers) -> None:
    model = training_checkpoint(tmp_path / "last.pt")
    convert_checkpoint(tmp_path / "last.pt", tmp_path / "mae.pth", to="mae")
    convert_checkpoint(tmp_path / "last.pt", tmp_path / "hf", to="hf")
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.encoder(images).tokens  # (B, 1 + L, D)
    for name in ("last.pt", "mae.pth", "hf"):
        encoder, args, run_config = load_encoder(tmp_path / name)
        assert not encoder.training, name
        assert_same_weights(model.encoder, encoder)
        with torch.no_grad():
            assert torch.equal(encoder(images).tokens, expected), name
        assert args == model.config and run_config == model.run_config.to_dict(), name

    bare = perturb(create_model("vit_tiny", **REGISTRY_WIDTH)).eval()
    torch.save(from_mimkit(bare.state_dict(), "mae"), tmp_path / "bare.pth")
    encoder, args, run_config = load_encoder(tmp_path / "bare.pth")  # the architecture read off the shapes
    assert args["embed_dim"] == 192 and args["num_heads"] == 3 and run_config is None
    assert_same_weights(bare.encoder, encoder)

    convmae = perturb(create_model("convmae_tiny", img_size=32, in_chans=1, patch_sizes=(2, 2, 2))).eval()
    save_checkpoint_as(convmae, tmp_path / "convmae.pt", "mimkit")
    encoder, args, _ = load_encoder(tmp_path / "convmae.pt")
    assert args == convmae.config
    assert_same_weights(convmae.encoder, encoder)

    training_checkpoint(tmp_path / "config_only.pt", with_model_args=False)
    with pytest.raises(CheckpointError, match=r"config_only.pt has no model_args, only a run config"):
        load_encoder(tmp_path / "config_only.pt")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["model"] = {key: value[:1] for key, value in state["model"].items()}
    torch.save(state, tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError, match=r"narrow.pt: the encoder's weights do not fit"):
        load_encoder(tmp_path / "narrow.pt")


def test_original_mae_checkpoint_with_namespace_args(tmp_path: Path) -> None:
    source = perturb(create_model("vit_tiny", **REGISTRY_WIDTH, norm_pix=False, mask_ratio=0.6)).eval()
    args = argparse.Namespace(  # what facebookresearch/mae's main_pretrain.py saves
        model="mae_vit_tiny",
        input_size=32,
        mask_ratio=0.6,
        norm_pix_loss=False,
        batch_size=64,
        blr=1.5e-4,
        output_dir="./output_dir",
        device="cuda",
        distributed=False,
    )
    checkpoint = {
        "model": from_mimkit(source.state_dict(), "mae"),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
        "epoch": 399,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": args,
    }
    torch.save(checkpoint, tmp_path / "checkpoint-399.pth")
    loaded = load_checkpoint(tmp_path / "checkpoint-399.pth")
    assert loaded.run_config is None
    for key in ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        assert loaded.config[key] == source.config[key], key
    assert (loaded.config["mask_ratio"], loaded.config["norm_pix"], loaded.config["img_size"]) == (0.6, False, 32)
    assert_same_weights(source, loaded)
    _, _, expected = outputs(source)
    _, _, got = outputs(loaded)
    assert torch.equal(got.pred, expected.pred) and torch.equal(got.loss, expected.loss)

    # The released files hold {"model": ...} only; MAE's defaults fill in what the weights do not tell.
    torch.save({"model": checkpoint["model"]}, tmp_path / "released.pth")
    released = load_checkpoint(tmp_path / "released.pth")
    assert (released.config["mask_ratio"], released.config["norm_pix"]) == (0.75, True)
    assert_same_weights(source, released)


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": tiny_model().state_dict(), "model_args": {}, "hook": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt holds Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bare_state_dicts_of_every_layout(tmp_path: Path, layout: str) -> None:
    source = perturb(create_model("vit_tiny", **REGISTRY_WIDTH)).eval()
    torch.save(from_mimkit(source.state_dict(), layout), tmp_path / "weights.pt")
    if layout.startswith("hf"):
        with pytest.warns(UserWarning, match="without their config.json"):
            loaded = load_checkpoint(tmp_path / "weights.pt")
        assert loaded.config["norm_eps"] == 1e-12  # HuggingFace's default, not MAE's
    else:
        loaded = load_checkpoint(tmp_path / "weights.pt")
        assert loaded.config["norm_eps"] == 1e-6
    assert_same_weights(source, loaded)


def test_bare_safetensors_and_widths_outside_the_registry(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = tiny_model()  # 64 wide: no registry entry tells its head count
    save_file(from_mimkit(source.state_dict(), "hf"), tmp_path / "model.safetensors")
    with (
        pytest.warns(UserWarning, match="without their config.json"),
        pytest.raises(CheckpointError, match=r"model\.safetensors: .*no registry encoder is 64 wide.*config\.json"),
    ):
        load_checkpoint(tmp_path / "model.safetensors")
    loaded = load_checkpoint(
        tmp_path / "model.safetensors", overrides={"num_heads": 2, "norm_eps": 1e-6, "norm_pix": True}
    )
    assert_same_weights(source, loaded)
    _, _, expected = outputs(source)
    _, _, got = outputs(loaded)
    assert torch.equal(got.loss, expected.loss)


def test_hf_directory_loads_in_transformers_with_equal_outputs(tmp_path: Path, transformers) -> None:
    model = tiny_model(in_chans=3, norm_pix=True, mask_ratio=0.75)
    save_checkpoint_as(model, tmp_path / "hf", "hf")
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.norm_pix_loss and hf.config.layer_norm_eps == 1e-6 and hf.config.num_channels == 3
    hf.eval()
    images, noise, ours = outputs(model, chans=3)
    with torch.no_grad():
        theirs = hf(pixel_values=images, noise=noise)
    assert torch.equal(ours.mask, theirs.mask.bool())
    assert torch.allclose(ours.pred, theirs.logits, atol=1e-5, rtol=0)
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    assert theirs.logits.abs().mean() > 0.1  # not trivially small, so the tolerance means something


def test_directories_saved_by_transformers_load(tmp_path: Path, transformers) -> None:
    config = transformers.ViTMAEConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=32,
        patch_size=4,
        num_channels=1,
        decoder_hidden_size=128,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=512,
        norm_pix_loss=True,
    )
    hf = perturb(transformers.ViTMAEForPreTraining(config), seed=3).eval()
    hf.save_pretrained(tmp_path / "pretraining")  # transformers' own file names, whatever its version
    loaded = load_checkpoint(tmp_path / "pretraining")
    assert loaded.config["norm_eps"] == 1e-12 and loaded.config["num_heads"] == 2
    exported, reference = from_mimkit(loaded.state_dict(), "hf"), hf.state_dict()
    assert exported.keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in exported.items())
    images, noise, ours = outputs(loaded)
    with torch.no_grad():
        theirs = hf(pixel_values=images, noise=noise)
    assert torch.allclose(ours.pred, theirs.logits, atol=1e-5, rtol=0)
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-5, rtol=0)

    hf.vit.save_pretrained(tmp_path / "encoder")  # a ViTMAEModel: encoder only, keys without "vit."
    with pytest.warns(UserWarning, match="encoder-only checkpoint"):
        encoder_only = load_checkpoint(tmp_path / "encoder")
    expected = {key: value for key, value in loaded.state_dict().items() if key.startswith("encoder.")}
    assert all(torch.equal(encoder_only.state_dict()[key], value) for key, value in expected.items())


def test_unreadable_checkpoints_name_the_path(tmp_path: Path) -> None:
    training_checkpoint(tmp_path / "last.pt")
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'truncated.pt'} could not be read.*truncated"):
        load_checkpoint(tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'missing.pt'} does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=r"empty_dir is a directory without config\.json"):
        load_checkpoint(tmp_path / "empty_dir")
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match=r"resnet\.pt is not a checkpoint mimkit recognizes.*conv1\.weight"):
        load_checkpoint(tmp_path / "resnet.pt")
    torch.save({"step": 3, "optimizer": {}}, tmp_path / "optimizer_only.pt")
    with pytest.raises(CheckpointError, match=r"optimizer_only\.pt .*entries step \(int\)"):
        load_checkpoint(tmp_path / "optimizer_only.pt")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["model"] = {key: value for key, value in state["model"].items() if key.startswith("encoder.")}
    torch.save(state, tmp_path / "no_decoder.pt")
    with pytest.raises(CheckpointError, match=r"no_decoder\.pt: it holds encoder weights only"):
        load_checkpoint(tmp_path / "no_decoder.pt")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["model_args"] = {**state["model_args"], "depth": 3}
    torch.save(state, tmp_path / "deeper.pt")
    with pytest.raises(CheckpointError, match=r"deeper\.pt: .*missing keys: encoder\.blocks\.2"):
        load_checkpoint(tmp_path / "deeper.pt")


def test_edited_hf_config_wins_over_mimkit_json(tmp_path: Path, transformers) -> None:
    model = training_checkpoint(tmp_path / "last.pt")
    convert_checkpoint(tmp_path / "last.pt", tmp_path / "hf", to="hf")
    config = transformers.ViTMAEConfig.from_pretrained(tmp_path / "hf")
    config.mask_ratio = 0.5
    config.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match=r"mimkit\.json does not match .*config\.json"):
        loaded = load_checkpoint(tmp_path / "hf")
    assert loaded.config["mask_ratio"] == 0.5 and loaded.masker.ratio == 0.5
    assert loaded.run_config is None  # mimkit.json described another model: none of it is used
    assert_same_weights(model, loaded)


def test_unreadable_hf_directories_name_the_path(tmp_path: Path, transformers) -> None:
    save_checkpoint_as(tiny_model(), tmp_path / "hf", "hf")
    weights = tmp_path / "hf" / HF_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"hf/model\.safetensors could not be read as safetensors"):
        load_checkpoint(tmp_path / "hf")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"hf has a config\.json but no weights"):
        load_checkpoint(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / HF_CONFIG_NAME).read_text())
    (tmp_path / "hf" / HF_CONFIG_NAME).write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"describes a 'bert' model"):
        load_checkpoint(tmp_path / "hf")


def test_failed_file_conversion_leaves_the_existing_output(tmp_path: Path, monkeypatch) -> None:
    training_checkpoint(tmp_path / "last.pt")
    out = convert_checkpoint(tmp_path / "last.pt", tmp_path / "out.pth", to="mae")
    before = out.read_bytes()
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(tmp_path / "truncated.pt", out, to="mae")

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(tmp_path / "last.pt", out, to="mimkit")
    assert out.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt", "out.pth", "truncated.pt"]
    with pytest.raises(ValueError, match=r"unknown layout 'timm'"):
        convert_checkpoint(tmp_path / "last.pt", out, to="timm")


def test_failed_hf_export_leaves_the_existing_directory(tmp_path: Path, monkeypatch, transformers) -> None:
    import safetensors.torch

    out = save_checkpoint_as(tiny_model(), tmp_path / "hf", "hf")
    snapshot = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(ValueError, match="only has an MSE loss"):  # refused before touching the disk
        save_checkpoint_as(tiny_model(loss="l1"), out, "hf")

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint_as(tiny_model(depth=3), out, "hf")
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in out.iterdir()} == snapshot
    assert [path.name for path in tmp_path.iterdir()] == ["hf"]  # no temporary directories left behind

    replaced = save_checkpoint_as(tiny_model(depth=3), out, "hf")
    assert load_checkpoint(replaced).config["depth"] == 3  # a previous export is replaced
    assert [path.name for path in tmp_path.iterdir()] == ["hf"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes exists and holds todo\.txt"):
        save_checkpoint_as(tiny_model(), other, "hf")
    assert (other / "todo.txt").read_text() == "keep me"


def test_import_mimkit_is_lazy() -> None:
    code = (
        "import sys, mimkit; assert 'torch' not in sys.modules, 'import mimkit imported torch'; "
        "print(mimkit.__version__, mimkit.load_checkpoint.__module__, mimkit.MaskSpec.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.1.0", "mimkit.build", "MaskSpec"]
    assert mimkit.create_model is create_model and mimkit.__version__ == "0.1.0"
    assert {"create_model", "load_checkpoint", "MaskedImageModel", "MaskSpec", "load_config"} <= set(dir(mimkit))


# model_args and the target section of the run config as checkpoints written before the target's sections stored
# them: norm_pix_loss, cls_pretraining, and the teacher's and class-token head's keys flat in target
OLD_MODEL_ARGS = {
    "name": "vit_tiny",
    "img_size": 16,
    "in_chans": 1,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "drop_path_rate": 0.0,
    "norm_eps": 1e-06,
    "norm_pix_loss": False,
    "loss": "mse",
    "target": "pixel",
    "teacher": None,
    "teacher_options": None,
    "data_mean": None,
    "data_std": None,
    "tokenizer": None,
    "teacher_cache": None,
    "cls_pretraining": True,
    "cls_layer": 0,
    "cls_depth": 1,
    "mask_ratio": 0.75,
    "mask_type": "random",
    "mask_options": {},
    "grad_checkpointing": False,
    "encoder_sees": "visible",
    "head": "mae",
    "loss_on": "hidden",
    "norm_features": None,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "patch_size": 4,
    "decoder_embed_dim": 128,
    "decoder_depth": 2,
    "decoder_num_heads": 4,
    "decoder": "micro",
}
OLD_TARGET = {
    "type": "pixel",
    "norm_pix": False,
    "loss": None,
    "loss_on": "hidden",
    "norm_features": None,
    "teacher": None,
    "teacher_stage": None,
    "teacher_input_size": None,
    "teacher_cache": None,
    "tokenizer": None,
    "cls_pretraining": True,
    "cls_layer": 0,
    "cls_depth": 1,
}
OLD_RUN = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder=micro", "model.img_size=16",
    "target.norm_pix=false", "target.cls.enabled=true", "target.cls.layer=0", "target.cls.depth=1",
]  # fmt: skip


@pytest.mark.parametrize("stored", ["model_args", "config"])
def test_a_checkpoint_with_the_names_of_older_versions_loads(tmp_path: Path, stored: str) -> None:
    from mimkit.models.cls_pretraining import ClassTokenPretraining

    config = load_config(None, OLD_RUN)
    torch.manual_seed(0)
    model = perturb(build_model(config)).eval()
    old_config = {**config.to_dict(), "target": dict(OLD_TARGET)}
    state = {"model": model.state_dict(), "config": old_config}
    if stored == "model_args":  # else only the run config describes the model
        state["model_args"] = dict(OLD_MODEL_ARGS)
    torch.save(state, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.config == model.config and "norm_pix_loss" not in loaded.config
    assert (loaded.config["norm_pix"], loaded.config["cls_enabled"], loaded.config["cls_layer"]) == (False, True, 0)
    assert loaded.run_config == config and loaded.run_config.target.cls.depth == 1
    assert isinstance(loaded.decoder, ClassTokenPretraining) and loaded.decoder.layer == 0
    assert len(loaded.decoder.head.blocks) == 1 and not loaded.target.norm_pix
    assert_same_weights(model, loaded)
    if stored == "model_args":
        encoder, args, _ = load_encoder(tmp_path / "old.pt")
        assert args["norm_pix"] is False and "cls_pretraining" not in args and encoder.embed_dim == 32


def test_a_hf_directory_with_the_model_args_of_older_versions_keeps_them(tmp_path: Path, transformers) -> None:
    import warnings

    model = tiny_model(norm_pix=False, mask_ratio=0.6)
    save_checkpoint_as(model, tmp_path / "hf", "hf")
    extra_path = tmp_path / "hf" / MIMKIT_EXTRA_NAME
    extra = json.loads(extra_path.read_text())
    args = extra["model_args"]
    args["norm_pix_loss"], args["cls_pretraining"] = args.pop("norm_pix"), args.pop("cls_enabled")
    extra_path.write_text(json.dumps(extra))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mimkit.json is not set aside as disagreeing with config.json
        loaded = load_checkpoint(tmp_path / "hf")
    assert loaded.config == model.config and loaded.config["decoder"] == "micro"
    assert_same_weights(model, loaded)


def test_old_model_argument_names_are_refused_naming_the_new_ones() -> None:
    from mimkit.models.registry import stored_model_args

    with pytest.raises(ValueError, match=r"model argument norm_pix_loss is now norm_pix"):
        create_model("vit_tiny", **TINY, norm_pix_loss=False)
    with pytest.raises(ValueError, match=r"cls_pretraining is now cls_enabled"):
        create_model("vit_tiny", **TINY, cls_pretraining=True)
    assert stored_model_args({"norm_pix_loss": False, "depth": 2}) == {"norm_pix": False, "depth": 2}
    with pytest.raises(ValueError, match=r"norm_pix_loss=True \(its old name\) and norm_pix=False disagree"):
        stored_model_args({"norm_pix_loss": True, "norm_pix": False})
