"""What keeps a training run whole when its environment turns on it.

- :class:`StopSignals`: SIGTERM (schedulers, preemption) and SIGINT (Ctrl-C) become a request the loop
  reads between steps: it finishes the step, writes its checkpoint and stops with
  :data:`STOPPED_EXIT_STATUS`. A second signal stops at once. Under torchrun every rank agrees on the
  request (:meth:`StopSignals.agreed`), so all ranks stop after the same step.
- :class:`RunLock`: one writer per run directory. A second process is refused while the first lives; the
  lock of a process that died is taken over, with a message.
- :func:`check_output_dir` and :func:`naming_key`: a wrong path in a config names its key.

A full disk is reported by the writers themselves (:class:`~mimkit.files.DiskFullError`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import inspect
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, ParamSpec, TypeVar

import torch

from mimkit.engine import distributed

log = logging.getLogger(__name__)

# The exit status of a command stopped by a signal after a finished step (and, where the command can
# resume, its checkpoint): sysexits' EX_TEMPFAIL, "try again later". A second signal ends the process at
# once with the shell's 128 + signal number (130 for SIGINT, 143 for SIGTERM).
STOPPED_EXIT_STATUS = 75
LOCK_NAME = ".lock"
# torchrun passes a signal it receives on to its workers; a worker that got the same signal straight
# from the scheduler within this many seconds takes the two as one request.
FORWARDED_WITHIN_S = 5.0


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal ended training after a finished step; the message says what was saved."""


class StoppedAtOnce(KeyboardInterrupt):
    """A second stop signal: the step in flight was abandoned and nothing more was written."""

    def __init__(self, signum: int) -> None:
        self.exit_status = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} again: stopped at once; resume from the last checkpoint written"
        )


