"""``mimkit bench``: the options of a run, its smoke variant, and :func:`run_benchmark`, which runs the
enabled measurements, logs a line per result and writes ``results.json`` as it goes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimkit.bench.contenders import CONFIGS
from mimkit.bench.costs import levers, masking_speedup, variant_costs
from mimkit.bench.memory import peak_memory
from mimkit.bench.peers import PRECISIONS, compare_with_hf, loss_check, plot_sweep, sweep
from mimkit.bench.pipeline import pipeline_share
from mimkit.bench.timing import Peak, sgemm_peak

# Steps per block and the most repeats of configs whose step takes seconds (ViT-B at 224: ~20 s on one thread).
SLOW_CONFIGS: dict[str, tuple[int, int]] = {"base": (1, 3), "large": (1, 2)}


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

    from mimkit.checkpoints.load import import_transformers

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
