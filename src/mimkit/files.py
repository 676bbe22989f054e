"""The files a run writes and reads: atomic writes (a partial file never replaces a good one), one-line
errors for a full disk, and safe loading of checkpoint files, whole or as an FSDP run's per-rank shards.

A leaf: it imports nothing from mimkit, so every package can save and read its files through it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a mimkit checkpoint."""


class DiskFullError(CheckpointError):
    """A run's file could not be written for lack of space; the file it would have replaced is intact.

    Attributes:
        path: the file that was being written.
        free: bytes free on its file system after the failed write was removed.
        needed: about how many bytes the file needs.
    """

    def __init__(self, path: Path, free: int, needed: int) -> None:
        self.path, self.free, self.needed = path, free, needed
        super().__init__(
            f"no space left to write {path}: {format_bytes(free)} free in {path.parent}, about "
            f"{format_bytes(needed)} needed; the previous checkpoint there is intact. Free disk space, then resume"
        )


def format_bytes(size: int) -> str:
    """``size`` in the largest binary unit that keeps it above 1: ``512 B``, ``3.2 MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def is_disk_full(err: BaseException) -> bool:
    """True for an error a full disk (or exhausted quota) raises: ``ENOSPC``/``EDQUOT``, or the zip writer of
    ``torch.save``, which reports a short write as ``unexpected pos ... vs ...`` or ``file write failed``."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, RuntimeError) and any(
            sign in str(seen) for sign in ("No space left", "unexpected pos", "file write failed")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_error(path: str | Path, needed: int) -> DiskFullError:
    """The :class:`DiskFullError` of a failed write of about ``needed`` bytes to ``path``, with the space
    free there now."""
    path = Path(path)
    directory = path.parent
    while not directory.exists():
        directory = directory.parent
    return DiskFullError(path, shutil.disk_usage(directory).free, needed)


def atomic_write(path: str | Path, write: Any, needed: int | None = None) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync, then rename over ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to (re)place.
        write: writes the whole content to the binary file object it is given.
        needed: about how many bytes the file takes, for the message of a full disk (default: what
            was written before the disk filled up).

    Raises:
        DiskFullError: no space left (one line naming the file, the space free and the space needed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full_error(path, max(needed or 0, written)) from err
        raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` a checkpoint dict atomically.

    Raises:
        DiskFullError: the disk is full (the previous checkpoint at ``path`` is left as it was).
    """
    atomic_write(path, lambda handle: torch.save(state, handle), needed=state_bytes(state))


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves when its process is killed mid-write.

    Only names of the form ``.<name>.<random>.tmp`` are touched. Returns the removed paths.
    """
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for tmp in directory.glob(f".*{TEMP_SUFFIX}"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        log.info("removed %d unfinished checkpoint write(s) in %s", len(removed), directory)
    return removed


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about the size of its checkpoint file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def check_free_space(directory: str | Path, needed: int) -> None:
    """Fail before training, not at the first save, when ``directory`` cannot hold a checkpoint.

    An atomic save writes the new file beside the old one, so ``needed`` bytes (plus 5% and 16 MiB of
    slack) must be free.

    Raises:
        OSError: (ENOSPC) with both sizes and what to do.
    """
    directory = Path(directory)
    while not directory.exists():
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    want = int(needed * 1.05) + 16 * 2**20
    if free < want:
        raise OSError(
            errno.ENOSPC,
            f"{directory} has {free / 2**20:.0f} MiB free but a checkpoint of this run needs about "
            f"{want / 2**20:.0f} MiB; free disk space or choose another train.output_dir",
        )


def error_summary(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters), for errors of third-party readers.

    Some readers raise errors with an empty message (``torch.load`` of a cut file: a bare ``EOFError``).
    """
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def load_checkpoint_file(
    path: str | Path, map_location: str | torch.device = "cpu", *, merge_shards: bool = True
) -> dict[str, Any]:
    """Load a checkpoint dict safely (``weights_only=True``: no code from the file is executed).

    A sharded checkpoint (an FSDP run's ``last.pt``, which names a folder of per-rank shard files) is
    returned whole: its shards are read and concatenated, so one process can evaluate or resume it.
    ``merge_shards=False`` returns the small ``last.pt`` itself (its ``sharded`` entry names the shards).

    Raises:
        CheckpointError: missing, truncated or unreadable file (or shard), with the path and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): its save or copy did not finish; use an earlier checkpoint"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain values; mimkit never "
                "runs code stored in a checkpoint, so re-save it as a plain state dict (torch.save(model.state_dict()))"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} could not be read ({error_summary(err)}); "
            "it may be truncated or not a PyTorch checkpoint; use an earlier checkpoint"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict; save checkpoints as dicts, e.g. "
            "torch.save({'model': model.state_dict()}, path)"
        )
    if merge_shards and "sharded" in state:
        state = merged_sharded_state(path, state, map_location)
    return state


SHARDS_DIR = "shards"


def shard_path(directory: Path, rank: int) -> Path:
    """The file rank ``rank`` writes its shards to."""
    return directory / f"rank_{rank:05d}.pt"


def merged_sharded_state(path: Path, state: dict[str, Any], map_location: str | torch.device) -> dict[str, Any]:
    """``state`` (a sharded checkpoint's ``last.pt``) with ``model`` and ``optimizer`` rebuilt from its shards."""
    info = state["sharded"]
    directory = path.parent / info["dir"]
    parts = [load_checkpoint_file(shard_path(directory, rank), map_location) for rank in range(info["world_size"])]
    merged = merge_shards(parts, set(info["keys"]))
    return {**{k: v for k, v in state.items() if k != "sharded"}, **merged}


def remove_unreferenced_shards(directory: str | Path) -> list[Path]:
    """Delete shard folders under ``directory/shards`` that no checkpoint of ``directory`` names (older
    steps, and saves a kill interrupted before their ``last.pt`` was written). Returns the removed folders."""
    directory = Path(directory)
    root = directory / SHARDS_DIR
    if not root.is_dir():
        return []
    named = set()
    for checkpoint in directory.glob("*.pt"):
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable checkpoint names nothing
            continue
        if isinstance(state, dict) and "sharded" in state:
            named.add((directory / state["sharded"]["dir"]).resolve())
    removed = [folder for folder in root.iterdir() if folder.is_dir() and folder.resolve() not in named]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def merge_shards(parts: list[Any], sharded: set[str], path: str = "") -> Any:
    """Rebuild full tensors from every rank's :func:`local_shards` output (in rank order): sharded paths
    are concatenated along dim 0 (FSDP's even ``torch.chunk`` split), everything else is taken from rank 0."""
    first = parts[0]
    if path in sharded:
        return torch.cat(parts, dim=0)
    if isinstance(first, dict):
        return {
            key: merge_shards([part[key] for part in parts], sharded, f"{path}.{key}" if path else str(key))
            for key in first
        }
    if isinstance(first, list):
        return [merge_shards([part[i] for part in parts], sharded, f"{path}.{i}") for i in range(len(first))]
    return first
