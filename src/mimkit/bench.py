"""Pretraining throughput: mimkit against HuggingFace ``ViTMAEForPreTraining``, and what a step costs.

One *step* is what pretraining repeats: forward, backward and an AdamW update, fp32, random init. mimkit's
model comes from :func:`~mimkit.models.create_model`; the HF peer is ``ViTMAEForPreTraining`` built from the
``ViTMAEConfig`` of the same architecture (:func:`~mimkit.models.convert.hf_config_from_args`: widths,
depths, heads, MLP widths, mask ratio, norm-pix loss, patch, image size), with SDPA attention. Both run in
the same process, interleaved (blocks of steps alternate between the models, in turn), and each reports the
median over repeats, so load from other processes hits both alike; the ratio is the median of the paired
per-repeat ratios.

Also measured: achieved GFLOP/s from the analytic FLOP count (:func:`~mimkit.analysis.complexity.model_info`,
backward counted as twice the forward) against the machine's fp32 sgemm peak measured in the same run with a
large ``torch.mm``; peak memory of a step (in a fresh process, resident set size); the encoder speed-up from
masking; ``torch.compile``, fused AdamW, activation checkpointing and channels-last as levers; and the data
pipeline's share from a short real :class:`~mimkit.engine.pretrain.Pretrainer` run.

``mimkit bench`` and ``benchmarks/throughput.py`` call :func:`run_benchmark`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mimkit.build import create_model
from mimkit.models import MaskedImageModel

# The architectures the benchmark compares (``create_model`` arguments) and their batch.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(name="vit_tiny", img_size=32, patch_size=4, in_chans=3, decoder="tiny", batch=128),
    "base": dict(name="vit_base", img_size=224, patch_size=16, in_chans=3, decoder="mae", batch=32),
    "large": dict(name="vit_large", img_size=224, patch_size=16, in_chans=3, decoder="mae", batch=8),
    # ConvMAE-Small's widths on the tiny config's 8x8 grid of 32x32 images (no HF peer).
    "convmae": dict(name="convmae_small", img_size=32, patch_sizes=(1, 2, 2), in_chans=3, decoder="tiny", batch=128),
    "smoke_convmae": dict(
        name="convmae_tiny", img_size=16, patch_sizes=(1, 2, 2), in_chans=3, decoder="micro", batch=4
    ),
    # A few-second smoke test of the whole benchmark.
    "smoke": dict(
        name="vit_tiny",
        img_size=16,
        patch_size=4,
        in_chans=3,
        decoder="micro",
        depth=2,
        embed_dim=64,
        num_heads=2,
        batch=4,
    ),
}


# Steps per block and the most repeats of configs whose step takes seconds (ViT-B at 224: ~20 s on one thread).
SLOW_CONFIGS: dict[str, tuple[int, int]] = {"base": (1, 3), "large": (1, 2)}


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


PRECISIONS = ("fp32", "bf16")


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``create_model`` keyword arguments of a :data:`CONFIGS` entry (everything but name and batch)."""
    return {key: value for key, value in config.items() if key not in ("name", "batch")}


def step_flops(model: MaskedImageModel, batch: int, mask_ratio: float | None = None) -> float:
    """Analytic FLOPs of one training step: 3x the forward FLOPs (backward ~ 2x forward) times the batch."""
    from mimkit.analysis.complexity import model_info

    return 3.0 * model_info(model, mask_ratio)["pretrain_flops"] * batch


def build_mimkit(config: dict[str, Any], *, seed: int = 0, **overrides: Any) -> MaskedImageModel:
    """mimkit's pretraining model of a :data:`CONFIGS` entry, random init, train mode."""
    torch.manual_seed(seed)
    model = create_model(config["name"], **{**model_kwargs(config), **overrides})
    return model.train()


