"""Masking strategies at one budget: random, block, grid, attention-guided and self-guided, and the mask ratio.

Every variant pretrains the same model (the demo's ViT-Tiny, patch 4, on Fashion-MNIST) for the same
number of steps, then its frozen encoder is measured by kNN and by the linear probe (the
``mimkit probe`` protocols). Pretraining losses of different masks are different tasks: compare them
only within a masker. Runs and probes are cached under ``--out/<variant>/``, so variants may run in
separate processes (``--variants``) and a last call prints the table::

    .venv/bin/python benchmarks/masking_ablation.py --out runs/masking --threads 1 [--variants random grid]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import ablation  # benchmarks/ablation.py, beside this script
import torch

from mimkit.engine.logging import read_metrics

VARIANTS: dict[str, list[str]] = {
    "random": ["mask.type=random"],
    "block": ["mask.type=block", "mask.block.min_num_patches=4"],
    "grid": ["mask.type=grid"],
    # Self-Guided MAE as specified: switch where the exploitation rate of mask tokens crosses above visible tokens'.
    "self_guided": ["mask.type=self_guided", "mask.self_guided.trigger_every_steps=50"],
    # The same informed masking switched on at a fixed point (a quarter of the run), to see its effect
    # even when the exploitation trigger does not fire within a short budget.
    "self_guided_fixed": [
        "mask.type=self_guided",
        "mask.self_guided.trigger=epoch",
        "mask.self_guided.start_epoch=0.25",
    ],
    "random_r0.5": ["mask.type=random", "mask.ratio=0.5"],
    "random_r0.25": ["mask.type=random", "mask.ratio=0.25"],
    "attention": ["mask.type=attention", "mask.attention.mode=hide", "mask.attention.temperature=1.0"],
}


def pretrain(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    settings = [*overrides, f"train.epochs={args.epochs}", f"data.limit={args.limit}", "log.exploitation=true"]
    return ablation.pretrain(args.out / name, args.config, settings, progress=args.progress)


def probe(name: str, checkpoint: Path, protocol: str, args: argparse.Namespace, random_init: bool = False) -> float:
    return ablation.probe(
        args.out / name,
        checkpoint,
        protocol,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        random_init=random_init,
        progress=args.progress,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/masking"))
    parser.add_argument("--config", type=Path, default=Path("configs/mae_vit_tiny_fmnist.yaml"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=20000, help="pretraining images (the first ones)")
    parser.add_argument("--train-limit", type=int, default=5000, help="probe training images")
    parser.add_argument("--test-limit", type=int, default=1000, help="probe test images")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.variants:
        summary = pretrain(name, VARIANTS[name], args)
        checkpoint = Path(summary["checkpoint"])
        knn, linear = probe(name, checkpoint, "knn", args), probe(name, checkpoint, "linear", args)
        records = read_metrics(args.out / name / "metrics.jsonl")
        switch = next((r["step"] for r in records if "self_guided/switch_step" in r), None)
        exploitation = [r for r in records if "exploitation/mask" in r]
        last = exploitation[-1] if exploitation else {}
        rows.append((name, summary, knn, linear, switch, last))

    print()
    print(
        f"Fashion-MNIST, ViT-Tiny/4, {args.epochs} epoch(s) of {args.limit} images; kNN and linear probe on "
        f"{args.train_limit} train / {args.test_limit} test images (top-1 %)"
    )
    print("| masking | final loss | kNN | linear | switch step | exploitation mask / visible (end) | minutes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    if rows:  # the same architecture untrained, for scale
        first, summary = rows[0][0], rows[0][1]
        checkpoint = Path(summary["checkpoint"])
        knn, linear = (probe(first, checkpoint, protocol, args, random_init=True) for protocol in ("knn", "linear"))
        print(f"| no pretraining (random init) | - | {100 * knn:.2f} | {100 * linear:.2f} | - | - | - |")
    for name, summary, knn, linear, switch, last in rows:
        util = f"{last['exploitation/mask']:.2f} / {last['exploitation/visible']:.2f}" if last else "-"
        print(
            f"| {name} | {summary['final_loss']:.4f} | {100 * knn:.2f} | {100 * linear:.2f} | "
            f"{'-' if switch is None else switch} | {util} | {summary['train_seconds'] / 60:.1f} |"
        )


if __name__ == "__main__":
    main()
