"""Self-guided masking inside one pretraining run: the switch, its logging, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mimkit.engine.logging import read_metrics
from mimkit.engine.pretrain import Pretrainer
from mimkit.files import load_checkpoint_file
from mimkit.tasks.pretrain import run_pretraining

SELF_GUIDED = ["mask.type=self_guided", "train.epochs=3", "log.every_steps=1"]


def test_switches_at_the_configured_epoch_and_logs_it(tmp_path: Path, small_config) -> None:
    trainer = Pretrainer(
        small_config(tmp_path, *SELF_GUIDED, "mask.self_guided.trigger=epoch", "mask.self_guided.start_epoch=1")
    )
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
    assert not any("exploitation/mask" in r for r in records)  # the epoch trigger needs no measurement
    state = load_checkpoint_file(tmp_path / "last.pt")
    assert state["masker"]["state"]["switch_step"] == 4 and state["masker"]["state"]["curve"] == []


def expected_switch(windows: list[tuple[int, float, float]], patience: int) -> int | None:
    """The paper's crossing on the check means: mask above visible for ``patience`` checks after a check below."""
    seen_below, streak = False, 0
    for check, visible, mask in windows:
        if mask > visible:
            streak += int(seen_below)
        else:
            seen_below, streak = True, 0
        if streak >= patience:
            return check
    return None


def test_exploitation_trigger_measures_logs_and_decides(tmp_path: Path, small_config) -> None:
    overrides = ["mask.exploitation_every_steps=1", "mask.self_guided.trigger_every_steps=2"]
    summary = run_pretraining(small_config(tmp_path, *SELF_GUIDED, *overrides))
    trainer_masker = load_checkpoint_file(tmp_path / "last.pt")["masker"]["state"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    curves = [
        (r["step"], r["exploitation/visible"], r["exploitation/mask"]) for r in records if "exploitation/mask" in r
    ]
    switch = trainer_masker["switch_step"]
    assert summary["self_guided_switch_step"] == switch
    assert json.loads((tmp_path / "summary.json").read_text())["self_guided_switch_step"] == switch
    measured_until = switch if switch is not None else 12
    assert [step for step, _, _ in curves] == list(range(1, measured_until + 1))  # one batch every step
    assert all(0 < v < 1 and v + m == pytest.approx(1.0, abs=1e-5) for _, v, m in curves)
    # A fresh decoder attends almost uniformly: each share is near its token fraction (mask ratio 0.75).
    assert curves[0][2] == pytest.approx(0.75, abs=0.05)
    # Every check (every 2 steps) saw the mean of the steps since the last one, and the checkpoint keeps them.
    windows = []
    for check in range(2, 13, 2):
        window = [(v, m) for step, v, m in curves if check - 2 < step <= check]
        if window:
            windows.append((check, sum(v for v, _ in window) / 2, sum(m for _, m in window) / 2))
    kept = [(int(step), visible, mask) for step, _, visible, mask in trainer_masker["curve"]]
    assert [check for check, _, _ in kept] == [check for check, _, _ in windows][: len(kept)]
    for (_, visible, mask), (_, v, m) in zip(kept, windows, strict=False):
        assert visible == pytest.approx(v, abs=1e-5) and mask == pytest.approx(m, abs=1e-5)
    assert switch == expected_switch(windows, patience=1)


PRIMED = [
    *SELF_GUIDED,
    "mask.exploitation_every_steps=1",
    "mask.self_guided.trigger_every_steps=2",
    "mask.self_guided.trigger_patience=2",
]


def primed(trainer: Pretrainer) -> Pretrainer:
    """As if an earlier check had seen mask tokens exploited less: the next two checks above switch."""
    trainer.model.masker.seen_below = True  # type: ignore[union-attr]
    return trainer


def test_resume_across_an_exploitation_switch_equals_uninterrupted(tmp_path: Path, small_config, weights) -> None:
    full = primed(Pretrainer(small_config(tmp_path / "full", *PRIMED)))
    full.fit()
    assert full.model.masker.switch_step == 4  # checks at 2 and 4 both above (the tiny decoder stays near r)
    first = primed(Pretrainer(small_config(tmp_path / "split", *PRIMED, "train.max_steps=3")))
    first.fit()  # stops mid-streak and mid-window: one check done, one measurement pending
    assert first.model.masker.switch_step is None and first.model.masker.streak == 1
    resumed = Pretrainer(small_config(tmp_path / "split", *PRIMED), resume=True)
    assert resumed.model.masker.streak == 1 and resumed.model.masker.seen_below
    resumed.fit()
    assert resumed.model.masker.switch_step == 4
    assert resumed.model.masker.curve == full.model.masker.curve
    a, b = weights(full), weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_keeps_the_switch_and_equals_uninterrupted(tmp_path: Path, small_config, weights) -> None:
    overrides = [*SELF_GUIDED, "mask.self_guided.trigger=epoch", "mask.self_guided.start_epoch=1"]
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


def test_a_checkpoint_whose_loop_kept_the_trigger_window_resumes_exactly(tmp_path: Path, small_config, weights) -> None:
    full = primed(Pretrainer(small_config(tmp_path / "full", *PRIMED)))
    full.fit()
    first = primed(Pretrainer(small_config(tmp_path / "split", *PRIMED, "train.max_steps=3")))
    first.fit()  # one measurement pending in the window
    path = tmp_path / "split" / "last.pt"
    state = load_checkpoint_file(path)
    window = state["masker"]["state"].pop("window")
    assert window[2] == 1.0  # the pending measurement
    # the earlier layout: the loop saved the trigger's window and the logging window beside the masker's state
    state["masker"]["exploitation_trigger"] = window
    state["masker"]["exploitation_log"] = state.pop("exploitation_log")
    torch.save(state, path)
    resumed = Pretrainer(small_config(tmp_path / "split", *PRIMED), resume=True)
    assert resumed.model.masker.window == window
    resumed.fit()
    assert resumed.model.masker.switch_step == 4 and resumed.model.masker.curve == full.model.masker.curve
    a, b = weights(full), weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
