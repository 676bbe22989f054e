"""Timing of training steps: contenders run in interleaved blocks, medians over repeats by the wall and the
CPU clock, paired ratios, and the machine's matrix-multiply peak."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Timing:
    """Seconds per step of one contender over repeats, and what follows from it.

    Two clocks: wall time, and the CPU time of this process (all its threads; ``time.process_time``). On a
    machine whose cores other processes share, CPU time leaves out the time the scheduler gave them, so it
    is the steadier measure of what a step costs; on an idle machine at one thread the two agree.

    Attributes:
        label: what ran.
        seconds: per repeat, the mean wall seconds of one step over the repeat's block of steps.
        batch: images per step.
        flops: analytic FLOPs of one step (forward + backward, 3x the forward), or 0 when not counted.
        cpu_seconds: per repeat, the mean CPU seconds of one step.
    """

    label: str
    seconds: list[float]
    batch: int
    flops: float = 0.0
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median

    @property
    def gflops(self) -> float:
        return self.flops / self.median / 1e9

    def summary(self, peak: Peak | None = None) -> dict[str, Any]:
        """Images/s, step milliseconds (median, min, max), and with FLOPs the GFLOP/s and the fraction of the
        sgemm peak; the same from CPU time under ``_cpu`` keys."""
        cpu = statistics.median(self.cpu_seconds) if self.cpu_seconds else math.nan
        row: dict[str, Any] = {
            "label": self.label,
            "img_per_s": self.images_per_second,
            "step_ms": self.median * 1e3,
            "step_ms_min": min(self.seconds) * 1e3,
            "step_ms_max": max(self.seconds) * 1e3,
            "repeats": len(self.seconds),
            "img_per_s_cpu": self.batch / cpu,
            "step_ms_cpu": cpu * 1e3,
        }
        if self.flops:
            row["gflop_per_step"] = self.flops / 1e9
            row["gflop_per_s"] = self.gflops
            row["gflop_per_s_cpu"] = self.flops / cpu / 1e9
            if peak is not None:
                row["fraction_of_peak"] = self.gflops / peak.wall
                row["fraction_of_peak_cpu"] = row["gflop_per_s_cpu"] / peak.cpu
        return row


@dataclass
class Peak:
    """Measured fp32 sgemm rate in GFLOP/s, by wall time and by CPU time (see :class:`Timing`)."""

    wall: float
    cpu: float

    @staticmethod
    def best(peaks: Sequence[Peak]) -> Peak:
        return Peak(max(p.wall for p in peaks), max(p.cpu for p in peaks))


@dataclass
class Contender:
    """Something whose step is timed: ``step()`` runs one training step (forward, backward, update)."""

    label: str
    step: Callable[[], Any]
    batch: int
    flops: float = 0.0
    model: nn.Module | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgemm_peak(
    size: int = 2048, repeats: int = 5, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Peak:
    """The device's matrix-multiply rate in GFLOP/s: the best of ``repeats`` timings of a ``size`` x ``size``
    ``torch.mm`` (2 size^3 FLOPs) in ``dtype`` (fp32: the sgemm peak) at the current thread count, by both
    clocks (the CPU clock means little for a GPU)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm up the BLAS
    synchronize(device)
    wall = cpu = math.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=out)
        synchronize(device)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return Peak(2 * size**3 / wall / 1e9, 2 * size**3 / max(cpu, 1e-9) / 1e9)


def time_interleaved(
    contenders: Sequence[Contender],
    *,
    steps: int,
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, Timing]:
    """Time contenders in turns: each repeat runs a block of ``steps`` steps of every contender (the order
    rotating from repeat to repeat), after ``warmup`` untimed steps of each; on a GPU each block is timed
    from an idle device to the end of its last kernel."""
    device = torch.device(device)
    for contender in contenders:
        for _ in range(warmup):
            contender.step()
    timings = {c.label: Timing(c.label, [], c.batch, c.flops) for c in contenders}
    for repeat in range(repeats):
        shift = repeat % len(contenders)
        for contender in [*contenders[shift:], *contenders[:shift]]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                contender.step()
            synchronize(device)
            timing = timings[contender.label]
            timing.seconds.append((time.perf_counter() - start) / steps)
            timing.cpu_seconds.append((time.process_time() - start_cpu) / steps)
    return timings


def paired_ratio(slow: Timing, fast: Timing, *, cpu: bool = False) -> float:
    """Median over repeats of ``slow / fast`` step time (> 1: ``fast`` is faster), by wall or CPU time."""
    pairs = (
        zip(slow.cpu_seconds, fast.cpu_seconds, strict=True) if cpu else zip(slow.seconds, fast.seconds, strict=True)
    )
    return statistics.median(s / f for s, f in pairs)
