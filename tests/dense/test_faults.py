"""Detection and segmentation runs against their environment: a stop signal, wrong paths."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch

from mimkit.engine.run_guard import LOCK_NAME, TrainingInterrupted
from mimkit.tasks.detect import run_detect_train
from mimkit.tasks.segment import SegConfig, run_seg_train


def test_sigterm_saves_the_step_and_resume_ends_with_the_uninterrupted_weights(
    shapes_root: Path, tmp_path: Path, tiny_config, monkeypatch
) -> None:
    from torchvision.models.detection import MaskRCNN

    config = tiny_config
    config.data.train, config.train.max_steps = str(shapes_root), 5
    config.train.output_dir = str(tmp_path / "full")
    run_detect_train(config)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]

    config.train.output_dir = str(tmp_path / "stopped")
    real_forward = MaskRCNN.forward
    calls = {"n": 0}

    def signalled_in_step_three(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGTERM)  # as a scheduler would, half-way through the step
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "forward", signalled_in_step_three)
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM after step 3; saved .*last.pt, continue with"):
        run_detect_train(config)
    monkeypatch.undo()
    assert torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["step"] == 3
    assert not (tmp_path / "stopped" / LOCK_NAME).exists()
    resumed = run_detect_train(config, resume=True)
    assert resumed["train"]["resumed_at"] == 3 and resumed["train"]["steps"] == 5
    state = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    for key, value in full.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("key", ["model.checkpoint", "data.train", "data.val", "data.train_annotations"])
def test_a_missing_path_names_its_key_before_anything_loads(
    shapes_root: Path, tmp_path: Path, tiny_config, key: str
) -> None:
    tiny_config.data.train = str(shapes_root)
    section, name = key.split(".")
    setattr(getattr(tiny_config, section), name, str(tmp_path / "missing"))
    tiny_config.train.output_dir = str(tmp_path / "run")
    with pytest.raises(
        FileNotFoundError, match=f"^{re.escape(key)} {re.escape(str(tmp_path))}/missing does not exist$"
    ):
        run_detect_train(tiny_config)
    assert not (tmp_path / "run").exists()


def test_a_segmentation_run_into_a_file_names_train_output_dir(tmp_path: Path) -> None:
    config = SegConfig()
    config.train.output_dir = str(tmp_path / "a_file")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"^train\.output_dir .*a_file is a file, not a folder"):
        run_seg_train(config)
