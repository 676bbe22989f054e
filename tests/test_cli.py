"""``mimkit`` commands end to end on a folder of real image files of every common mode, with a tiny model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.build import build_model, load_checkpoint
from mimkit.cli import main
from mimkit.config import load_config
from mimkit.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from mimkit.data.folder import BadImageWarning

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "mae_vit_tiny_fmnist.yaml"
NUM_GOOD, BAD_FILES = 20, ("fake.jpg", "truncated.png")
TINY = [
    "model.depth=2",
    "model.embed_dim=64",
    "model.num_heads=2",
    "model.decoder=micro",
    "train.batch_size=4",
    "train.epochs=1",
    "data.dataset=folder",
    "train.progress=false",
    "log.tensorboard=false",
    "eval.knn=false",
    "data.num_workers=0",
]
# save_reconstruction_grid's layout at its defaults: 1.6-inch cells at 100 dpi, 4 columns, 5 % row gaps,
# and a header of title lines (title, mask ratio, norm-pix note) plus column names.
CELL, DPI, HEADER_LINES = 1.6, 100, 4


def write_images(folder: Path) -> None:
    """20 Fashion-MNIST test images saved in every common mode, a truncated PNG, a text file posing as a
    JPEG and a README that is not an image at all."""
    if not DEFAULT_ROOT.is_dir():
        pytest.fail(f"Fashion-MNIST is missing at {DEFAULT_ROOT}: `apt-get install dataset-fashion-mnist`")
    images, _ = load_fashion_mnist(split="test")
    gray = [Image.fromarray(images[index, 0].numpy(), "L") for index in range(NUM_GOOD)]  # 28x28
    folder.mkdir()
    tint = np.array([1.0, 0.6, 0.3])
    for index, img in enumerate(gray):
        rgb = Image.fromarray((np.asarray(img)[..., None] * tint).astype(np.uint8), "RGB")
        kind = index % 7
        if kind == 0:
            img.save(folder / f"{index:02d}_gray.png")
        elif kind == 1:
            rgb.save(folder / f"{index:02d}_rgb.png")
        elif kind == 2:
            rgba = rgb.copy()
            rgba.putalpha(Image.fromarray(np.where(np.asarray(img) > 0, 255, 0).astype(np.uint8), "L"))
            rgba.save(folder / f"{index:02d}_rgba.png")
        elif kind == 3:
            rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(folder / f"{index:02d}_palette.png")
        elif kind == 4:
            sixteen = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)  # I;16
            assert sixteen.mode == "I;16"
            sixteen.save(folder / f"{index:02d}_16bit.png")
        elif kind == 5:
            rgb.convert("CMYK").save(folder / f"{index:02d}_cmyk.jpg", quality=95)
        else:
            img.save(folder / f"{index:02d}_gray.jpg", quality=95)
    png = (folder / "00_gray.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "fake.jpg").write_text("this is not a JPEG\n")
    (folder / "README.txt").write_text("not an image; ignored by extension\n")


def run(*argv: str) -> int:
    return main([str(arg) for arg in argv])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny pretraining run on the image folder: (run directory, image folder)."""
    root = tmp_path_factory.mktemp("cli")
    images, run_dir = root / "images", root / "run"
    write_images(images)
    with pytest.warns(BadImageWarning) as caught:
        code = run("pretrain", "--config", RECIPE, *TINY, f"data.root={images}", f"train.output_dir={run_dir}")
    assert code == 0
    named = " ".join(str(warning.message) for warning in caught)
    assert all(name in named for name in BAD_FILES), named
    return run_dir, images


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def grid_size(rows: int) -> tuple[int, int]:
    header = 0.1 + 0.17 * HEADER_LINES + 0.1
    return round(4 * CELL * DPI), round((rows * CELL * 1.05 + header) * DPI)


def test_pretrain_writes_a_complete_run(pretrained) -> None:
    run_dir, images = pretrained
    assert {"last.pt", "config.yaml", "metrics.jsonl", "summary.json", "reconstruction.png"} <= {
        path.name for path in run_dir.iterdir()
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_images"] == len(BAD_FILES)
    assert summary["steps"] == NUM_GOOD // 4  # one epoch of the readable images, batch 4
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == summary["steps"] and math.isfinite(records[-1]["train/loss"])
    saved = load_config(run_dir / "config.yaml")
    assert (saved.data.root, saved.model.embed_dim, saved.model.decoder) == (str(images), 64, "micro")
    model = load_checkpoint(run_dir / "last.pt")
    assert model.run_config == saved and model.config["depth"] == 2
    assert png_size(run_dir / "reconstruction.png")[0] == grid_size(1)[0]


def test_reconstruct_from_a_checkpoint_and_from_its_hf_export(pretrained, tmp_path: Path, capsys) -> None:
    run_dir, images = pretrained
    grid = tmp_path / "grid.png"
    with pytest.warns(BadImageWarning) as caught:  # bad files given first are skipped, by name
        code = run(
            "reconstruct",
            "--checkpoint",
            run_dir / "last.pt",
            "--images",
            images / "fake.jpg",
            images / "truncated.png",
            images,
            "--out",
            grid,
            "--limit",
            "5",
        )
    assert code == 0
    assert {Path(str(warning.message).split()[3]).name for warning in caught} == set(BAD_FILES)
    assert f"wrote {grid}" in capsys.readouterr().out
    assert png_size(grid) == pytest.approx(grid_size(5), abs=1)  # one row per image

    hf_dir = tmp_path / "hf"
    assert run("convert", "--to", "hf", run_dir / "last.pt", hf_dir) == 0
    assert (
        run("reconstruct", "--checkpoint", hf_dir, "--images", images, "--out", tmp_path / "hf.png", "--limit", "5")
        == 0
    )
    assert png_size(tmp_path / "hf.png") == png_size(grid)
    # Same weights, normalization and mask: identical pictures below the title (which names the checkpoint).
    top = grid_size(0)[1] + 2
    ours, theirs = (np.asarray(Image.open(path).convert("RGB"))[top:] for path in (grid, tmp_path / "hf.png"))
    assert np.array_equal(ours, theirs)
    assert ours.std() > 10  # a real picture, not a blank canvas


def test_convert_round_trip_through_mae(pretrained, tmp_path: Path, capsys) -> None:
    run_dir, _ = pretrained
    assert run("convert", "--to", "mae", run_dir / "last.pt", tmp_path / "mae.pth") == 0
    assert run("convert", "--to", "mimkit", tmp_path / "mae.pth", tmp_path / "back.pt") == 0
    assert "(mae layout)" in capsys.readouterr().out
    mae_keys = torch.load(tmp_path / "mae.pth", weights_only=True)["model"].keys()
    assert "blocks.1.attn.qkv.weight" in mae_keys and "decoder_pred.weight" in mae_keys
    original = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    back = torch.load(tmp_path / "back.pt", weights_only=True)["model"]
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], value) for key, value in original.items())