def build_hf(model: MaskedImageModel, *, copy_weights: bool = False) -> nn.Module:
    """HuggingFace ``ViTMAEForPreTraining`` of the same architecture as ``model`` (SDPA attention), random
    init, or with ``model``'s weights when ``copy_weights``."""
    from mimkit.models.load import import_transformers

    transformers = import_transformers("comparisons with HuggingFace ViTMAE")

    from mimkit.models.convert import from_mimkit, hf_config_from_args

    hf_config = hf_config_from_args(model.config)
    hf_config._attn_implementation = "sdpa"
    hf = transformers.ViTMAEForPreTraining(hf_config)
    if copy_weights:
        hf.load_state_dict(from_mimkit(model.state_dict(), "hf"), strict=True)
    return hf.train()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_images(config: dict[str, Any], batch: int | None = None, seed: int = 0) -> Tensor:
    """A fixed batch of normalized-looking images (B, C, H, W) for a config."""
    generator = torch.Generator().manual_seed(seed)
    size = config["img_size"]
    return torch.randn(batch or config["batch"], config["in_chans"], size, size, generator=generator)


def adamw(model: nn.Module, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (``foreach`` kernels, or the fused kernel when ``fused``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def mimkit_contender(
    label: str,
    model: MaskedImageModel,
    images: Tensor,
    *,
    fused_adamw: bool = False,
    flops: float | None = None,
    bf16: bool = False,
) -> Contender:
    """A step of a mimkit model: masks from a per-step seeded generator, as the training loop does; the
    forward under bf16 autocast when ``bf16`` (as ``train.precision=bf16``)."""
    optimizer = adamw(model, fused=fused_adamw)
    counter = iter(range(1 << 62))
    batch = images.shape[0]

    def step() -> Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(images, generator=torch.Generator().manual_seed(next(counter))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Contender(label, step, batch, step_flops(model, batch) if flops is None else flops, model)


def hf_contender(label: str, hf: nn.Module, images: Tensor, flops: float, *, bf16: bool = False) -> Contender:
    """A step of HF ``ViTMAEForPreTraining`` (it draws its own mask noise), under bf16 autocast when ``bf16``."""
    optimizer = adamw(hf)

    def step() -> Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf(pixel_values=images).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Contender(label, step, images.shape[0], flops, hf)


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


def compare_with_hf(
    config: dict[str, Any],
    *,
    steps: int,
    repeats: int,
    peak: Peak,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]:
    """mimkit against HF ``ViTMAEForPreTraining`` on one ViT config: images/s, GFLOP/s, ratio.

    Both run on ``device``; with ``precision="bf16"`` both forwards run under bf16 autocast (weights,
    gradients and AdamW in fp32), and ``peak`` should then be the bf16 matmul peak."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16"
    model = build_mimkit(config).to(device)
    hf = build_hf(model).to(device)
    images = make_images(config).to(device)
    flops = step_flops(model, images.shape[0])
    mimkit_params, hf_params = count_parameters(model), count_parameters(hf)
    timings = time_interleaved(
        [mimkit_contender("mimkit", model, images, bf16=bf16), hf_contender("hf", hf, images, flops, bf16=bf16)],
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        device=device,
    )
    return {
        "config": config,
        "mimkit_params": mimkit_params,
        "hf_params": hf_params,
        "mimkit": timings["mimkit"].summary(peak),
        "hf": timings["hf"].summary(peak),
        "ratio": paired_ratio(timings["hf"], timings["mimkit"]),
        "ratio_cpu": paired_ratio(timings["hf"], timings["mimkit"], cpu=True),
    }


def loss_check(config: dict[str, Any], *, steps: int = 50, lr: float = 1.5e-4, seed: int = 0) -> dict[str, Any]:
    """Train mimkit and HF from the same weights on the same fixed batch and the same mask noise for
    ``steps`` AdamW steps; their losses should agree within float noise at every step.

    Returns:
        ``mimkit_losses``, ``hf_losses`` and the largest absolute and relative difference.
    """
    model = build_mimkit(config, seed=seed)
    hf = build_hf(model, copy_weights=True)
    images = make_images(config, seed=seed)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05) for m in (model, hf)]
    generator = torch.Generator().manual_seed(seed + 1)
    losses: list[list[float]] = [[], []]
    for _ in range(steps):
        noise = torch.rand(images.shape[0], model.grid[0] * model.grid[1], generator=generator)  # (B, L)
        for index, (module, optimizer) in enumerate(zip((model, hf), optimizers, strict=True)):
            out = module(images, noise) if index == 0 else module(pixel_values=images, noise=noise)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            losses[index].append(float(out.loss.detach()))
    diffs = [abs(a - b) for a, b in zip(*losses, strict=True)]
    return {
        "steps": steps,
        "lr": lr,
        "batch": images.shape[0],
        "mimkit_losses": losses[0],
        "hf_losses": losses[1],
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(d / abs(b) for d, b in zip(diffs, losses[1], strict=True)),
        "first_loss": losses[0][0],
        "last_loss": losses[0][-1],
    }


def masking_speedup(config: dict[str, Any], *, steps: int, repeats: int, ratio: float = 0.75) -> dict[str, Any]:
    """Encoder forward + backward at mask ratio ``ratio`` against no masking (MAE reports 3x or more)."""
    model = build_mimkit(config, mask_ratio=ratio)
    encoder = model.encoder
    images = make_images(config)
    batch = images.shape[0]

    def encoder_step(mask_ratio: float) -> Callable[[], Any]:
        counter = iter(range(1 << 62))

        def step() -> Tensor:
            generator = torch.Generator().manual_seed(next(counter))
            mask = model.make_mask(batch, generator=generator) if mask_ratio else None  # None: all patches
            tokens = encoder(images, mask).tokens  # (B, 1 + N, D)
            tokens.square().mean().backward()
            return tokens.detach()

        return step

    masked, full = f"encoder masked {ratio:g}", "encoder unmasked"
    timings = time_interleaved(
        [Contender(masked, encoder_step(ratio), batch), Contender(full, encoder_step(0.0), batch)],
        steps=steps,
        repeats=repeats,
    )
    return {
        "mask_ratio": ratio,
        "masked": timings[masked].summary(),
        "unmasked": timings[full].summary(),
        "speedup": paired_ratio(timings[full], timings[masked]),
        "speedup_cpu": paired_ratio(timings[full], timings[masked], cpu=True),
    }


def levers(config: dict[str, Any], *, steps: int, repeats: int, peak: Peak, compile: bool) -> dict[str, Any]:
    """The same step with one change at a time against mimkit's default, interleaved: attention by plain
    ops instead of SDPA, fused AdamW, activation checkpointing and, with ``compile``, ``torch.compile`` of
    encoder and decoder (inductor)."""
    from mimkit.layers import set_attention_impl

    images = make_images(config)
    contenders = [mimkit_contender("default", build_mimkit(config), images)]
    math = build_mimkit(config)
    set_attention_impl(math, "math")
    contenders.append(mimkit_contender("math attention", math, images))
    contenders.append(mimkit_contender("fused AdamW", build_mimkit(config), images, fused_adamw=True))
    contenders.append(mimkit_contender("grad checkpointing", build_mimkit(config, grad_checkpointing=True), images))
    results: dict[str, Any] = {}
    if compile:
        compiled = build_mimkit(config)
        flops = step_flops(compiled, images.shape[0])
        compiled.encoder = torch.compile(compiled.encoder)  # type: ignore[assignment]
        compiled.decoder = torch.compile(compiled.decoder)  # type: ignore[assignment]
        contender = mimkit_contender("torch.compile", compiled, images, flops=flops)
        start = time.perf_counter()
        contender.step()  # compiles forward and backward
        results["compile_seconds"] = time.perf_counter() - start
        contenders.append(contender)
    timings = time_interleaved(contenders, steps=steps, repeats=repeats)
    default = timings["default"]
    results["rows"] = [
        {
            **timing.summary(peak),
            "speedup_vs_default": paired_ratio(default, timing),
            "speedup_vs_default_cpu": paired_ratio(default, timing, cpu=True),
        }
        for timing in timings.values()
    ]
    return results


def variant_costs(
    config: dict[str, Any], *, steps: int, repeats: int, convmae: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Step time of ConvMAE-Small, self-guided MAE (after its switch to informed masks) and a teacher
    target (MaskDistill with EfficientNet-Lite0) relative to plain MAE on the same images and grid
    (``convmae``: the ConvMAE config, by default :data:`CONFIGS` ``"convmae"``)."""
    images = make_images(config)
    contenders = [mimkit_contender("mae", build_mimkit(config), images)]
    convmae = convmae or CONFIGS["convmae"]
    contenders.append(mimkit_contender(convmae["name"], build_mimkit(convmae), images))
    guided = build_mimkit(config, mask_type="self_guided", mask_options={"trigger": "epoch", "start_epoch": 0.0})
    guided.masker.update(step=0, total_steps=1000, epoch=0.0)  # type: ignore[attr-defined]  # informed from now
    contenders.append(mimkit_contender("self-guided (informed)", guided, images))
    skipped: dict[str, str] = {}
    try:
        stats = (0.5,) * config["in_chans"]  # the teacher undoes the images' normalization
        teacher = build_mimkit(
            config, target="maskdistill", teacher="efficientnet_lite0", data_mean=stats, data_std=stats
        )
        contenders.append(mimkit_contender("maskdistill teacher", teacher, images, flops=0.0))
    except (FileNotFoundError, ValueError, ImportError) as err:  # the teacher's weights are not installed
        skipped["maskdistill teacher"] = str(err)
    timings = time_interleaved(contenders, steps=steps, repeats=repeats)
    mae = timings["mae"]
    rows = [
        {
            **timing.summary(),
            "relative_step_time": paired_ratio(timing, mae),
            "relative_step_time_cpu": paired_ratio(timing, mae, cpu=True),
        }
        for timing in timings.values()
    ]
    return {"rows": rows, "skipped": skipped}


def sweep(
    config: dict[str, Any], *, batches: Sequence[int], ratios: Sequence[float], steps: int, repeats: int
) -> dict[str, Any]:
    """Images/s of mimkit and HF against batch size (at the config's mask ratio 0.75) and against mask
    ratio (at the config's batch)."""
    rows: list[dict[str, Any]] = []
    points = [(batch, 0.75) for batch in batches] + [(config["batch"], ratio) for ratio in ratios if ratio != 0.75]
    for batch, ratio in points:
        model = build_mimkit(config, mask_ratio=ratio)
        hf = build_hf(model)
        images = make_images(config, batch)
        flops = step_flops(model, batch)
        timings = time_interleaved(
            [mimkit_contender("mimkit", model, images), hf_contender("hf", hf, images, flops)],
            steps=steps,
            repeats=repeats,
        )
        rows.append(
            {
                "batch": batch,
                "mask_ratio": ratio,
                "mimkit_img_per_s": timings["mimkit"].images_per_second,
                "hf_img_per_s": timings["hf"].images_per_second,
            }
        )
    return {"rows": rows}


def plot_sweep(result: dict[str, Any], path: Path, title: str) -> Path:
    """Images/s against batch size and against mask ratio, mimkit and HF, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    by_batch = sorted((r for r in rows if r["mask_ratio"] == 0.75), key=lambda r: r["batch"])
    batch = (
        max(r["batch"] for r in rows if r["mask_ratio"] != 0.75) if any(r["mask_ratio"] != 0.75 for r in rows) else 0
    )
    by_ratio = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["mask_ratio"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("mimkit_img_per_s", "mimkit"), ("hf_img_per_s", "HF ViTMAE")):
        axes[0].plot([r["batch"] for r in by_batch], [r[key] for r in by_batch], marker="o", label=label)
        axes[1].plot([r["mask_ratio"] for r in by_ratio], [r[key] for r in by_ratio], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="batch size (mask ratio 0.75)", ylabel="images / s")
    axes[0].set_xticks([r["batch"] for r in by_batch], [str(r["batch"]) for r in by_batch])
    axes[0].minorticks_off()
    axes[1].set(xlabel=f"mask ratio (batch {batch})", ylabel="images / s")
    for axis in axes:
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: build a model, then ``steps`` training steps; resident set sizes in MiB."""
    torch.set_num_threads(int(spec["threads"]))
    config = spec["config"]
    model = build_mimkit(config, grad_checkpointing=bool(spec["grad_checkpointing"]))
    images = make_images(config)
    if spec["kind"] == "hf":
        flops = step_flops(model, images.shape[0])
        contender = hf_contender("hf", build_hf(model), images, flops)
        del model
    else:
        contender = mimkit_contender("mimkit", model, images)
    before = _status_mib("VmHWM")
    for _ in range(int(spec["steps"])):
        contender.step()
    after = _status_mib("VmHWM")
    return {"peak_rss_mib": after, "rss_before_step_mib": before, "step_increase_mib": after - before}


def _status_mib(key: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (``VmHWM``: peak resident set) in MiB.
    Unlike ``getrusage``'s maximum, it starts afresh at ``exec``, so a child does not inherit its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{key} not found in /proc/self/status (peak memory is measured on Linux only)")


def peak_memory(
    config: dict[str, Any], *, kind: str = "mimkit", grad_checkpointing: bool = False, steps: int = 1, threads: int = 1
) -> dict[str, Any]:
    """Peak resident memory of training steps (model, gradients, AdamW state, activations), measured in a
    fresh Python process so that nothing else this process allocated counts.

    Returns:
        ``peak_rss_mib`` (the whole process, PyTorch's libraries included), ``rss_before_step_mib`` (after
        building the model and the batch) and their difference ``step_increase_mib``.
    """
    spec = dict(config=config, kind=kind, grad_checkpointing=grad_checkpointing, steps=steps, threads=threads)
    code = (
        "import json, sys; from mimkit.bench import _memory_child; "
        "print(json.dumps(_memory_child(json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode:
        raise RuntimeError(f"the memory measurement failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"kind": kind, "grad_checkpointing": grad_checkpointing, "batch": config["batch"], **result}


def pipeline_share(
    config_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    steps: int = 40,
    log_every: int = 10,
    repeats: int = 3,
) -> dict[str, Any]:
    """End-to-end ``mimkit pretrain`` images/s on a recipe against the model-only step of the same model,
    batch and optimizer: the data pipeline's share of a step.

    Runs a :class:`~mimkit.engine.pretrain.Pretrainer` on the recipe (None: the built-in defaults) with
    ``overrides`` for ``steps`` steps into a temporary folder (no progress bar, no TensorBoard, no
    checkpoint before the last step) and reads its logged images/s after the first logging interval (which
    holds the warm-up); then times the model-only step on random images of the same shape.
    """
    from mimkit.build import build_model
    from mimkit.config import load_config
    from mimkit.engine.optim import build_optimizer
    from mimkit.engine.pretrain import Pretrainer

    with tempfile.TemporaryDirectory() as out_dir:
        run_overrides = [
            *overrides,
            f"train.max_steps={steps}",
            "train.progress=false",
            f"train.output_dir={out_dir}/run",
            f"log.every_steps={log_every}",
            "log.tensorboard=false",
            "train.save_every_steps=null",
            f"train.num_threads={torch.get_num_threads()}",
        ]
        config = load_config(config_path, run_overrides)
        trainer = Pretrainer(config)
        result = trainer.fit()
        metrics = [json.loads(line) for line in (Path(out_dir) / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m["train/img_per_s"] for m in metrics if "train/img_per_s" in m][1:]
    end_to_end = statistics.median(logged) if logged else result.images_per_second

    torch.manual_seed(config.train.seed)
    model = build_model(config).train()
    optimizer = build_optimizer(model, 1e-4, config.optim.weight_decay, config.optim.betas)
    batch, size = config.train.batch_size, config.model.img_size
    images = torch.randn(batch, config.model.in_chans, size, size)
    counter = iter(range(1 << 62))

    def step() -> None:
        loss = model(images, generator=torch.Generator().manual_seed(next(counter))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_interleaved([Contender("model only", step, batch)], steps=log_every, repeats=repeats)["model only"]
    return {
        "config": str(config_path),
        "overrides": list(overrides),
        "batch": batch,
        "steps": steps,
        "num_workers": config.data.num_workers,
        "end_to_end_img_per_s": end_to_end,
        "model_only_img_per_s": timing.images_per_second,
        "fraction": end_to_end / timing.images_per_second,
    }


# The smoke run's end-to-end run: a 2-block model on 64 Fashion-MNIST images, batch 4, no loader workers.
SMOKE_PIPELINE = (
    "model.depth=2",
    "model.embed_dim=64",
    "model.num_heads=2",
    "model.decoder=micro",
    "train.batch_size=4",
    "data.limit=64",
    "data.num_workers=0",
)


@dataclass
class BenchOptions:
    """What :func:`run_benchmark` measures.

    Attributes:
        configs: names of :data:`CONFIGS` compared with HF (ViT ones).
        steps: steps per timed block.
        repeats: timed blocks per contender (the median is reported).
        threads: torch threads (None: leave as is).
        loss_check: steps of the mimkit/HF loss-trajectory check on the tiny config (0: skip).
        levers: time SDPA-everywhere, fused AdamW, activation checkpointing (tiny config).
        compile: include ``torch.compile`` among the levers.
        masking: measure the encoder's masking speed-up (tiny config).
        variants: ConvMAE, self-guided and teacher-target steps relative to MAE (tiny config).
        memory: peak memory of ViT-B (batch 32) and ViT-L (batch 8) steps, with and without checkpointing.
        pipeline: the recipe of the end-to-end run (None: skip; "": the built-in defaults).
        pipeline_overrides: dotted overrides of that run.
        pipeline_steps: steps of that run (logged every quarter).
        sweep: img/s against batch size and mask ratio (tiny config), plotted when ``out`` is set.
        out: folder for ``results.json`` and ``throughput.png``.
        smoke: a seconds-long run on a 2-block model (the test suite's).
        device: where the mimkit/HF comparison runs (``cpu``, ``cuda``, ``cuda:1``); off the CPU only the
            comparison and the loss check are measured.
        precision: ``fp32`` or ``bf16`` (autocast forwards in the comparison, against the bf16 matmul peak).
    """

    configs: tuple[str, ...] = ("tiny", "base")
    steps: int = 3
    repeats: int = 5
    threads: int | None = 1
    loss_check: int = 0
    levers: bool = True
    compile: bool = False
    masking: bool = True
    variants: bool = True
    memory: bool = True
    pipeline: str | None = "configs/mae_vit_tiny_fmnist.yaml"
    pipeline_overrides: tuple[str, ...] = ()
    pipeline_steps: int = 40
    sweep: bool = True
    out: Path | None = None
    smoke: bool = False
    device: str = "cpu"
    precision: str = "fp32"

    def check(self) -> BenchOptions:
        """Raise ``ValueError`` for options that cannot run here, before any timing."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is visible to PyTorch here")
        others = [name for name in ("levers", "masking", "variants", "memory", "sweep") if getattr(self, name)]
        if device.type != "cpu" and (others or self.pipeline is not None):
            raise ValueError(
                f"off the CPU, bench measures the comparison with HF and the loss check only; "
                f"add --compare-only (asked for: {', '.join(others) or 'the pipeline run'})"
            )
        return self


def smoke_options(out: Path | None = None) -> BenchOptions:
    """Options of the smoke run: the tiny-and-shallow ``smoke`` config, 1 step, 2 repeats, everything on."""
    return BenchOptions(
        configs=("smoke",),
        steps=1,
        repeats=2,
        loss_check=2,
        pipeline="",
        pipeline_overrides=SMOKE_PIPELINE,
        pipeline_steps=4,
        out=out,
        smoke=True,
    )


def run_benchmark(options: BenchOptions, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the measurements of ``options``, printing a line per result through ``log``.

    Returns:
        A JSON-able dict: ``machine`` (threads, sgemm peak, torch and transformers versions), ``compare``
        (per config: img/s, GFLOP/s, fraction of peak, parameter counts of both, ratio), and as enabled
        ``loss_check``, ``masking``, ``levers``, ``variants``, ``memory``, ``pipeline``, ``sweep``.
    """
    import platform

    from mimkit.models.load import import_transformers

    transformers = import_transformers("comparisons with HuggingFace ViTMAE")

    options.check()
    if options.threads:
        torch.set_num_threads(options.threads)
    steps, repeats = options.steps, options.repeats
    tiny = CONFIGS["smoke" if options.smoke else "tiny"]
    device = torch.device(options.device)
    gemm_size = 512 if options.smoke else (8192 if device.type == "cuda" else 2048)
    gemm_dtype = torch.bfloat16 if options.precision == "bf16" else torch.float32

    def matmul_peak() -> Peak:
        return sgemm_peak(gemm_size, device=device, dtype=gemm_dtype)

    peaks = [matmul_peak()]
    results: dict[str, Any] = {
        "machine": {
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_average": os.getloadavg(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": options.precision,
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
    }
    log(f"# {torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers {transformers.__version__}")
    where = f"on {results['machine']['device']}, {options.precision}"
    log(f"matmul peak {where}: {peaks[0].wall:.1f} GFLOP/s (by CPU time {peaks[0].cpu:.1f})")

    def save() -> None:
        """Write what is measured so far, so that a run stopped midway keeps its results."""
        best = Peak.best(peaks)
        results["machine"].update(sgemm_peak_gflops=best.wall, sgemm_peak_gflops_cpu=best.cpu)
        results["machine"]["sgemm_samples_gflops"] = [peak.wall for peak in peaks]
        if options.out is not None:
            Path(options.out).mkdir(parents=True, exist_ok=True)
            (Path(options.out) / "results.json").write_text(json.dumps(results, indent=2, default=str))

    compare: dict[str, Any] = {}
    for name in options.configs:
        config = CONFIGS[name]
        peaks.append(matmul_peak())
        peak = Peak.best(peaks)
        config_steps, max_repeats = (
            (steps, repeats) if device.type == "cuda" else SLOW_CONFIGS.get(name, (steps, repeats))
        )
        row = compare[name] = compare_with_hf(
            config,
            steps=min(steps, config_steps),
            repeats=min(repeats, max_repeats),
            peak=peak,
            device=device,
            precision=options.precision,
        )
        log(
            f"{name}: batch {config['batch']}, params mimkit {row['mimkit_params']:,} hf {row['hf_params']:,}; "
            f"mimkit {row['mimkit']['img_per_s']:.1f} img/s ({row['mimkit'].get('gflop_per_s', 0):.1f} GFLOP/s, "
            f"{100 * row['mimkit'].get('fraction_of_peak', 0):.0f}% of peak), hf {row['hf']['img_per_s']:.1f} img/s "
            f"({100 * row['hf'].get('fraction_of_peak', 0):.0f}%), mimkit/hf {row['ratio']:.3f}; by CPU time "
            f"{row['mimkit']['img_per_s_cpu']:.1f} vs {row['hf']['img_per_s_cpu']:.1f} img/s, "
            f"{100 * row['mimkit'].get('fraction_of_peak_cpu', 0):.0f}% vs "
            f"{100 * row['hf'].get('fraction_of_peak_cpu', 0):.0f}% of peak, mimkit/hf {row['ratio_cpu']:.3f}"
        )
    results["compare"] = compare
    save()
    if options.loss_check:
        check = results["loss_check"] = loss_check(tiny, steps=options.loss_check)
        log(
            f"loss check ({check['steps']} steps, same weights and noise): max |diff| {check['max_abs_diff']:.2e} "
            f"(relative {check['max_rel_diff']:.2e}); loss {check['first_loss']:.4f} -> {check['last_loss']:.4f}"
        )
    save()
    if options.masking:
        masking = results["masking"] = masking_speedup(tiny, steps=steps, repeats=repeats)
        log(
            f"encoder speed-up from masking 75% vs 0%: {masking['speedup']:.2f}x "
            f"(by CPU time {masking['speedup_cpu']:.2f}x)"
        )
    save()
    if options.levers:
        peak = Peak.best(peaks)
        lever = results["levers"] = levers(tiny, steps=steps, repeats=repeats, peak=peak, compile=options.compile)
        for row in lever["rows"]:
            log(
                f"lever {row['label']}: {row['img_per_s']:.1f} img/s, {row['speedup_vs_default']:.3f}x default "
                f"(by CPU time {row['img_per_s_cpu']:.1f} img/s, {row['speedup_vs_default_cpu']:.3f}x)"
            )
    save()
    if options.variants:
        convmae = CONFIGS["smoke_convmae" if options.smoke else "convmae"]
        variants = results["variants"] = variant_costs(tiny, steps=steps, repeats=repeats, convmae=convmae)
        for row in variants["rows"]:
            log(
                f"variant {row['label']}: {row['img_per_s']:.1f} img/s, {row['relative_step_time']:.2f}x MAE step time "
                f"(by CPU time {row['relative_step_time_cpu']:.2f}x)"
            )
        for label, reason in variants["skipped"].items():
            log(f"variant {label}: skipped ({reason})")
    save()
    if options.memory:
        threads = torch.get_num_threads()
        cases = (
            [("smoke", "mimkit")]
            if options.smoke
            else [
                ("tiny", "mimkit"),
                ("tiny", "hf"),
                ("base", "mimkit"),
                ("base", "hf"),
                ("large", "mimkit"),
            ]
        )
        memory = []
        for name, kind in cases:
            for checkpointing in (False, True) if kind == "mimkit" else (False,):
                row = peak_memory(CONFIGS[name], kind=kind, grad_checkpointing=checkpointing, threads=threads)
                memory.append({"config": name, **row})
                log(
                    f"memory {name} {kind}{' +checkpointing' if checkpointing else ''} batch {row['batch']}: "
                    f"peak RSS {row['peak_rss_mib']:.0f} MiB, step adds {row['step_increase_mib']:.0f} MiB"
                )
        results["memory"] = memory
    save()
    if options.pipeline is not None:
        if not options.pipeline or Path(options.pipeline).exists():
            pipe = results["pipeline"] = pipeline_share(
                options.pipeline or None,
                options.pipeline_overrides,
                steps=options.pipeline_steps,
                log_every=max(options.pipeline_steps // 4, 1),
                repeats=max(repeats // 2, 1),
            )
            log(
                f"pipeline: end-to-end {pipe['end_to_end_img_per_s']:.1f} img/s, model only "
                f"{pipe['model_only_img_per_s']:.1f} img/s: {100 * pipe['fraction']:.0f}%"
            )
        else:
            log(f"pipeline: skipped ({options.pipeline} not found; run from the repository root)")
    save()
    if options.sweep:
        batches = (2, 4) if options.smoke else (32, 64, 128, 256)
        ratios = (0.0, 0.5, 0.9) if options.smoke else (0.0, 0.25, 0.5, 0.75, 0.9)
        swept = results["sweep"] = sweep(
            tiny, batches=batches, ratios=ratios, steps=steps, repeats=max(repeats // 2, 1)
        )
        for row in swept["rows"]:
            log(
                f"sweep batch {row['batch']} mask {row['mask_ratio']:g}: mimkit {row['mimkit_img_per_s']:.1f} "
                f"hf {row['hf_img_per_s']:.1f} img/s"
            )
        if options.out is not None:
            title = f"ViT-Tiny/4 MAE step on 32x32 (mimkit and HF ViTMAE), {torch.get_num_threads()} thread(s)"
            results["plot"] = str(plot_sweep(swept, Path(options.out) / "throughput.png", title))
    save()
    if options.out is not None:
        log(f"wrote {Path(options.out) / 'results.json'}")
    return results
