"""PyTorch's own distributed engine under ``torchrun``: process group, this process's place, reductions.

``torchrun --nproc_per_node=N -m mimkit pretrain ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
the rendezvous address; :func:`setup` joins the process group (NCCL on GPUs, gloo on CPUs) and picks
this rank's device. Without those variables everything here is a no-op for a single process, so the same
code runs on one CPU and on many GPUs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Place:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and pictures."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def place() -> Place:
    """This process's place: from the joined process group, else from torchrun's variables, else single."""
    if dist.is_available() and dist.is_initialized():
        return Place(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return Place(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def setup(device: torch.device) -> tuple[Place, torch.device]:
    """Join the process group torchrun describes (once per process) and choose this rank's device.

    Args:
        device: the configured device; ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun.

    Returns:
        (place, device). A single process (no ``WORLD_SIZE`` > 1) gets ``Place()`` and ``device`` unchanged.
    """
    where = place()
    if not where.distributed:
        return where, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", where.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        log.info("joined %s process group: rank %d of %d", backend, where.rank, where.world_size)
    return place(), device


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (``"sum"`` or ``"max"``); returns it. No-op for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def any_rank(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (every rank gets the same answer)."""
    value = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1).clone()
    return bool(all_reduce(value, "max").item() > 0)


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
