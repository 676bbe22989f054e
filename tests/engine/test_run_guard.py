"""Runs that survive their environment: stop signals, a second writer, a full disk, wrong paths.

The fault tests drive ``mimkit pretrain`` in real subprocesses and send real signals.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mimkit.cli import main
from mimkit.engine import distributed
from mimkit.engine.pretrain import Pretrainer
from mimkit.engine.run_guard import (
    LOCK_NAME,
    STOPPED_EXIT_STATUS,
    RunDirectoryInUse,
    RunLock,
    StoppedAtOnce,
    StopSignals,
)
from mimkit.files import DiskFullError, load_checkpoint_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# 640 steps: far more than run before a test's signal lands, on any machine; a run stopped at step s is
# resumed to s + 16 with train.max_steps, which ends a run early without changing its schedules.
SCHEDULE = ["train.epochs=40", "data.limit=256", "train.num_threads=1"]
LONG = ["train.epochs=40", "data.limit=256", "train.num_threads=1", "train.save_every_steps=1"]  # 640 steps


def pretrain(recipe: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "mimkit", "pretrain", "--config", str(recipe), *args]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for ``process``; its stderr."""
    return process.communicate(timeout=timeout)[1]


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended first: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def worker(agent: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun ``agent``'s worker of ``rank``, once the agent has started it."""
    deadline = time.monotonic() + timeout
    while True:
        children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return int(pid)
        assert agent.poll() is None, f"the run ended first: {agent.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def has_a_record(run_dir: Path) -> Callable[[], bool]:
    path = run_dir / "metrics.jsonl"
    return lambda: path.exists() and path.stat().st_size > 0


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_equals_the_uninterrupted_run(
    write_recipe, tmp_path: Path, small_config, weights, one_thread
) -> None:
    run_dir = tmp_path / "stopped"
    recipe = write_recipe(tmp_path / "run.yaml", small_config(run_dir, *SCHEDULE))
    process = pretrain(recipe)
    wait_until(has_a_record(run_dir), process)  # mid-epoch, past the first logged steps
    process.send_signal(signal.SIGTERM)
    err = finish(process)
    assert process.returncode == STOPPED_EXIT_STATUS, err[-2000:]
    stopped = re.fullmatch(
        r"mimkit pretrain: stopped by SIGTERM after step (\d+); saved (.+), continue with --resume",
        err.strip().splitlines()[-1],
    )
    assert stopped, err[-2000:]
    step = int(stopped[1])
    assert 0 < step < 640
    assert stopped[2] == str(run_dir / "last.pt") and load_checkpoint_file(run_dir / "last.pt")["step"] == step
    assert not (run_dir / LOCK_NAME).exists()  # the stopped run left the directory free

    end = f"train.max_steps={step + 16}"  # the schedule still spans 640 steps
    resumed = pretrain(recipe, end, "--resume")
    err = finish(resumed)
    assert resumed.returncode == 0, err[-2000:]
    final = load_checkpoint_file(run_dir / "last.pt")
    assert final["step"] == step + 16
    reference = Pretrainer(small_config(tmp_path / "full", *SCHEDULE, end))
    reference.fit()
    for key, value in weights(reference).items():
        assert torch.equal(final["model"][key], value), key
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(
    write_recipe, tmp_path: Path, small_config
) -> None:
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "run.yaml", small_config(run_dir, *LONG))
    first = pretrain(recipe)
    try:
        wait_until((run_dir / "last.pt").exists, first)
        holder = json.loads((run_dir / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = pretrain(recipe, "--resume")
        err = finish(second)
        assert second.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1] == (
            f"mimkit pretrain: error: train.output_dir {run_dir} is in use by another run (pid {first.pid} on "
            f"{socket.gethostname()}, started {holder['date']}); wait for it to end or stop it, or choose another "
            "train.output_dir"
        )
        assert first.poll() is None, "the first run ended before the second was refused; make it longer"
    finally:
        first.send_signal(signal.SIGKILL)  # e.g. the machine's OOM killer: the lock file stays behind
        finish(first)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == first.pid
    killed_at = int(load_checkpoint_file(run_dir / "last.pt")["step"])

    third = pretrain(recipe, f"train.max_steps={killed_at + 2}", "--resume")
    err = finish(third)
    assert third.returncode == 0, err[-2000:]
    assert f"taking over the lock of {run_dir} from pid {first.pid} on {socket.gethostname()}" in err
    assert load_checkpoint_file(run_dir / "last.pt")["step"] == killed_at + 2
    assert not (run_dir / LOCK_NAME).exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs, unmounted afterwards (room for two checkpoints and the up-front check's 16 MiB of slack)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the in-process test covers it")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_disk_that_fills_up_mid_run_stops_with_one_line_and_keeps_the_checkpoint(
    write_recipe, small_disk: Path, small_config
) -> None:
    run_dir = small_disk / "run"
    recipe = write_recipe(small_disk.parent / "run.yaml", small_config(run_dir, *LONG))
    process = pretrain(recipe)
    try:
        wait_until((run_dir / "last.pt").exists, process)
        with open(small_disk / "filler", "wb") as filler:  # another process takes all but 64 KiB
            os.posix_fallocate(filler.fileno(), 0, shutil.disk_usage(small_disk).free - 64 * 1024)
    except BaseException:
        process.kill()
        raise
    err = finish(process)
    assert process.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    full = re.fullmatch(
        r"mimkit pretrain: error: no space left to write (.+): ([\d.]+) (KiB|B) free in (.+), about ([\d.]+) "
        r"(KiB|MiB) needed; the previous checkpoint there is intact\. Free disk space, then resume",
        line,
    )
    assert full, line
    assert full[4] == str(run_dir) and Path(full[1]).parent == run_dir
    assert float(full[2]) <= 64  # the space free, as the run saw it
    state = load_checkpoint_file(run_dir / "last.pt")  # the previous checkpoint loads
    assert 0 < state["step"] < 640
    assert not list(run_dir.glob(".*.tmp"))

    (small_disk / "filler").unlink()  # space is back: the run resumes
    resumed = pretrain(recipe, f"train.max_steps={state['step'] + 1}", "--resume")
    err = finish(resumed)
    assert resumed.returncode == 0, err[-2000:]
    assert load_checkpoint_file(run_dir / "last.pt")["step"] == state["step"] + 1


def test_torch_reporting_a_full_disk_as_unexpected_pos_names_the_space(
    tmp_path: Path, small_config, monkeypatch
) -> None:
    trainer = Pretrainer(small_config(tmp_path, "train.save_every_steps=1"))
    real_save = torch.save

    def fills_up(state, handle) -> None:  # what torch's zip writer raises when the disk fills mid-file
        if state["step"] < 3:
            return real_save(state, handle)
        handle.write(b"PK\x03\x04" + bytes(1000))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 997696 vs 997584")

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(DiskFullError, match=r"no space left to write .*last.pt: .* free in .*, about .* needed"):
        trainer.fit()
    monkeypatch.undo()
    assert load_checkpoint_file(tmp_path / "last.pt")["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_while_logging_names_the_file_and_the_space(tmp_path: Path, small_config, monkeypatch) -> None:
    trainer = Pretrainer(small_config(tmp_path))
    real_open = Path.open

    def no_space(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_space)
    with pytest.raises(DiskFullError) as caught:
        trainer.fit()
    assert caught.value.path == tmp_path / "metrics.jsonl" and caught.value.needed > 0
    assert re.search(r"metrics.jsonl: [\d.]+ \w+ free in .*, about \d+ B needed", str(caught.value))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.output_dir={file}"],
            "train.output_dir {file} is a file, not a folder; choose another train.output_dir",
        ),
        (
            ["train.output_dir={file}/run"],
            "train.output_dir {file}/run cannot be made: {file} is a file; choose another train.output_dir",
        ),
        (["data.dataset=folder", "data.root={missing}"], "data.root={missing}: image folder {missing} does not exist"),
        (
            ["target.type=maskdistill", "target.teacher.spec={missing}"],
            "target.teacher.spec {missing} does not exist",
        ),
    ],
)
def test_a_wrong_path_names_its_key(tmp_path: Path, capsys, overrides: list[str], message: str) -> None:
    file, missing = tmp_path / "a_file", tmp_path / "missing"
    file.write_text("not a folder")
    defaults = [f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "log.tensorboard=false"]
    values = {"file": file, "missing": missing}
    assert main(["pretrain", *defaults, *(item.format(**values) for item in overrides)]) == 2
    assert capsys.readouterr().err.strip() == f"mimkit pretrain: error: {message.format(**values)}"
    assert not (tmp_path / "run").exists()  # nothing made for a run that never started


