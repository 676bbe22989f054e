"""Self-guided masking inside one pretraining run: the switch, its logging, and resume."""

from __future__ import annotations

from pathlib import Path

import torch

from mimkit.engine.checkpoint import load_checkpoint_file
from mimkit.engine.logging import read_metrics
from mimkit.engine.pretrain import Pretrainer

SELF_GUIDED = ["mask.type=self_guided", "train.epochs=3", "log.every_steps=1"]


def test_switches_at_the_configured_epoch_and_logs_it(tmp_path: Path, small_config) -> None:
    trainer = Pretrainer(small_config(tmp_path, *SELF_GUIDED, "mask.trigger=epoch", "mask.start_epoch=1"))
    masks = []
    make_mask = trainer.model.make_mask

    def recording(*args, **kwargs):
        spec = make_mask(*args, **kwargs)
        masks.append((trainer.model.masker.informed, spec.mask.sum(1).tolist()))
        return spec

    trainer.model.make_mask = recording  # type: ignore[method-assign]
    trainer.fit()
    assert [informed for informed, _ in masks] == [False] * 4 + [True] * 8  # 4 steps per epoch
    assert all(counts == [12] * 16 for _, counts in masks)  # round(0.75 * 16) hidden, informed or not
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "self_guided/switch_step" in r] == [4]
    assert not any("utilization/mask" in r for r in records)  # the epoch trigger needs no measurement
    state = load_checkpoint_file(tmp_path / "last.pt")
    assert state["masker"]["state"] == {"switch_step": 4}


def test_utilization_trigger_measures_logs_and_decides(tmp_path: Path, small_config) -> None:
    overrides = ["mask.utilization_every_steps=1", "mask.trigger_every_steps=2"]
    trainer = Pretrainer(small_config(tmp_path, *SELF_GUIDED, *overrides))
    trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    curves = [(r["step"], r["utilization/mask"], r["utilization/visible"]) for r in records if "utilization/mask" in r]
    switch = trainer.model.masker.switch_step
    measured_until = switch if switch is not None else 12
    assert [step for step, _, _ in curves] == list(range(1, measured_until + 1))  # one batch every step
    assert all(m > 0 and v > 0 for _, m, v in curves)
    # The switch happens at the first check (every 2 steps) whose mean utilization favours mask tokens.
    expected = None
    for check in range(2, 13, 2):
        window = [(m, v) for step, m, v in curves if check - 2 < step <= check]
        if window and sum(m for m, _ in window) > sum(v for _, v in window):
            expected = check
            break
    assert switch == expected


def test_resume_keeps_the_switch_and_equals_uninterrupted(tmp_path: Path, small_config, weights) -> None:
    overrides = [*SELF_GUIDED, "mask.trigger=epoch", "mask.start_epoch=1"]
    full = Pretrainer(small_config(tmp_path / "full", *overrides))
    full.fit()
    first = Pretrainer(small_config(tmp_path / "split", *overrides, "train.max_steps=6"))
    first.fit()
    assert first.model.masker.switch_step == 4
    resumed = Pretrainer(small_config(tmp_path / "split", *overrides), resume=True)
    assert resumed.model.masker.switch_step == 4 and resumed.step == 6  # restored, not re-triggered
    resumed.fit()
    a, b = weights(full), weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    records = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in records if "self_guided/switch_step" in r] == [4]
