"""Hostile and bad input: each case gets a clear, actionable error (or a named skip), never a traceback or code run.

Everything goes through the entry points users hit (``mimkit.cli.main``, ``load_config``, ``load_checkpoint``,
``Pretrainer``, ``build_dataset``, ``run_probe``) with real files: Fashion-MNIST images saved as PNG/JPEG/TIFF,
real checkpoints of a tiny ViT, bytes cut off real files.

Bad inputs tried: 47 test cases, all handled (each asserts the exception type, or the skip, and a message that
names the file, key or value and says what to do):

* checkpoints (14): truncated at 3 points, zero bytes (API and CLI), weights of another architecture than
  the stated one (3 edits of ``model_args``, and via ``mimkit probe``), an ``img_size`` not divisible by its
  patch size, pickle payloads that would run ``os.system`` (2 file kinds; and via ``mimkit probe`` and
  ``mimkit pretrain --resume``), a pickled list instead of a dict, resuming a run with another model;
* configs (16): invalid YAML (API and CLI), YAML with Python tags (3 tags), a list at the top, unknown keys
  (file and override), wrong types (3), NaN/inf values (2), an image size not divisible by the patch size
  (API and CLI), a mask ratio that hides nothing, a reversed crop range, a std of the wrong length;
* images and data sets (14): zero-byte and truncated files in a training folder (in memory, on the fly, and
  in a ``Pretrainer``), a folder of only bad files, decompression bombs (a real 20000x20000 PNG and a
  lowered ``MAX_IMAGE_PIXELS``), a float TIFF of NaN, NaN reaching a pretraining step, float images given
  to a step, an empty folder, a folder with no images, a missing folder (API and CLI), a Fashion-MNIST root
  without its files, a data set smaller than the batch;
* probe labels (3): a flat folder without ``train/``, unlabelled ``train/`` and ``test/`` (API and CLI),
  the online probe on unlabelled images.

Property-based (hypothesis, 40 examples each): config values (image and patch size, mask type and ratio,
batch size, accumulation, crop scale, channels) either load into a model that runs a forward pass with a
finite loss, or raise ``ConfigError`` naming the key; any image size loads as a square of ``img_size``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from mimkit.build import build_model, create_model, load_checkpoint
from mimkit.checkpoints.load import save_checkpoint_as
from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.data import BadImageWarning, build_dataset
from mimkit.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from mimkit.data.transforms import MAEAugment
from mimkit.engine.divergence import TrainingDiverged
from mimkit.engine.pretrain import Pretrainer
from mimkit.eval.probe import run_probe
from mimkit.files import CheckpointError

TINY = dict(img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro")
TINY_RUN = [
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "model.decoder=micro",
    "train.batch_size=4",
    "data.dataset=folder",
    "data.in_memory=true",
    "data.num_workers=0",
    "train.progress=false",
    "log.tensorboard=false",
    "eval.knn=false",
    "eval.reconstruct=false",
]


@pytest.fixture(scope="module")
def fmnist() -> np.ndarray:
    """The first 64 Fashion-MNIST test images, (64, 28, 28) uint8."""
    if not DEFAULT_ROOT.is_dir():
        pytest.fail(f"Fashion-MNIST is missing at {DEFAULT_ROOT}: `apt-get install dataset-fashion-mnist`")
    images, _ = load_fashion_mnist(split="test")
    return images[:64, 0].numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real tiny ViT checkpoint in the mimkit layout."""
    torch.manual_seed(0)
    return save_checkpoint_as(create_model("vit_tiny", **TINY), tmp_path_factory.mktemp("ckpt") / "tiny.pt", "mimkit")


@pytest.fixture
def write_folder(fmnist) -> Callable[..., Path]:
    """``write_folder(root, count=8)``: ``count`` Fashion-MNIST PNGs directly in ``root`` (unlabelled)."""

    def write(root: Path, count: int = 8) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(fmnist[index], "L").save(root / f"{index:02d}.png")
        return root

    return write


