"""ConvMAE against MAE at a similar encoder size and one budget, and ConvMAE's own ablations.

Every variant pretrains for the same steps on the same Fashion-MNIST images at 32x32 with an 8x8 token
grid, then its frozen encoder is measured by kNN and the linear probe (average pool: ConvMAE has no
class token, so both use it) and its encoder is fully fine-tuned at one fixed budget (``mimkit probe``
and ``mimkit finetune``). Variants:

* ``mae``: the demo recipe, ViT-Tiny/4 (192-d, 12 blocks, 5.4 M encoder parameters), random masks.
* ``convmae``: ConvMAE of a similar size: stages 48-d and 96-d (2 convolution blocks each) at 32x32 and
  16x16, then 192-d x 11 transformer blocks on the 8x8 grid (about 5.3 M), block masks, 5x5 depthwise
  kernels, multi-scale fusion on.
* ``convmae_random``, ``convmae_k7``, ``convmae_k9``, ``convmae_nofuse``: one change each.

Results are cached under ``--out/<variant>/``, so variants may run in separate processes
(``--variants``; set ``--threads 1`` for two at once on two cores) and a last call prints the table::

    .venv/bin/python benchmarks/convmae_ablation.py --out runs/convmae_ablation --threads 1 [--variants mae convmae]

Step time is pretraining wall time over steps and depends on what else ran on the machine; for a clean
per-step ratio use ``benchmarks/convmae_step_cost.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ablation  # benchmarks/ablation.py, beside this script
import torch

from mimkit.models import load_checkpoint

MAE = Path("configs/mae_vit_tiny_fmnist.yaml")
CONVMAE = Path("configs/convmae_tiny_fmnist.yaml")
CONVMAE_5M = ["model.embed_dims=[48,96,192]", "model.depths=[2,2,11]", "model.num_heads=3"]
VARIANTS: dict[str, tuple[Path, list[str]]] = {
    "mae": (MAE, []),
    "convmae": (CONVMAE, CONVMAE_5M),
    "convmae_random": (CONVMAE, [*CONVMAE_5M, "mask.type=random"]),
    "convmae_k7": (CONVMAE, [*CONVMAE_5M, "model.kernel_size=7"]),
    "convmae_k9": (CONVMAE, [*CONVMAE_5M, "model.kernel_size=9"]),
    "convmae_nofuse": (CONVMAE, [*CONVMAE_5M, "model.fuse=false"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/convmae_ablation"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=20000, help="pretraining images (the first ones)")
    parser.add_argument("--train-limit", type=int, default=5000, help="probe and fine-tuning training images")
    parser.add_argument("--test-limit", type=int, default=1000, help="probe and fine-tuning test images")
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    finetune_config = ablation.finetune_recipe(args.ft_epochs, args.train_limit, args.test_limit)
    limits = dict(train_limit=args.train_limit, test_limit=args.test_limit, pool="avg", progress=args.progress)
    rows = []
    for name in args.variants:
        config, overrides = VARIANTS[name]
        out = args.out / name
        settings = [*overrides, f"train.epochs={args.epochs}", f"data.limit={args.limit}"]
        summary = ablation.pretrain(out, config, settings, progress=args.progress)
        checkpoint = Path(summary["checkpoint"])
        knn = ablation.probe(out, checkpoint, "knn", **limits)
        linear = ablation.probe(out, checkpoint, "linear", **limits)
        tuned = ablation.finetune(out, checkpoint, finetune_config, progress=args.progress)
        params = sum(p.numel() for p in load_checkpoint(checkpoint).encoder.parameters())
        rows.append((name, summary, params, knn, linear, tuned))

    print()
    print(
        f"Fashion-MNIST 32x32, 8x8 tokens, {args.epochs} epoch(s) of {args.limit} images, batch 64; kNN and linear "
        f"probe (avg pool) and {args.ft_epochs}-epoch full fine-tuning on {args.train_limit} train / "
        f"{args.test_limit} test images (top-1 %)"
    )
    print("| variant | encoder params | final loss | kNN | linear | fine-tune | s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, summary, params, knn, linear, tuned in rows:
        seconds = summary["train_seconds"] / max(summary["steps"], 1)
        print(
            f"| {name} | {params / 1e6:.2f} M | {summary['final_loss']:.4f} | {100 * knn:.2f} | {100 * linear:.2f} | "
            f"{100 * tuned:.2f} | {seconds:.2f} |"
        )
    if rows:  # each architecture untrained, for scale
        for name in ("mae", "convmae"):
            if name not in {row[0] for row in rows}:
                continue
            out = args.out / name
            checkpoint = out / "last.pt"
            knn = ablation.probe(out, checkpoint, "knn", random_init=True, **limits)
            linear = ablation.probe(out, checkpoint, "linear", random_init=True, **limits)
            tuned = ablation.finetune(out, checkpoint, finetune_config, random_init=True, progress=args.progress)
            print(f"| {name}, random init | - | - | {100 * knn:.2f} | {100 * linear:.2f} | {100 * tuned:.2f} | - |")


if __name__ == "__main__":
    main()
