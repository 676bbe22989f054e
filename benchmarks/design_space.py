"""The masked-image-modeling design space, one switch at a time: MAE's ablations and MaskDistill's unified view.

Every row pretrains the demo's student (ViT-Tiny/4, 8x8 patches of 32x32 Fashion-MNIST) for the same steps on
the same images and changes ONE thing against the reference row of its group; then its frozen encoder is
measured by kNN and the linear probe (better of class token and average pool) and fine-tuned at one fixed
budget (``benchmarks/ablation.py``). Groups and rows:

* MAE (pixels, norm-pix, loss on hidden patches, visible-only encoder, decoder 128-d x 4): the loss on all
  patches; norm-pix off; the mask token in the encoder (BEiT's encoder with MAE's decoder); decoder depth
  1, 2 and 8 at fixed width (the MAE article: linear probing is sensitive to decoder depth, fine-tuning not).
* MaskDistill (BEiT encoder + FC head, teacher features with LayerNorm, smooth-L1): MAE's decoder instead of
  the FC head; no LayerNorm on the target; MSE instead of smooth-L1.
* BEiT v2 (BEiT encoder + FC head, VQ-KD codes): MAE's decoder instead of the FC head; the class-token head.
* MILAN (prompting decoder, teacher-guided masks, cosine loss): MAE's decoder; random masks; smooth-L1.

The teacher is the ImageNet EfficientNet-Lite0 (stage 4 at input 128: an 8x8 map); VQ-KD uses the tokenizer
of ``configs/vqkd_fmnist.yaml`` (trained first when ``--tokenizer`` does not exist). Runs are cached under
``--out/seed<N>/<row>/`` (``--rows`` picks some, ``--seed`` the seed); ``--gather --seeds 0 1`` prints the
table of the finished rows, each row's mean and per-seed values. Step cost (``--step-cost``): one training
step of every row on the same batch of 64 images, the rows taking turns round by round in one process, the
median of ``--rounds`` relative to the MAE reference, cached as ``--out/step_cost.json`` for the table::

    .venv/bin/python benchmarks/design_space.py --out runs/design --threads 1 [--seed 1] [--rows mae mae_loss_all]
    .venv/bin/python benchmarks/design_space.py --out runs/design --threads 1 --step-cost --rounds 3
    .venv/bin/python benchmarks/design_space.py --out runs/design --gather --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import ablation  # benchmarks/ablation.py, beside this script
import torch
from targets_ablation import RECIPE, TEACHER


def rows(tokenizer: Path) -> dict[str, tuple[str, str, list[str]]]:
    """Row name -> (group, what changes, overrides of the demo recipe)."""
    maskdistill = ["target.type=maskdistill", *TEACHER]
    beitv2 = ["target.type=vqkd", f"target.tokenizer={tokenizer}"]
    milan = [
        "target.type=milan",
        *TEACHER,
        "mask.type=attention",
        "mask.attention.mode=keep",
        "mask.attention.source=teacher",
    ]
    return {
        "mae": ("MAE", "reference: hidden-patch loss, norm-pix, visible-only encoder, decoder depth 4", []),
        "mae_loss_all": ("MAE", "loss on all patches", ["target.loss_on=all"]),
        "mae_no_norm_pix": ("MAE", "norm-pix off", ["target.norm_pix=false"]),
        "mae_mask_in_encoder": ("MAE", "mask token in the encoder", ["model.encoder_sees=all"]),
        "mae_decoder_depth_1": ("MAE", "decoder depth 1", ["model.decoder_depth=1"]),
        "mae_decoder_depth_2": ("MAE", "decoder depth 2", ["model.decoder_depth=2"]),
        "mae_decoder_depth_8": ("MAE", "decoder depth 8", ["model.decoder_depth=8"]),
        "maskdistill": ("MaskDistill", "reference: BEiT encoder + FC head, LayerNorm target, smooth-L1", maskdistill),
        "maskdistill_mae_decoder": ("MaskDistill", "MAE decoder instead of FC head", [*maskdistill, "model.head=mae"]),
        "maskdistill_no_norm": ("MaskDistill", "target not LayerNormed", [*maskdistill, "target.norm_features=false"]),
        "maskdistill_mse": ("MaskDistill", "MSE instead of smooth-L1", [*maskdistill, "target.loss=mse"]),
        "beitv2": ("BEiT v2", "reference: BEiT encoder + FC head, VQ-KD codes", beitv2),
        "beitv2_mae_decoder": ("BEiT v2", "MAE decoder instead of FC head", [*beitv2, "model.head=mae"]),
        "beitv2_cls": ("BEiT v2", "class-token head", [*beitv2, "target.cls.enabled=true"]),
        "milan": ("MILAN", "reference: prompting decoder, teacher-guided masks, cosine", milan),
        "milan_mae_decoder": ("MILAN", "MAE decoder instead of prompting", [*milan, "model.head=mae"]),
        "milan_random_masks": ("MILAN", "random masks", [*milan, "mask.type=random"]),
        "milan_smooth_l1": ("MILAN", "smooth-L1 instead of cosine", [*milan, "target.loss=smooth_l1"]),
    }  # fmt: skip


def cell(values: list[float], digits: int = 1, scale: float = 100.0) -> str:
    """One seed's value, or the mean of several followed by each seed's value."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    each = " / ".join(f"{scale * value:.{digits}f}" for value in values)
    return f"{scale * statistics.mean(values):.{digits}f} ({each})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/design"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/vqkd_fmnist/tokenizer.pt"))
    parser.add_argument("--rows", nargs="*", default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=10000, help="pretraining images (the first ones)")
    parser.add_argument("--train-limit", type=int, default=2000, help="probe and fine-tuning training images")
    parser.add_argument("--test-limit", type=int, default=1000, help="probe and fine-tuning test images")
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the runs (cached under --out/seed<N>/)")
    parser.add_argument("--gather", action="store_true", help="only print the table of the finished rows")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="--gather: seeds to show (default --seed)")
    parser.add_argument(
        "--step-cost", action="store_true", help="only time one training step of every row (--out/step_cost.json)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="--step-cost: timed rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = rows(args.tokenizer)
    names = args.rows or list(table)
    if unknown := set(names) - set(table):
        parser.error(f"unknown rows {sorted(unknown)}; choose from {list(table)}")
    cost_path = args.out / "step_cost.json"
    if args.step_cost:
        timed = list(dict.fromkeys(["mae", *names]))
        seconds = ablation.step_costs(RECIPE, {name: table[name][2] for name in timed}, rounds=args.rounds)
        record = {"threads": torch.get_num_threads(), "rounds": args.rounds, "batch": 64, "seconds": seconds}
        args.out.mkdir(parents=True, exist_ok=True)
        cost_path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"one training step on 64 images, {record['threads']} thread(s), median of {args.rounds} rounds")
        print("| row | ms | relative to `mae` |")
        print("|---|---:|---:|")
        for name in timed:
            print(f"| `{name}` | {1000 * seconds[name]:.0f} | {seconds[name] / seconds['mae']:.2f}x |")
        return
    if not args.gather and any(table[name][0] == "BEiT v2" for name in names):
        ablation.ensure_tokenizer(args.tokenizer, progress=args.progress)
    finetune_config = ablation.finetune_recipe(args.ft_epochs, args.train_limit, args.test_limit)
    limits = dict(train_limit=args.train_limit, test_limit=args.test_limit, progress=args.progress)
    seeds = args.seeds if args.gather and args.seeds else [args.seed]
    results: dict[str, list[tuple[dict[str, Any], float, float, float]]] = {}
    for name in names:
        for seed in seeds:
            out = args.out / f"seed{seed}" / name
            if args.gather and not (out / "finetune" / "full" / "pretrained" / "results.json").is_file():
                continue
            budget = [f"train.epochs={args.epochs}", f"data.limit={args.limit}", f"train.seed={seed}"]
            measured = ablation.measure(out, RECIPE, [*table[name][2], *budget], finetune_config, **limits)
            results.setdefault(name, []).append(measured)
    costs = json.loads(cost_path.read_text())["seconds"] if cost_path.is_file() else {}

    steps = next(iter(results.values()))[0][0].get("steps", "-") if results else "-"
    print()
    print(
        f"Fashion-MNIST 32x32, ViT-Tiny/4, seeds {seeds}: {args.epochs} epoch(s) of {args.limit} images ({steps} "
        f"steps of 64); kNN, linear probe and {args.ft_epochs}-epoch fine-tuning on {args.train_limit} train / "
        f"{args.test_limit} test images (top-1 %: the mean, then each seed's value where a row has several); "
        "step cost relative to the MAE reference (--out/step_cost.json)"
    )
    print("| group | row | changes | seeds | final loss | kNN | linear | fine-tune | step cost |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, measured in results.items():
        group, change, _ = table[name]
        cost = f"{costs[name] / costs['mae']:.2f}x" if name in costs and "mae" in costs else "-"
        losses = [summary["final_loss"] for summary, *_ in measured]
        knn, linear, tuned = ([m[index] for m in measured] for index in (1, 2, 3))
        print(
            f"| {group} | `{name}` | {change} | {len(measured)} | {cell(losses, 3, 1.0)} | {cell(knn)} "
            f"| {cell(linear)} | {cell(tuned)} | {cost} |"
        )


if __name__ == "__main__":
    main()