def run_cli(capsys, *argv: object) -> tuple[int, str]:
    """``mimkit ARGV``: the exit code and what went to stderr."""
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def cut(source: Path, out: Path, keep: float) -> Path:
    """``out`` holding the first ``keep`` fraction of ``source``'s bytes (a truncated copy)."""
    data = source.read_bytes()
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def probe_args(checkpoint: Path, data: Path, out: Path) -> list[object]:
    return ["probe", "--checkpoint", checkpoint, "--protocol", "knn", "--data", data, "--out", out, "--no-progress"]


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("keep", [0.0001, 0.5, 0.999])
def test_truncated_checkpoint(checkpoint, tmp_path, keep) -> None:
    path = cut(checkpoint, tmp_path / "cut.pt", keep)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} could not be read .*truncated.*earlier"):
        load_checkpoint(path)


def test_zero_byte_checkpoint(tmp_path, capsys) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is empty \(0 bytes\).*earlier checkpoint"):
        load_checkpoint(path)
    code, err = run_cli(capsys, "convert", "--to", "mae", path, tmp_path / "out.pt")
    assert code == 2 and f"checkpoint {path} is empty" in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(
    ("edit", "listed"),
    [
        ({"embed_dim": 96, "num_heads": 3}, "shape mismatches: encoder.cls_token (1, 1, 64) vs model (1, 1, 96)"),
        ({"depth": 3}, "missing keys: encoder.blocks.2.norm1.weight"),
        ({"depth": 1}, "unexpected keys: encoder.blocks.1.norm1.weight"),
    ],
)
def test_checkpoint_of_another_architecture_lists_mismatched_keys(checkpoint, tmp_path, edit, listed) -> None:
    state = torch.load(checkpoint, weights_only=True)
    state["model_args"] = {**state["model_args"], **edit}
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and listed in message
    assert "another architecture" in message and "re-save it" in message


def test_probe_of_a_checkpoint_of_another_architecture(checkpoint, tmp_path, write_folder, capsys) -> None:
    for split in ("train", "test"):
        write_folder(tmp_path / "data" / split / "a", 2)
        write_folder(tmp_path / "data" / split / "b", 2)
    state = torch.load(checkpoint, weights_only=True)
    state["model_args"] = {**state["model_args"], "patch_size": 8}
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    code, err = run_cli(capsys, *probe_args(path, tmp_path / "data", tmp_path / "probe"))
    assert code == 2
    assert "shape mismatches: encoder.pos_embed (1, 65, 64) vs model (1, 17, 64)" in err and "re-save it" in err


def test_checkpoint_whose_image_size_is_not_divisible_by_its_patch(checkpoint, tmp_path) -> None:
    state = torch.load(checkpoint, weights_only=True)
    state["model_args"] = {**state["model_args"], "img_size": 30}
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(path))}: cannot build .* not divisible by patch_size 4"
    ):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["torch.save", "pickle.dump"])
def test_pickle_payload_is_refused_and_never_run(tmp_path, kind) -> None:
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    if kind == "torch.save":
        torch.save({"model": {"w": torch.zeros(1)}, "model_args": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    unusual_protocol = pytest.warns(UserWarning, match="pickle protocol") if kind == "pickle.dump" else nullcontext()
    refused = pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} holds Python objects .* never runs code")
    with unusual_protocol, refused:
        load_checkpoint(path)
    assert not marker.exists()


def test_pickle_payload_via_probe_and_resume(tmp_path, write_folder, capsys) -> None:
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker), "optimizer": {}, "step": 0}, path)
    for split in ("train", "test"):
        write_folder(tmp_path / "data" / split / "a", 2)
        write_folder(tmp_path / "data" / split / "b", 2)
    code, err = run_cli(capsys, *probe_args(path, tmp_path / "data", tmp_path / "probe"))
    assert code == 2 and "holds Python objects other than tensors" in err
    images = write_folder(tmp_path / "images")
    run = [f"data.root={images}", f"train.output_dir={tmp_path / 'run'}"]
    code, err = run_cli(capsys, "pretrain", "--resume", path, *TINY_RUN, *run)
    assert code == 2 and f"checkpoint {path} holds Python objects" in err
    assert not marker.exists()


def test_checkpoint_that_is_not_a_dict(tmp_path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=r"holds a list, not a dict; save checkpoints as dicts"):
        load_checkpoint(path)


