"""PyTorch's own distributed engine under ``torchrun``: process group, this process's place, reductions.

``torchrun --nproc_per_node=N -m mimkit pretrain ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
the rendezvous address; :func:`setup` joins the process group (NCCL on GPUs, gloo on CPUs) and picks
this rank's device. Without those variables everything here is a no-op for a single process, so the same
code runs on one CPU and on many GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def shutdown(*, together: bool = True) -> None:
    """Leave the process group if this process joined one.

    Args:
        together: wait for every rank first (a barrier), so that no rank tears down its communication
            threads while another is still working, as PyTorch asks of ``destroy_process_group``; False on
            a failure, where the other ranks may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if together and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def leaving_together() -> Iterator[None]:
    """Run a command's body, then :func:`shutdown`: all ranks together after success, at once after a failure."""
    try:
        yield
    except BaseException:
        shutdown(together=False)
        raise
    shutdown()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (``"sum"`` or ``"max"``); returns it. No-op for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def any_rank(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (every rank gets the same answer)."""
    value = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1).clone()
    return bool(all_reduce(value, "max").item() > 0)


def all_gather_rows(rows: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Concatenate every rank's ``rows`` (R_r, ...) in rank order; ranks may hold different R_r.

    The exchange happens on ``device`` (GPU tensors for NCCL); the result is on the CPU.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return rows
    world = dist.get_world_size()
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[dist.get_rank()] = rows.shape[0]
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:size].cpu() for part, size in zip(gathered, sizes.tolist(), strict=True)])


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP (``fully_shard``): each transformer block is its own unit (its
    weights gathered just before it runs, freed after), the rest of the model forms the root unit.

    Parameters become DTensors sharded along their first dimension over all ranks; forward, backward
    and the optimizer step work unchanged. Call before building the optimizer.
    """
    from torch.distributed.fsdp import fully_shard

    from mimkit.layers.block import Block

    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model sharded by :func:`shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Gather the root unit's weights of a sharded model while code calls its submodules directly (mask
    guidance, exploitation rate, the online probe's encoder pass); a no-op for other models."""
    if not is_sharded(model):
        yield
        return
    model.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        model.reshard()  # type: ignore[operator]


def local_shards(state: Any, path: str = "") -> tuple[Any, list[str]]:
    """A (nested) state dict with every DTensor replaced by this rank's local shard.

    Returns:
        (the state with plain tensors only, loadable with ``weights_only=True``; the dotted paths of the
        tensors that were sharded along dim 0 and must be concatenated over ranks to rebuild them).
    """
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.to_local().detach().cpu().clone(), [path]
    if isinstance(state, dict):
        out, sharded = {}, []
        for key, value in state.items():
            out[key], inner = local_shards(value, f"{path}.{key}" if path else str(key))
            sharded += inner
        return out, sharded
    if isinstance(state, list):
        pairs = [local_shards(value, f"{path}.{index}") for index, value in enumerate(state)]
        return [value for value, _ in pairs], [name for _, names in pairs for name in names]
    return state, []


def to_sharded_like(local: Any, like: Any) -> Any:
    """Saved tensors as DTensors placed like ``like`` (a sharded state dict of the same structure), for
    loading into a sharded model or its optimizer: this rank's local shards as they are, whole tensors cut
    to this rank's share."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        local = local.to(like.device)
        if local.shape == like.shape:  # a whole tensor (from a plain checkpoint): keep this rank's share
            return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    if isinstance(like, dict) and isinstance(local, dict):
        return {key: to_sharded_like(value, like[key]) if key in like else value for key, value in local.items()}
    if isinstance(like, list) and isinstance(local, list):
        return [to_sharded_like(value, other) for value, other in zip(local, like, strict=False)]
    return local
