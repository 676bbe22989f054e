"""A detection run asked to stop by SIGTERM saves the finished step and resumes to the same weights."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from mimkit.detection.train import run_detect_train
from mimkit.engine.run_guard import LOCK_NAME, TrainingInterrupted


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
