"""Pretraining throughput: mimkit against HuggingFace ``ViTMAEForPreTraining``, and what a step costs.

One *step* is what pretraining repeats: forward, backward and an AdamW update, fp32, random init. mimkit's
model comes from :func:`~mimkit.models.create_model`; the HF peer is ``ViTMAEForPreTraining`` built from the
``ViTMAEConfig`` of the same architecture (:func:`~mimkit.checkpoints.convert.hf_config_from_args`: widths,
depths, heads, MLP widths, mask ratio, norm-pix loss, patch, image size), with SDPA attention. Both run in
the same process, interleaved (blocks of steps alternate between the models, in turn), and each reports the
median over repeats, so load from other processes hits both alike; the ratio is the median of the paired
per-repeat ratios.

Also measured: achieved GFLOP/s from the analytic FLOP count (:func:`~mimkit.analysis.complexity.model_info`,
backward counted as twice the forward) against the machine's fp32 sgemm peak measured in the same run with a
large ``torch.mm``; peak memory of a step (in a fresh process, resident set size); the encoder speed-up from
masking; ``torch.compile``, fused AdamW, activation checkpointing and channels-last as levers; and the data
pipeline's share from a short real :class:`~mimkit.engine.pretrain.Pretrainer` run.

The modules, each importing only the ones before it: :mod:`~mimkit.bench.timing` (clocks, interleaving,
matmul peak), :mod:`~mimkit.bench.contenders` (configs, models, steps), :mod:`~mimkit.bench.peers` (against
HF ViTMAE), :mod:`~mimkit.bench.costs` (masking, levers, variants), :mod:`~mimkit.bench.memory`,
:mod:`~mimkit.bench.pipeline`, and :mod:`~mimkit.bench.run` (options and :func:`run_benchmark`, which
``mimkit bench`` and ``benchmarks/throughput.py`` call).
"""

from mimkit.bench.contenders import (
    CONFIGS,
    adamw,
    build_hf,
    build_mimkit,
    count_parameters,
    hf_contender,
    make_images,
    mimkit_contender,
    model_kwargs,
    step_flops,
)
from mimkit.bench.costs import levers, masking_speedup, variant_costs
from mimkit.bench.memory import peak_memory
from mimkit.bench.peers import PRECISIONS, compare_with_hf, loss_check, plot_sweep, sweep
from mimkit.bench.pipeline import pipeline_share
from mimkit.bench.run import SLOW_CONFIGS, SMOKE_PIPELINE, BenchOptions, run_benchmark, smoke_options
from mimkit.bench.timing import Contender, Peak, Timing, paired_ratio, sgemm_peak, synchronize, time_interleaved

__all__ = [
    "CONFIGS",
    "PRECISIONS",
    "SLOW_CONFIGS",
    "SMOKE_PIPELINE",
    "BenchOptions",
    "Contender",
    "Peak",
    "Timing",
    "adamw",
    "build_hf",
    "build_mimkit",
    "compare_with_hf",
    "count_parameters",
    "hf_contender",
    "levers",
    "loss_check",
    "make_images",
    "masking_speedup",
    "mimkit_contender",
    "model_kwargs",
    "paired_ratio",
    "peak_memory",
    "pipeline_share",
    "plot_sweep",
    "run_benchmark",
    "sgemm_peak",
    "smoke_options",
    "step_flops",
    "sweep",
    "synchronize",
    "time_interleaved",
    "variant_costs",
]