def test_info_through_the_console_script() -> None:
    script = Path(sys.executable).with_name("mimkit")
    assert script.is_file(), f"console script {script} missing: install the package with pip install -e ."
    result = subprocess.run(
        [str(script), "info", "--config", str(RECIPE)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    total = sum(p.numel() for p in build_model(load_config(RECIPE)).parameters())
    rows = [re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines()]
    table = {row[0]: row[1] for row in rows if len(row) == 2}
    assert table["total params"].startswith(f"{total:,} ")
    assert table["patches"].startswith("64 (16 visible")
    flops = int(table["pretraining forward FLOPs / image"].split()[0].replace(",", ""))
    assert flops > int(table["encoder FLOPs, visible / image"].split()[0].replace(",", "")) > 0


def test_errors_exit_2_with_an_actionable_message(pretrained, tmp_path: Path, capsys) -> None:
    run_dir, images = pretrained
    assert run("pretrain", *TINY, "model.depthh=3", f"data.root={images}", f"train.output_dir={tmp_path}") == 2
    assert "model.depthh" in capsys.readouterr().err

    before = (run_dir / "last.pt").read_bytes()
    assert run("pretrain", "--config", RECIPE, *TINY, f"data.root={images}", f"train.output_dir={run_dir}") == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'last.pt'} already exists" in err and "--resume" in err
    assert (run_dir / "last.pt").read_bytes() == before

    missing = tmp_path / "nowhere" / "last.pt"
    assert run("reconstruct", "--checkpoint", missing, "--images", images, "--out", tmp_path / "x.png") == 2
    assert str(missing) in capsys.readouterr().err

    with pytest.warns(BadImageWarning):
        code = run(
            "reconstruct",
            "--checkpoint",
            run_dir / "last.pt",
            "--images",
            images / "fake.jpg",
            "--out",
            tmp_path / "x.png",
        )
    assert code == 2
    assert "none of the 1 image files could be read" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def write_split_folder(root: Path, test_classes: tuple[str, ...] = ("bag", "trouser")) -> Path:
    """Fashion-MNIST bags (label 8) and trousers (label 1) as train/<class>/ and test/<class>/ PNG files."""
    images, labels = load_fashion_mnist(split="test")
    names = {8: "bag", 1: "trouser"}
    for split, rows in (("train", range(0, 600)), ("test", range(600, 800))):
        for index in rows:
            name = names.get(int(labels[index]))
            if name is None or (split == "test" and name not in test_classes):
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index, 0].numpy(), "L").save(folder / f"{index}.png")
    for name in test_classes:
        (root / "test" / name).mkdir(parents=True, exist_ok=True)
    return root


def test_knn_check_on_a_labelled_split_folder_and_its_errors_before_training(tmp_path: Path, capsys) -> None:
    data = write_split_folder(tmp_path / "data")
    knn = ["eval.knn=true", "eval.knn_k=5", "model.in_chans=1", "train.max_steps=4", f"data.root={data}"]
    assert run("pretrain", "--config", RECIPE, *TINY, *knn, f"train.output_dir={tmp_path / 'ok'}") == 0
    report = json.loads((tmp_path / "ok" / "summary.json").read_text())["knn"]
    assert report["train_images"] > 100 and report["test_images"] > 20
    # Bags and trousers are easy to tell apart, even for a barely trained encoder.
    assert report["pretrained"]["top1"] > 0.8 and report["random_init"]["top1"] > 0.8
    assert "kNN on the test split" in capsys.readouterr().out

    mismatched = write_split_folder(tmp_path / "mismatched", test_classes=("bag", "sneaker"))
    out = tmp_path / "bad"
    code = run("pretrain", "--config", RECIPE, *TINY, *knn, f"data.root={mismatched}", f"train.output_dir={out}")
    assert code == 2 and "differ from the training ones" in capsys.readouterr().err
    assert not (out / "last.pt").exists()  # refused before any training

    flat = data / "train" / "bag"  # a folder without class subfolders
    code = run("pretrain", "--config", RECIPE, *TINY, *knn, f"data.root={flat}", f"train.output_dir={out}")
    assert code == 2 and "eval.knn needs labelled training images" in capsys.readouterr().err
    assert not (out / "last.pt").exists()