def under_launcher() -> bool:
    """True in a worker started by torchrun (its elastic agent sets ``TORCHELASTIC_RUN_ID``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopSignals:
    """Turn the first SIGTERM or SIGINT into a request the loop reads between steps; a second one stops at once.

    A step interrupted half-way (e.g. between the optimizer's parameter groups) would leave weights no
    checkpoint could describe, so the loop finishes the step, saves, then raises :meth:`interrupted`.
    Outside the main thread signals cannot be caught and this does nothing. Use as a context manager;
    the previous handlers are put back on exit.

    Args:
        signals: the signals that ask the run to stop.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.requested = False  # by a signal this process received
        self.signum: int | None = None  # the signal this process received first
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.restore()

    def install(self) -> StopSignals:
        """Catch the signals from now on (in the main thread; elsewhere nothing happens)."""
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the handlers back that :meth:`install` replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if under_launcher() and signum == self.signum and now - self._received_at < FORWARDED_WITHIN_S:
                return  # the launcher passing on the signal this process already got from the scheduler
            raise StoppedAtOnce(signum)
        self.signum, self._received_at, self.requested = signum, now, True
        name = signal.Signals(signum).name
        log.warning("%s received: finishing this step and saving a checkpoint (%s again to stop at once)", name, name)

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """Whether to stop after this step, the same answer on every rank (one all-reduce under torchrun).

        Every rank must call it after every step, so that all ranks stop after the same one.
        """
        if distributed.place().distributed:
            # ``requested`` is only read here. A signal that arrives during the all-reduce is handled when it
            # returns, possibly before an assignment of its result would run, which would erase the request.
            return distributed.any_rank(self.requested, torch.device(device))
        return self.requested

    def interrupted(self, step: int, saved: Path | None) -> TrainingInterrupted:
        """The error that ends the run after ``step``: it names the checkpoint written, or says that this
        command does not resume."""
        name = signal.Signals(self.signum).name if self.signum is not None else "a stop signal on another rank"
        if saved is not None:
            return TrainingInterrupted(f"stopped by {name} after step {step}; saved {saved}, continue with --resume")
        return TrainingInterrupted(
            f"stopped by {name} after step {step}; this command does not resume, so nothing was saved: run it again"
        )


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), to tell it from a later process
    given the same pid; None where /proc is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def _alive(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` (started at ``started``, when known) still runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    if state == "Z":  # exited, not yet reaped by its parent
        return False
    return started is None or _process_start(pid) == started


# run directory -> (its open lock file, holders in this process, the topmost folder the lock made, if any)
_HELD: dict[Path, tuple[int, int, Path | None]] = {}


class RunDirectoryInUse(RuntimeError):
    """Another live process writes to this run directory."""


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``directory/.lock``, which names its holder.

    The file holds the holder's pid, host, process start time and start date. A second process is refused
    while the holder lives (the kernel keeps the ``flock`` until the holder exits, however it exits); when
    the file names a process that no longer runs (killed, machine restarted), its lock is taken over with a
    warning. The file is removed on :meth:`release` (and at interpreter exit). Within one process the lock
    is shared: opening the same run twice in one program is not a second writer.

    Args:
        directory: the run directory (created if missing).
        key: the config key or option that names it, for messages.
    """

    def __init__(self, directory: str | Path, key: str = "train.output_dir") -> None:
        self.directory = Path(directory)
        self.key = key
        self.path = self.directory / LOCK_NAME
        self._holding = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock (idempotent).

        Raises:
            RunDirectoryInUse: a live process holds it; the message names the directory, pid and host.
        """
        if self._holding:
            return self
        created = None  # the topmost folder of the path that does not exist yet
        for folder in (self.directory, *self.directory.parents):
            if folder.exists():
                break
            created = folder
        self.directory.mkdir(parents=True, exist_ok=True)
        where = self.directory.resolve()
        if where in _HELD:
            fd, count, made = _HELD[where]
            _HELD[where] = (fd, count + 1, made)
            self._holding = True
            return self
        try:
            fd = self._open_locked()
        except BaseException:
            _remove_empty_folders(self.directory, created)
            raise
        holder = _read_holder(fd)
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            if holder.get("host") == socket.gethostname() and _alive(pid, holder.get("start")):
                os.close(fd)  # a file system without flock: the pid decides
                raise self._in_use(holder)
            log.warning(
                "taking over the lock of %s from pid %s on %s (started %s), which no longer runs",
                self.directory,
                holder.get("pid", "?"),
                holder.get("host", "?"),
                holder.get("date", "?"),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _process_start(os.getpid()),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        _HELD[where] = (fd, 1, created)
        self._holding = True
        return self

    def _open_locked(self) -> int:
        """The lock file, open and ``flock``-ed by this process (the file at the path, not one a releasing
        holder just unlinked)."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            except OSError as err:  # no flock on this file system: the pid check alone decides
                log.info("%s: no file locks here (%s); relying on the holder's pid", self.path, err)
                return fd
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _in_use(self, holder: dict[str, Any]) -> RunDirectoryInUse:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('date', '?')}"
        return RunDirectoryInUse(
            f"{self.key} {self.directory} is in use by another run ({who}); wait for it to end or stop it, "
            f"or choose another {self.key}"
        )

    def release(self) -> None:
        """Give the lock up; the last holder in this process removes the file (and the directory, when the
        lock made it and nothing was written there)."""
        if not self._holding:
            return
        self._holding = False
        where = self.directory.resolve()
        fd, count, created = _HELD.pop(where)
        if count > 1:
            _HELD[where] = (fd, count - 1, created)
            return
        _remove_lock_file(self.path, fd)
        _remove_empty_folders(self.directory, created)  # a run that failed before writing leaves nothing


def _remove_empty_folders(directory: Path, top: Path | None) -> None:
    """Remove ``directory`` and its parents up to ``top`` (the folders a lock made) while they are empty."""
    if top is None:
        return
    for folder in (directory, *directory.parents):
        try:
            folder.rmdir()
        except OSError:  # not empty: the run wrote something
            return
        if folder == top:
            return


def _remove_lock_file(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    os.close(fd)


@atexit.register
def _release_all() -> None:
    """A program that ends without releasing its locks leaves no lock file behind."""
    for where, (fd, _, _) in list(_HELD.items()):
        _remove_lock_file(where / LOCK_NAME, fd)
    _HELD.clear()


def _read_holder(fd: int) -> dict[str, Any]:
    """The record in an open lock file; empty when there is none (or it is cut)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


P = ParamSpec("P")
R = TypeVar("R")


def holding_run_lock(directory_of: Callable[..., str | Path], key: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated command holding the :class:`RunLock` of its run directory.

    Args:
        directory_of: the run directory, from the command's arguments (called with all of them by name,
            defaults filled in).
        key: the config key or option that names it; :func:`check_output_dir` checks it first.

    Under torchrun rank 0 alone takes the lock (it alone writes).
    """

    def decorate(command: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(command)

        @functools.wraps(command)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            directory = check_output_dir(directory_of(**arguments.arguments), key)
            if not distributed.place().is_main:
                return command(*args, **kwargs)
            with RunLock(directory, key):
                return command(*args, **kwargs)

        return run

    return decorate


def check_output_dir(directory: str | Path, key: str) -> Path:
    """``directory`` as a run directory: an existing folder, or a path a folder can be made at, writable.

    Raises:
        NotADirectoryError: it, or a folder above it, is a file (the message names ``key``).
        PermissionError: it cannot be written (the message names ``key``).
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{key} {path} is a file, not a folder; choose another {key}")
    above = path
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise NotADirectoryError(f"{key} {path} cannot be made: {above} is a file; choose another {key}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise PermissionError(f"{key} {path} is not writable")
    return path


def check_input_path(value: str | Path, key: str, kind: str = "file") -> Path:
    """An input path that must exist as a ``kind`` (``"file"``, ``"folder"`` or ``"any"``).

    Raises:
        FileNotFoundError: it does not exist (the message names ``key``).
        IsADirectoryError, NotADirectoryError: it is the other kind.
    """
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{key} {path} does not exist")
    if kind == "file" and path.is_dir():
        raise IsADirectoryError(f"{key} {path} is a folder, not a file")
    if kind == "folder" and not path.is_dir():
        raise NotADirectoryError(f"{key} {path} is a file, not a folder")
    return path


@contextlib.contextmanager
def naming_key(key: str, value: object) -> Iterator[None]:
    """Re-raise a missing- or wrong-path error from the code inside with the config key it came from.

    For readers (data sets, teachers) that report a bad path without knowing which setting named it.
    """
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        if key in str(err):
            raise
        message = err.strerror if err.strerror and err.filename else str(err)
        where = f" ({err.filename})" if err.filename else ""
        raise type(err)(f"{key}={value}: {message}{where}") from err