def test_a_second_signal_stops_at_once_and_the_handlers_are_put_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested and signals.agreed()
        with pytest.raises(StoppedAtOnce) as caught:
            signal.raise_signal(signal.SIGTERM)
    assert caught.value.exit_status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_handled_as_the_ranks_agree_is_kept_for_the_next_step(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # one of two ranks, as under torchrun
    seen: list[bool] = []

    def any_rank(flag: bool, device: torch.device) -> bool:
        seen.append(bool(flag))
        if len(seen) == 1:  # no rank had a request; the signal arrives while the all-reduce runs, and Python
            signal.raise_signal(signal.SIGTERM)  # handles it as the all-reduce returns
            return False
        return bool(flag)

    monkeypatch.setattr(distributed, "any_rank", any_rank)
    with StopSignals() as signals:
        assert not signals.agreed()  # this step's answer was already taken
        assert signals.requested and signals.agreed()  # the request stops the run after the next step
    assert seen == [False, True]


def test_under_torchrun_the_launcher_passing_the_signal_on_is_one_request(monkeypatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGTERM)  # from the scheduler ...
        signal.raise_signal(signal.SIGTERM)  # ... and again from torchrun's agent
        assert signals.requested
        with pytest.raises(StoppedAtOnce):
            signal.raise_signal(signal.SIGINT)  # another signal still stops at once


def test_a_lock_names_a_live_holder_even_where_file_locks_are_missing(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        record = {"pid": sleeper.pid, "host": socket.gethostname(), "start": start, "date": "then"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))  # its holder took no flock
        with pytest.raises(RunDirectoryInUse, match=rf"in use by another run \(pid {sleeper.pid} on"):
            RunLock(tmp_path).acquire()
        record["start"] = start + 1  # the same pid, now another process: the holder is gone
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        with RunLock(tmp_path) as lock, RunLock(tmp_path):  # one process may open its own run twice
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert not (tmp_path / LOCK_NAME).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_sigterm_to_one_of_two_torchrun_ranks_stops_both_after_the_same_step(
    write_recipe, tmp_path: Path, small_config
) -> None:
    two = ["train.epochs=40", "data.limit=256", "train.num_threads=1", "train.batch_size=8"]  # 640 steps of 2 x 8

    def torchrun(run_dir: Path, *args: str) -> subprocess.Popen:
        recipe = write_recipe(tmp_path / f"{run_dir.name}.yaml", small_config(run_dir, *two))
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        launch += ["--log-dir", str(tmp_path / "logs" / run_dir.name), "--redirects=3"]  # a file per rank
        launch += ["-m", "mimkit", "pretrain", "--config", str(recipe), *args]
        return subprocess.Popen(launch, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    run_dir = tmp_path / "stopped"
    agent = torchrun(run_dir)
    try:
        signalled = worker(agent, rank=1)  # looked up first, so that the signal follows the record at once
        wait_until(has_a_record(run_dir), agent)
        os.kill(signalled, signal.SIGTERM)  # rank 1 alone is asked to stop; rank 0 learns it in the all-reduce
        agent_err = finish(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
    last_lines = [
        next(tmp_path.glob(f"logs/stopped/*/attempt_0/{rank}/stderr.log")).read_text().strip().splitlines()[-1]
        for rank in (0, 1)
    ]
    stop = r"mimkit pretrain: stopped by {} after step (\d+); saved {}, continue with --resume"
    rank_zero = re.fullmatch(
        stop.format("a stop signal on another rank", re.escape(str(run_dir / "last.pt"))), last_lines[0]
    )
    rank_one = re.fullmatch(stop.format("SIGTERM", re.escape(str(run_dir / "last.pt"))), last_lines[1])
    assert rank_zero and rank_one and rank_zero[1] == rank_one[1], (last_lines, agent_err[-3000:])
    step = int(rank_zero[1])
    assert 0 < step < 640 and load_checkpoint_file(run_dir / "last.pt")["step"] == step  # rank 0 wrote it

    end = f"train.max_steps={step + 16}"  # the schedule still spans 640 steps
    resumed = torchrun(run_dir, end, "--resume")
    err = finish(resumed)
    assert resumed.returncode == 0, err[-3000:]
    uninterrupted = torchrun(tmp_path / "full", end)
    err = finish(uninterrupted)
    assert uninterrupted.returncode == 0, err[-3000:]
    final, full = (load_checkpoint_file(path / "last.pt") for path in (run_dir, tmp_path / "full"))
    assert final["step"] == full["step"] == step + 16
    for key, value in full["model"].items():
        assert torch.equal(final["model"][key], value), key
