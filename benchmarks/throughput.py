"""Pretraining throughput of mimkit against HuggingFace ``ViTMAEForPreTraining`` (same architecture, fp32,
AdamW, interleaved, median of repeats), achieved GFLOP/s against the measured sgemm peak, peak memory,
the masking speed-up, levers (torch.compile, fused AdamW, activation checkpointing) and the data
pipeline's share; the same as ``mimkit bench`` (see :mod:`mimkit.bench`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/throughput.py --config all --threads 1 --loss-check 50 \
        --memory --sweep --out docs/throughput
    .venv/bin/python benchmarks/throughput.py --smoke           # seconds: everything on a 2-block model
"""

from __future__ import annotations

import sys

from mimkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