def test_resume_with_another_model_names_the_differing_keys(tmp_path, write_folder) -> None:
    images = write_folder(tmp_path / "images")
    run = [*TINY_RUN, f"data.root={images}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"]
    Pretrainer(load_config(None, run)).fit()
    with pytest.raises(CheckpointError) as caught:
        Pretrainer(load_config(None, [*run, "model.embed_dim=64"]), resume=True)
    message = str(caught.value)
    assert "model.embed_dim: 32 in the checkpoint, 64 here" in message
    assert str(tmp_path / "run" / "config.yaml") in message and "train.output_dir" in message


# ---------------------------------------------------------------- configs


def test_invalid_yaml(tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  img_size: [32\n")
    with pytest.raises(ConfigError, match=rf"(?s){re.escape(str(path))} is not valid YAML.*line 2"):
        load_config(path)
    code, err = run_cli(capsys, "info", "--config", path)
    assert code == 2 and f"{path} is not valid YAML" in err


@pytest.mark.parametrize(
    "tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system", "!!python/name:os.system"]
)
def test_yaml_with_a_python_tag_is_refused_and_never_run(tmp_path, tag) -> None:
    marker, path = tmp_path / "MARKER", tmp_path / "evil.yaml"
    path.write_text(f'model: {tag} ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} is not valid YAML.*constructor for the tag"):
        load_config(path)
    assert not marker.exists()


def test_yaml_that_is_not_a_mapping(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- mask\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} must hold a mapping of keys, got list"):
        load_config(path)


@pytest.mark.parametrize("where", ["file", "override"])
def test_unknown_key(tmp_path, where) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  depthh: 3\n" if where == "file" else "")
    expected = r"unknown key\(s\) model\.depthh in section model; did you mean model\.depth\?; valid: \[.*'depth'"
    with pytest.raises(ConfigError, match=expected):
        load_config(path, ["model.depthh=3"] if where == "override" else [])


def test_unknown_keys_each_get_their_nearest_valid_key() -> None:
    with pytest.raises(
        ConfigError,
        match=r"train\.batch_sise: did you mean train\.batch_size\?; train\.epochz: did you mean train\.epochs\?;",
    ):
        load_config(None, ["train.epochz=2", "train.batch_sise=8", "train.qqqqqq=1"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train\.qqqqqq in section train; valid:"):
        load_config(None, ["train.qqqqqq=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
        ("model.qkv_bias=maybe", "model.qkv_bias: expected true/false, got 'maybe'"),
        ("data.crop_scale=0.5", "data.crop_scale: expected a list, got 0.5"),
        ("optim.blr=.nan", "optim.blr: expected a finite number, got nan"),
        ("data.std=[.inf]", "data.std: expected a finite number, got inf"),
    ],
)
def test_wrong_type_or_non_finite_value(override, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_image_size_not_divisible_by_patch(capsys) -> None:
    expected = "model.img_size: image size 30 is not divisible by patch_size 4; use an img_size that is a multiple of 4"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, ["model.img_size=30"])
    code, err = run_cli(capsys, "info", "model.img_size=30")
    assert code == 2 and expected in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.img_size=8", "mask.ratio=0.1"], "mask.ratio: 0.1 hides no patch of the 2x2 patch grid"),
        (["data.crop_scale=[0.9, 0.2]"], "data.crop_scale: must be [low, high] with 0 < low <= high, got [0.9, 0.2]"),
        (["data.std=[0.5, 0.5]"], "data.std: give 1 or model.in_chans=1 values (one per channel)"),
    ],
)
def test_inconsistent_values_are_refused_at_load_time(overrides, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


# ---------------------------------------------------------------- images and data sets


def write_bad_files(folder: Path) -> dict[str, str]:
    """A zero-byte PNG, a truncated PNG and a truncated JPEG beside the good images; name -> expected reason."""
    good = folder / "00.png"
    (folder / "zero.png").write_bytes(b"")
    cut(good, folder / "cut.png", 0.5)
    Image.open(good).save(folder / "whole.jpg", quality=95)
    cut(folder / "whole.jpg", folder / "cut.jpg", 0.5)
    (folder / "whole.jpg").unlink()
    return {"zero.png": "cannot identify image file", "cut.png": "truncated", "cut.jpg": "truncated"}


def test_zero_byte_and_truncated_images_are_skipped_by_name(tmp_path, write_folder) -> None:
    folder = write_folder(tmp_path / "images")
    bad = write_bad_files(folder)
    with pytest.warns(BadImageWarning) as caught:
        data = build_dataset("folder", folder, img_size=32, in_chans=1, in_memory=True, num_workers=0)
    assert len(data) == 8 and data.num_skipped == 3
    assert {path.name: reason for path, reason in data.skipped}.keys() == bad.keys()
    for path, reason in data.skipped:
        assert bad[path.name] in reason.lower()
    assert {str(w.message).split()[3] for w in caught} == {str(folder / name) for name in bad}


def test_truncated_image_decoded_on_the_fly_is_replaced_and_logged(tmp_path, write_folder, caplog) -> None:
    folder = write_folder(tmp_path / "images", 4)
    write_bad_files(folder)
    with pytest.warns(BadImageWarning, match=r"zero\.png .*cannot identify"):  # header check at construction
        data = build_dataset("folder", folder, img_size=32, in_chans=1, in_memory=False, num_workers=0)
    cut_png = data.paths.index(folder / "cut.png")  # a cut PNG has a valid header: seen only when decoded
    with caplog.at_level(logging.WARNING, logger="mimkit.data.folder"):
        image, _ = data[cut_png]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert f"unreadable image {folder / 'cut.png'}" in caplog.text and "using the next image" in caplog.text


def test_pretrainer_counts_skipped_images(tmp_path, write_folder) -> None:
    folder = write_folder(tmp_path / "images")
    write_bad_files(folder)
    config = load_config(None, [*TINY_RUN, f"data.root={folder}", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.warns(BadImageWarning):
        trainer = Pretrainer(config)
    assert trainer.dataset.num_skipped == 3 and len(trainer.dataset) == 8


def test_folder_of_only_bad_images(tmp_path, write_folder, capsys) -> None:
    folder = write_folder(tmp_path / "images", 1)
    write_bad_files(folder)
    (folder / "00.png").unlink()
    run = [f"data.root={folder}", f"train.output_dir={tmp_path / 'run'}"]
    with pytest.warns(BadImageWarning):
        code, err = run_cli(capsys, "pretrain", *TINY_RUN, *run)
    assert code == 2 and f"none of the 3 image files under {folder} could be read (cut.jpg:" in err
    assert not (tmp_path / "run" / "last.pt").exists()


class _DecodeSpy:
    """Records every image file whose pixels Pillow decodes."""

    def __init__(self, monkeypatch) -> None:
        self.decoded: list[str] = []
        load = ImageFile.ImageFile.load

        def spy(image):
            self.decoded.append(Path(getattr(image, "filename", "")).name)
            return load(image)

        monkeypatch.setattr(ImageFile.ImageFile, "load", spy)


def test_decompression_bomb_is_skipped_without_decoding(tmp_path, write_folder, monkeypatch) -> None:
    folder = write_folder(tmp_path / "images", 4)
    started = time.perf_counter()
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 megapixels in about 50 kB
    assert (folder / "bomb.png").stat().st_size < 100_000 and time.perf_counter() - started < 10
    spy = _DecodeSpy(monkeypatch)
    for in_memory in (True, False):
        with pytest.warns(BadImageWarning, match=r"bomb\.png .*DecompressionBombError.*400000000 pixels"):
            data = build_dataset("folder", folder, img_size=32, in_chans=1, in_memory=in_memory, num_workers=0)
        assert len(data) == 4 and [path.name for path, _ in data.skipped] == ["bomb.png"]
    assert "bomb.png" not in spy.decoded and "00.png" in spy.decoded


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, below twice its limit
def test_image_over_a_lowered_pixel_limit_is_skipped_without_decoding(tmp_path, write_folder, monkeypatch) -> None:
    folder = write_folder(tmp_path / "images", 4)  # 28x28 = 784 pixels each
    Image.new("L", (40, 40), 128).save(folder / "big.png")  # 1600 pixels: Pillow itself only warns below 2x
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    spy = _DecodeSpy(monkeypatch)
    with pytest.warns(BadImageWarning, match=r"big\.png .*decompression bomb: 40x40 pixels exceeds .*=1000"):
        data = build_dataset("folder", folder, img_size=32, in_chans=1, in_memory=True, num_workers=0)
    assert len(data) == 4 and "big.png" not in spy.decoded


def test_float_image_of_nan_is_skipped(tmp_path, write_folder) -> None:
    folder = write_folder(tmp_path / "images", 4)
    pixels = np.full((28, 28), np.nan, dtype=np.float32)
    pixels[:10] = 2.0
    Image.fromarray(pixels, "F").save(folder / "nan.tif")
    with pytest.warns(BadImageWarning, match=r"nan\.tif .*float image holds NaN or infinite values"):
        data = build_dataset("folder", folder, img_size=32, in_chans=1, in_memory=True, num_workers=0)
    assert len(data) == 4 and bool(torch.isfinite(data.images.float()).all())


def test_nan_in_a_pretraining_step_stops_without_saving(tmp_path, write_folder) -> None:
    folder = write_folder(tmp_path / "images")
    config = load_config(None, [*TINY_RUN, f"data.root={folder}", f"train.output_dir={tmp_path / 'run'}"])
    trainer = Pretrainer(config)
    augment = trainer.augment

    def with_nan(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = augment(images, generator=generator)
        out[0, 0, 0, 0] = float("nan")  # e.g. a broken custom transform
        return out

    trainer.augment = with_nan  # type: ignore[assignment]
    with pytest.raises(
        TrainingDiverged, match=r"loss became NaN/inf between steps 0 and \d+; .*kept\. .*check the data"
    ):
        trainer.fit()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_float_images_given_to_a_pretraining_step(tmp_path, write_folder) -> None:
    folder = write_folder(tmp_path / "images")
    config = load_config(None, [*TINY_RUN, f"data.root={folder}", f"train.output_dir={tmp_path / 'run'}"])
    trainer = Pretrainer(config)
    with pytest.raises(TypeError, match=r"expected uint8 images \(0\.\.255\), got torch\.float32"):
        trainer.train_step(torch.full((4, 1, 32, 32), float("nan")))


@pytest.mark.parametrize("content", ["nothing", "no images"])
def test_empty_data_set(tmp_path, capsys, content) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    if content == "no images":
        (folder / "README.txt").write_text("not an image\n")
        Image.new("L", (28, 28)).save(folder / ".hidden.png")  # hidden files are ignored
    with pytest.raises(ValueError, match=rf"no image files \(\.png, .*\) found under {re.escape(str(folder))}"):
        build_dataset("folder", folder, img_size=32)
    code, err = run_cli(capsys, "pretrain", *TINY_RUN, f"data.root={folder}", f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and "no image files (.png" in err and str(folder) in err


def test_missing_data_set_path(tmp_path, capsys) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"image folder {re.escape(str(missing))} does not exist"):
        build_dataset("folder", missing, img_size=32)
    code, err = run_cli(capsys, "pretrain", *TINY_RUN, f"data.root={missing}", f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and f"image folder {missing} does not exist" in err


def test_fashion_mnist_root_without_its_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST file train-images-idx3-ubyte.* not found .*apt-get"):
        build_dataset("fashion_mnist", tmp_path)


def test_data_set_smaller_than_the_batch(tmp_path, write_folder, capsys) -> None:
    folder = write_folder(tmp_path / "images", 3)
    code, err = run_cli(capsys, "pretrain", *TINY_RUN, f"data.root={folder}", f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and "has 3 images, fewer than train.batch_size 4; lower the batch size or add images" in err


# ---------------------------------------------------------------- labels missing for a probe


def test_probe_of_a_flat_folder(checkpoint, tmp_path, write_folder, capsys) -> None:
    folder = write_folder(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match=r"has no train/ subfolder; .*one subfolder of images per class"):
        run_probe(checkpoint, data=folder, out_dir=tmp_path / "probe", progress=False)
    code, err = run_cli(capsys, *probe_args(checkpoint, folder, tmp_path / "probe"))
    assert code == 2 and f"{folder} has no train/ subfolder" in err


def test_probe_of_unlabelled_splits(checkpoint, tmp_path, write_folder, capsys) -> None:
    for split in ("train", "test"):
        write_folder(tmp_path / "data" / split)
    expected = f"evaluation needs labelled images: put the images of {tmp_path / 'data' / 'train'} in one subfolder"
    with pytest.raises(ValueError, match=re.escape(expected)):
        run_probe(checkpoint, data=tmp_path / "data", out_dir=tmp_path / "probe", progress=False)
    code, err = run_cli(capsys, *probe_args(checkpoint, tmp_path / "data", tmp_path / "probe"))
    assert code == 2 and expected in err
    assert not (tmp_path / "probe" / "cache").exists()  # refused before any encoder pass


def test_online_probe_on_unlabelled_images(tmp_path, write_folder) -> None:
    folder = write_folder(tmp_path / "images")
    run = [*TINY_RUN, f"data.root={folder}", f"train.output_dir={tmp_path / 'run'}", "eval.online_probe=true"]
    with pytest.raises(ValueError, match=r"eval\.online_probe needs labelled .*class subfolders or set eval\.online"):
        Pretrainer(load_config(None, run))


# ---------------------------------------------------------------- properties


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` nine times in ten, else ``invalid``: most examples build a model, the rest test the errors."""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda ok: valid if ok else invalid)


ODD_NUMBERS = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.5, 1.0, 1.5])
FRACTIONS = mostly(st.floats(0.2, 0.9), ODD_NUMBERS)


@st.composite
def image_and_patch_sizes(draw: st.DrawFn) -> tuple[int, int]:
    patch = draw(mostly(st.integers(1, 8), st.integers(-2, 0)))
    return draw(mostly(st.integers(1, 6).map(lambda grid: grid * max(patch, 1)), st.integers(-4, 40))), patch


@settings(max_examples=40, deadline=None)
@given(
    sizes=image_and_patch_sizes(),
    ratio=FRACTIONS,
    mask_type=mostly(st.just("random"), st.sampled_from(["block", "grid", "unknown"])),
    batch_size=mostly(st.integers(1, 64), st.integers(-1, 0)),
    accum_steps=mostly(st.just(1), st.integers(0, 5)),
    crop_scale=mostly(st.tuples(FRACTIONS, FRACTIONS).map(sorted), st.tuples(FRACTIONS, FRACTIONS)),
    in_chans=mostly(st.sampled_from([1, 3]), st.just(2)),
)
def test_config_values_build_a_working_model_or_name_the_key(
    sizes, ratio, mask_type, batch_size, accum_steps, crop_scale, in_chans
) -> None:
    img_size, patch_size = sizes
    overrides = [
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "model.decoder=micro",
        f"model.img_size={img_size}",
        f"model.patch_size={patch_size}",
        f"model.in_chans={in_chans}",
        f"mask.type={mask_type}",
        f"mask.ratio={ratio}",
        f"train.batch_size={batch_size}",
        f"optim.accum_steps={accum_steps}",
        f"data.crop_scale=[{crop_scale[0]}, {crop_scale[1]}]",
    ]
    try:
        config = load_config(None, overrides)
    except ConfigError as err:
        assert re.match(r"(model|mask|target|data|train|optim)\.[a-z_]+: ", str(err)), str(err)
        return
    mean, std = config.normalization()
    augment = MAEAugment(img_size, scale=config.data.crop_scale, ratio=config.data.crop_ratio, mean=mean, std=std)
    stored = torch.randint(0, 256, (2, in_chans, img_size + 3, img_size + 3), dtype=torch.uint8)
    images = augment(stored, generator=torch.Generator().manual_seed(0))  # (2, C, S, S)
    out = build_model(config)(images, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, in_chans, img_size, img_size)
    assert bool(torch.isfinite(out.loss)), overrides


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(1, 96),
    height=st.integers(1, 96),
    img_size=st.integers(1, 40),
    mode=st.sampled_from(["L", "RGB", "RGBA", "I;16", "1"]),
    in_memory=st.booleans(),
)
def test_any_image_size_loads_as_a_square(fmnist, width, height, img_size, mode, in_memory) -> None:
    image = Image.fromarray(fmnist[0], "L").resize((width, height))
    image = image.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    with tempfile.TemporaryDirectory() as folder:
        image.save(Path(folder) / "image.png")
        data = build_dataset("folder", folder, img_size=img_size, in_chans=3, in_memory=in_memory, num_workers=0)
        pixels, label = data[0]
    assert pixels.shape == (3, img_size, img_size) and pixels.dtype == torch.uint8 and label == -1
    out = MAEAugment(img_size)(pixels[None], generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, img_size, img_size) and bool(torch.isfinite(out).all())
