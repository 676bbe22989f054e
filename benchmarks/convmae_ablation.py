"""ConvMAE's own ablations, reproduced in small form on Fashion-MNIST with ``convmae_tiny``.

Every row pretrains ``configs/convmae_tiny_fmnist.yaml`` (32x32 images, stages 32-d at 32x32 and 64-d at
16x16, a 128-d x 4 transformer on the 8x8 grid, 1.0 M encoder parameters, batch 64) on the same first
``--limit`` training images for the same number of epochs, and changes one thing against the base row
(ConvMAE's recipe: random masks at 75 % on the stage-3 grid upsampled to the convolution stages, the
paper's "block-wise" masking; 5x5 depthwise kernels; multi-scale fusion into the decoder input). Each
pretrained encoder is then measured as the other ablations measure: kNN and the linear probe (average
pool) on ``--train-limit`` / ``--test-limit`` images, and one epoch of full fine-tuning.

Rows:

* ``stage3_random``: the base row.
* ``fine_random``: the paper's "random masking" ablation: 75 % of the stage-1 cells (here pixels) hidden
  inside every stage-3 token, so the transformer sees every token, each partly; loss on hidden pixels.
* ``beit_block``: BEiT's rectangles on the stage-3 grid, upsampled.
* ``no_fusion``: no multi-scale fusion.
* ``kernel7``: 7x7 depthwise kernels.
* ``long``, ``long_no_fusion``: the base row and ``no_fusion`` pretrained ``--long-factor`` times longer
  (the paper measures the fusion's gain at 200 and 1,600 epochs).
* ``random_init``: the base architecture untrained, for scale.

Each finished run is cached under ``--out/<row>_s<seed>/`` (json per measure), so the ablation may run in
parts (``--rows``, ``--seeds``) and a last call prints the table with every seed and the mean::

    .venv/bin/python benchmarks/convmae_ablation.py --out runs/convmae_ablation --threads 1 \\
        [--rows stage3_random fine_random] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import ablation  # benchmarks/ablation.py, beside this script
import torch

from mimkit.build import load_checkpoint

CONFIG = Path("configs/convmae_tiny_fmnist.yaml")
ROWS: dict[str, tuple[str, list[str], bool]] = {  # row -> (what changes, overrides, long schedule)
    "stage3_random": ("base: stage-3 random (paper's block-wise), kernel 5, fusion", [], False),
    "fine_random": ("fine-grained random on the stage-1 grid", ["mask.type=fine_random"], False),
    "beit_block": ("BEiT blocks on the stage-3 grid", ["mask.type=block"], False),
    "no_fusion": ("no fusion", ["model.fuse=false"], False),
    "kernel7": ("kernel 7", ["model.kernel_size=7"], False),
    "long": ("base, long", [], True),
    "long_no_fusion": ("no fusion, long", ["model.fuse=false"], True),
    "random_init": ("random init (untrained base)", [], False),
}


def run_row(row: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Pretrain (or reuse) one row at one seed and measure it; the measures cached in ``metrics.json``."""
    _, overrides, long = ROWS[row]
    out = args.out / f"{row}_s{seed}"
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        return dict(json.loads(metrics_path.read_text()))
    epochs = args.epochs * (args.long_factor if long else 1)
    settings = [*overrides, f"train.epochs={epochs}", f"data.limit={args.limit}", f"train.seed={seed}"]
    random_init = row == "random_init"
    pretrained = args.out / f"stage3_random_s{seed}" if random_init else out  # untrained: the base's config
    summary = ablation.pretrain(pretrained, CONFIG, settings, progress=args.progress)
    checkpoint = Path(summary["checkpoint"])
    limits = dict(train_limit=args.train_limit, test_limit=args.test_limit, pool="avg", progress=args.progress)
    finetune_config = ablation.finetune_recipe(args.ft_epochs, args.train_limit, args.test_limit)
    metrics = {
        "knn": ablation.probe(out, checkpoint, "knn", random_init=random_init, **limits),
        "linear": ablation.probe(out, checkpoint, "linear", random_init=random_init, **limits),
        "finetune": ablation.finetune(
            out, checkpoint, finetune_config, random_init=random_init, progress=args.progress
        ),
        "final_loss": float("nan") if random_init else float(summary["final_loss"]),
        "steps": float(summary["steps"]),
        "seconds_per_step": summary["train_seconds"] / max(summary["steps"], 1),
        "encoder_params": float(sum(p.numel() for p in load_checkpoint(checkpoint).encoder.parameters())),
    }
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return metrics


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean (seed values)`` of one measure over the seeds run."""
    if not values:
        return "-"
    mean = f"{scale * statistics.fmean(values):.{digits}f}"
    if len(values) == 1:
        return mean
    return f"{mean} ({' / '.join(f'{scale * v:.{digits}f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/convmae_ablation"))
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=1, help="pretraining epochs of the short rows")
    parser.add_argument("--long-factor", type=int, default=2, help="the long rows pretrain this many times longer")
    parser.add_argument("--limit", type=int, default=5120, help="pretraining images (the first ones)")
    parser.add_argument("--train-limit", type=int, default=2000, help="probe and fine-tuning training images")
    parser.add_argument("--test-limit", type=int, default=1000, help="probe and fine-tuning test images")
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-only", action="store_true", help="print the cached runs, run nothing")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:  # every row at one seed before the next seed, so a partial run is a whole table
        for row in args.rows:
            cached = args.out / f"{row}_s{seed}" / "metrics.json"
            if args.table_only and not cached.is_file():
                continue
            results.setdefault(row, []).append(run_row(row, seed, args))

    print()
    print(
        f"Fashion-MNIST 32x32, convmae_tiny (8x8 tokens), batch 64, {args.limit} pretraining images, "
        f"{args.epochs} epoch(s) (long rows x{args.long_factor}); kNN and linear probe (avg pool) and "
        f"{args.ft_epochs}-epoch full fine-tuning on {args.train_limit} train / {args.test_limit} test images "
        "(top-1 %, mean over seeds, each seed in brackets)"
    )
    print("| row | steps | encoder params | final loss | kNN | linear | fine-tune | s/step | seeds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, runs in results.items():
        first = runs[0]
        loss = "-" if row == "random_init" else cell([r["final_loss"] for r in runs], 1.0, 3)
        seconds = "-" if row == "random_init" else f"{statistics.fmean(r['seconds_per_step'] for r in runs):.2f}"
        steps = "-" if row == "random_init" else f"{int(first['steps'])}"
        print(
            f"| {ROWS[row][0]} | {steps} | {first['encoder_params'] / 1e6:.2f} M | {loss} | "
            f"{cell([r['knn'] for r in runs])} | {cell([r['linear'] for r in runs])} | "
            f"{cell([r['finetune'] for r in runs])} | {seconds} | {len(runs)} |"
        )


if __name__ == "__main__":
    main()
