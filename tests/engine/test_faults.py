"""Runs killed at any moment, restarted by torchrun, or out of disk lose nothing: real processes, real kills."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mimkit.engine.pretrain import Pretrainer
from mimkit.files import (
    CheckpointError,
    check_free_space,
    load_checkpoint_file,
    remove_stale_temporaries,
    save_checkpoint,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN = ["train.epochs=8", "data.limit=256", "train.save_every_steps=1", "train.num_threads=1"]  # 128 steps
# 640 steps: far more than run before a test's kills, on any machine
SCHEDULE = ["train.epochs=40", "data.limit=256", "train.save_every_steps=1", "train.num_threads=1"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def kill_during_training(recipe: Path, run_dir: Path, resume: bool, delay: float) -> int:
    """Start ``mimkit pretrain`` (saving every step), SIGKILL it ``delay`` s after its first checkpoint;
    returns the step of the checkpoint left behind."""
    command = [sys.executable, "-m", "mimkit", "pretrain", "--config", str(recipe), *(["--resume"] if resume else [])]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = load_checkpoint_file(run_dir / "last.pt")["step"] if resume else -1
    try:
        marker = run_dir / "last.pt"
        if resume:  # wait for the resumed run's first own checkpoint
            while load_checkpoint_file(marker)["step"] == before:
                assert process.poll() is None, process.communicate()[1][-2000:]
                time.sleep(0.01)
        else:
            wait_for(marker, process)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    return int(load_checkpoint_file(run_dir / "last.pt")["step"])  # must load: never a torn file


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(path)["model"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run(
    write_recipe, tmp_path: Path, small_config, weights, one_thread
) -> None:
    recipe = write_recipe(tmp_path / "run.yaml", small_config(tmp_path / "killed", *SCHEDULE))
    rng = random.Random(0)
    first = kill_during_training(recipe, tmp_path / "killed", resume=False, delay=rng.uniform(0.05, 0.6))
    second = kill_during_training(recipe, tmp_path / "killed", resume=True, delay=rng.uniform(0.05, 0.6))
    assert 0 < first < second < 640, (first, second)
    end = f"train.max_steps={second + 16}"  # ends the run early; its schedules still span 640 steps
    done = subprocess.run(
        [sys.executable, "-m", "mimkit", "pretrain", "--config", str(recipe), end, "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    final = load_checkpoint_file(tmp_path / "killed" / "last.pt")
    assert final["step"] == second + 16
    reference = Pretrainer(small_config(tmp_path / "full", *SCHEDULE, end))
    reference.fit()
    for key, value in weights(reference).items():
        assert torch.equal(final["model"][key], value), key
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # the writes the kills tore were cleaned up
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no record twice, none from beyond a checkpoint


def test_kill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    good = tmp_path / "last.pt"
    save_checkpoint(good, {"step": 7, "model": {"w": torch.arange(4.0)}})
    ready = tmp_path / "half-written"
    # A real process writes half a checkpoint through the real atomic writer and is killed right there.
    script = f"""
import time
from pathlib import Path
import torch
from mimkit.files import atomic_write

def write(handle):
    handle.write(b"PK" + bytes(4096))  # the start of a zip that never ends
    handle.flush()
    Path({str(ready)!r}).touch()
    time.sleep(120)

atomic_write({str(good)!r}, write)
"""
    process = subprocess.Popen([sys.executable, "-c", script], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready, process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.communicate(timeout=60)
    torn = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 4096  # the kill left a torn temporary file ...
    state = load_checkpoint_file(good)  # ... and the good checkpoint untouched
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert remove_stale_temporaries(tmp_path) == torn and not list(tmp_path.glob(".*.tmp"))
    assert good.exists()


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_it_resumes(
    write_recipe, tmp_path: Path, small_config, weights, one_thread
) -> None:
    reference = Pretrainer(small_config(tmp_path / "full", *RUN))
    reference.fit()
    run_dir = tmp_path / "elastic"
    recipe = write_recipe(tmp_path / "run.yaml", small_config(run_dir, *RUN))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=1"]
    command += ["-m", "mimkit", "pretrain", "--config", str(recipe)]
    agent = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(run_dir / "last.pt", agent)
        time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        assert workers, "no worker process under torchrun"
        killed_at = load_checkpoint_file(run_dir / "last.pt")["step"]
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)  # e.g. the machine's OOM killer
        _, err = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, err[-3000:]
    assert "restarted by torchrun: resuming" in err
    assert 0 < killed_at < 128
    final = load_checkpoint_file(run_dir / "last.pt")
    assert final["step"] == 128
    for key, value in weights(reference).items():
        assert torch.equal(final["model"][key], value), key


def test_full_disk_is_reported_before_training_and_at_a_save(tmp_path: Path, small_config, monkeypatch) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 20))  # 1 MiB left
    with pytest.raises(OSError, match=r"has 1 MiB free but a checkpoint of this run needs about \d+ MiB"):
        Pretrainer(small_config(tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(OSError) as caught:
        check_free_space(tmp_path, 10 * 2**20)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()

    # The disk fills up during a save: a clear error and the previous checkpoint is intact.
    good = tmp_path / "last.pt"
    save_checkpoint(good, {"step": 1})

    def full_disk(state, handle) -> None:
        handle.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"no space left to write .*previous checkpoint there is intact"):
        save_checkpoint(good, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint_file(good)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
