"""engine.loop.TrainLoop, the step every training task shares, on a small real model: the lr of each group,
the divergence check, clipping, the logging window, periodic saves and the stop signals."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.engine.divergence import TrainingDiverged
from mimkit.engine.loop import TrainLoop
from mimkit.engine.run_guard import TrainingInterrupted


class Records:
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, Any]]] = []

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.records.append((step, metrics))


def model_and_data(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.randn(40, 6), torch.randint(0, 3, (40,))


def loss_of(model: nn.Module, inputs: Tensor, labels: Tensor, step: int) -> Tensor:
    rows = slice(8 * (step % 5), 8 * (step % 5) + 8)
    return F.cross_entropy(model(inputs[rows]), labels[rows])


def schedule(step: int) -> float:
    return 0.1 / (1 + step)


def test_steps_equal_a_hand_written_loop_with_clipping_bit_for_bit() -> None:
    model, inputs, labels = model_and_data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    with TrainLoop(optimizer, schedule, total_steps=6, task="toy", lower="lr", clip_grad=0.05) as loop:
        while not loop.done:
            step = loop.step
            loop.run_step(lambda: loss_of(model, inputs, labels, step))  # noqa: B023 (called at once)

    reference, _, _ = model_and_data()
    by_hand = torch.optim.AdamW(reference.parameters(), lr=1.0)
    clipped = []
    for step in range(6):
        for group in by_hand.param_groups:
            group["lr"] = schedule(step)
        loss = loss_of(reference, inputs, labels, step)
        by_hand.zero_grad(set_to_none=True)
        loss.backward()
        clipped.append(float(nn.utils.clip_grad_norm_(reference.parameters(), 0.05)) > 0.05)
        by_hand.step()
    assert all(clipped)  # the norm was above the limit at every step, so the clip acted
    for (name, param), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(param, expected), name
    grads = torch.stack([p.grad.norm() for p in model.parameters()])  # the last step's clipped gradients
    assert math.isclose(float(grads.norm()), 0.05, rel_tol=1e-4)


def test_each_group_gets_the_schedule_times_its_lr_scale() -> None:
    model, inputs, labels = model_and_data()
    first, second = model[0], model[2]
    optimizer = torch.optim.SGD(
        [
            {"params": first.parameters(), "lr_scale": 0.25},
            {"params": [second.weight], "lr_scale": 0.5},
            {"params": [second.bias]},  # no lr_scale: the schedule's value itself
        ],
        lr=1.0,
    )
    seen: list[list[float]] = []
    with TrainLoop(
        optimizer,
        schedule,
        total_steps=3,
        task="toy",
        lower="lr",
        on_update=lambda _: seen.append([group["lr"] for group in optimizer.param_groups]),
    ) as loop:
        while not loop.done:
            loop.run_step(lambda: loss_of(model, inputs, labels, 0))
    assert seen == [[schedule(s) * 0.25, schedule(s) * 0.5, schedule(s)] for s in range(3)]
    assert loop.lr == schedule(2)


def test_a_nan_loss_raises_naming_the_task_the_step_and_the_key_before_any_update() -> None:
    model, inputs, labels = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = TrainLoop(
        optimizer, schedule, total_steps=5, task="toy training", lower="train.lr", context=" with peak lr 0.1"
    )
    with loop:
        loop.run_step(lambda: loss_of(model, inputs, labels, 0))
        loop.run_step(lambda: loss_of(model, inputs, labels, 1))
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(
            TrainingDiverged, match=r"^toy training diverged at step 2 \(loss nan\) with peak lr 0\.1; lower train\.lr$"
        ):
            loop.run_step(lambda: loss_of(model, inputs, labels, 2) * math.nan)
    assert loop.step == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_the_window_means_are_logged_every_n_steps_and_at_the_last() -> None:
    model, inputs, labels = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = Records()
    losses: list[float] = []

    def compute(step: int) -> tuple[Tensor, dict[str, Tensor]]:
        loss = loss_of(model, inputs, labels, step)
        return loss, {"half": loss / 2}

    with TrainLoop(
        optimizer,
        schedule,
        total_steps=5,
        task="toy",
        lower="lr",
        metrics=logger,
        log_every_steps=2,
        on_update=lambda loss: losses.append(loss.item()),
        on_log=lambda step, means: {"extra": step},
    ) as loop:
        while not loop.done:
            step = loop.step
            loop.run_step(lambda: compute(step))  # noqa: B023 (called at once)
    assert [step for step, _ in logger.records] == [2, 4, 5]
    windows = [losses[0:2], losses[2:4], losses[4:5]]
    for (step, record), window in zip(logger.records, windows, strict=True):
        assert list(record) == ["train/loss", "train/half", "train/lr", "extra"]
        assert record["train/loss"] == sum(window) / len(window) and record["extra"] == step
        assert math.isclose(record["train/half"], record["train/loss"] / 2, rel_tol=1e-6)
        assert record["train/lr"] == schedule(step - 1)
    assert loop.last["loss"] == losses[4]


def test_a_run_split_by_its_state_logs_what_a_whole_run_logs() -> None:
    def run(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, state: dict[str, Any] | None) -> Any:
        _, inputs, labels = model_and_data()
        logger = Records()
        loop = TrainLoop(
            optimizer,
            schedule,
            total_steps=7,
            task="toy",
            lower="lr",
            metrics=logger,
            log_every_steps=3,
            step=steps.start,
        )
        if state is not None:
            loop.load_state_dict(state)
        with loop:
            for step in steps:
                loop.run_step(lambda: loss_of(model, inputs, labels, step))  # noqa: B023 (called at once)
        return logger.records, loop.state_dict()

    model, _, _ = model_and_data()
    whole, _ = run(model, torch.optim.SGD(model.parameters(), lr=0.1), range(7), None)
    model, _, _ = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first, state = run(model, optimizer, range(4), None)
    assert state["window_steps"] == 1 and len(state["window"]) == 1  # stopped mid-window
    second, _ = run(model, optimizer, range(4, 7), state)
    assert first + second == whole and [step for step, _ in whole] == [3, 6, 7]


def test_a_stop_signal_finishes_the_step_saves_and_raises(tmp_path: Path) -> None:
    model, inputs, labels = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved: list[int] = []

    def save() -> Path:
        saved.append(loop.step)
        return tmp_path / "last.pt"

    def compute(step: int) -> Tensor:
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # half-way through step 2, as a scheduler would
        return loss_of(model, inputs, labels, step)

    previous = signal.getsignal(signal.SIGTERM)
    loop = TrainLoop(optimizer, schedule, total_steps=6, task="toy", lower="lr", save=save, save_every_steps=2)
    stopped = r"stopped by SIGTERM after step 3; saved .*last\.pt, continue with"
    with pytest.raises(TrainingInterrupted, match=stopped), loop:
        while not loop.done:
            step = loop.step
            loop.run_step(lambda: compute(step))  # noqa: B023 (called at once)
    assert saved == [2, 3] and loop.step == 3  # the periodic save after step 2, then the stop's after step 3
    assert signal.getsignal(signal.SIGTERM) is previous  # the handlers are put back


def test_a_stop_signal_in_the_last_step_lets_the_run_end_and_no_save_follows_it() -> None:
    model, inputs, labels = model_and_data()
    saved: list[int] = []

    def compute(step: int) -> Tensor:
        if step == 2:
            signal.raise_signal(signal.SIGTERM)
        return loss_of(model, inputs, labels, step)

    with TrainLoop(
        torch.optim.SGD(model.parameters(), lr=0.1),
        schedule,
        total_steps=3,
        task="toy",
        lower="lr",
        save=lambda: saved.append(loop.step),
        save_on_log=True,
    ) as loop:
        while not loop.done:
            step = loop.step
            loop.run_step(lambda: compute(step))  # noqa: B023 (called at once)
    assert loop.step == 3 and saved == [1, 2]  # after each logged step but the last


RANKS_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from mimkit.engine.loop import TrainLoop

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
inputs, labels = torch.randn(40, 6, generator=torch.Generator().manual_seed(rank)), torch.arange(40) % 3


class Records:
    def __init__(self):
        self.records = []

    def log(self, step, metrics):
        self.records.append([step, metrics])


def run(split):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger, state, stop = Records(), {}, 4 if split else 7
    for steps in (range(0, stop), range(stop, 7)):
        loop = TrainLoop(optimizer, lambda s: 0.1, total_steps=7, task="toy", lower="lr", metrics=logger,
                         log_every_steps=3, step=steps.start)
        assert loop.ranks_agree  # two processes: they agree by default
        loop.load_state_dict(state)
        with loop:
            for step in steps:
                rows = slice(8 * (step % 5), 8 * (step % 5) + 8)
                loop.run_step(lambda: F.cross_entropy(model(inputs[rows]), labels[rows]))
        shared = [loop.agreed_state_dict()]
        dist.broadcast_object_list(shared, src=0)  # rank 0 saves it, every rank resumes from that file
        state = shared[0]
    return logger.records, state


whole, _ = run(False)
parted, _ = run(True)
if rank == 0:
    json.dump({"whole": whole, "parted": parted}, open(sys.argv[1], "w"))
dist.barrier()  # no rank tears down its communication threads while another still uses them
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not built")
def test_two_ranks_log_the_mean_over_ranks_and_resume_a_window_every_rank_agrees_on(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, str(script), str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logged = json.loads((tmp_path / "out.json").read_text())
    whole, parted = logged["whole"], logged["parted"]
    assert [step for step, _ in whole] == [3, 6, 7] == [step for step, _ in parted]
    for (_, a), (_, b) in zip(whole, parted, strict=True):
        assert a["train/lr"] == b["train/lr"]
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-12)  # the sums only add in another order
