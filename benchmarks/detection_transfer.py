"""Dense transfer on the shapes set: Mask R-CNN box and mask AP for random-init and MAE-pretrained ViTs
(MIMDet input sampling on and off) and ConvMAE, at one training budget on the CPU.

Every row trains the same detector recipe (configs/detect_shapes.yaml: ConvStem + FPN 64-d, Mask R-CNN
heads, AdamW, layer decay 0.75, warmup then cosine) for the same number of steps and batch size on the
same training images, then is scored with pycocotools on the same validation images. The speed of
MIMDet's input sampling is measured twice: as the training throughput of the whole detector, and as the
time of one forward and backward pass of the backbone alone on one batch (median of repeats), sampling
on against off.

Make the inputs first (README, "Detection and segmentation transfer"), then::

    .venv/bin/python benchmarks/detection_transfer.py --out runs/detection/transfer --threads 1

``--deepforest`` runs a box-only pair instead (Faster R-CNN, ``model.masks=false``: MAE-pretrained ViT
against its random init) on real aerial images: deepforest's three ``Tree`` images cut into 200-pixel
tiles (:func:`mimkit.detection.sample_data.deepforest_tiles`), the tiles of one whole image held out::

    .venv/bin/python benchmarks/detection_transfer.py --deepforest --out runs/detection/deepforest --steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mimkit.detection.sample_data import deepforest_tiles
from mimkit.detection.train import build_detection_model, detect_config, pretrained_for, run_detect_train

ROWS: list[tuple[str, list[str]]] = [
    ("ViT-Tiny/8, random init (sampling 0.5)", ["model.checkpoint={mae}", "model.random_init=true"]),
    ("MAE ViT-Tiny/8, MIMDet sampling 0.5", ["model.checkpoint={mae}"]),
    ("MAE ViT-Tiny/8, sampling off (all 64 tokens)", ["model.checkpoint={mae}", "model.sample_ratio=1.0"]),
    ("MAE ViT-Tiny/8, MIMDet sampling 0.25", ["model.checkpoint={mae}", "model.sample_ratio=0.25"]),
    ("ConvMAE (48/96/192-d), pretrained", ["model.checkpoint={convmae}", "model.backbone=convmae"]),
]

DEEPFOREST_ROWS: list[tuple[str, list[str]]] = [
    ("ViT-Tiny/8, random init (sampling 0.5)", ["model.checkpoint={mae}", "model.random_init=true"]),
    ("MAE ViT-Tiny/8 (shapes), MIMDet sampling 0.5", ["model.checkpoint={mae}"]),
]


def run_deepforest(args: argparse.Namespace) -> None:
    """Box AP of the :data:`DEEPFOREST_ROWS` on deepforest's tiled tree images."""
    train_dir, val_dir = deepforest_tiles(args.out / "data")
    data = [f"data.train={train_dir}", f"data.val={val_dir}", "model.masks=false"]
    common = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.seed={args.seed}"]
    common.append("train.progress=false")
    rows = []
    for index, (name, overrides) in enumerate(DEEPFOREST_ROWS):
        run_dir = args.out / f"row{index}"
        filled = [item.format(mae=args.mae) for item in overrides]
        if (run_dir / "results.json").exists():
            results = json.loads((run_dir / "results.json").read_text())
        else:
            config = detect_config(args.config, [*filled, *data, *common, f"train.output_dir={run_dir}"])
            results = run_detect_train(config, progress=False)
        box, train = results["val"]["box"], results["train"]
        rows.append((name, box["AP"], box["AP50"], box["AP75"], train["seconds"], train["img_per_s"]))
        print(f"{name}: box AP {box['AP']:.1f} (AP50 {box['AP50']:.1f}), {train['seconds']:.0f} s", flush=True)
    print("\n| backbone | box AP | box AP50 | box AP75 | train s | img/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ap, ap50, ap75, seconds, speed in rows:
        print(f"| {name} | {ap:.1f} | {ap50:.1f} | {ap75:.1f} | {seconds:.0f} | {speed:.1f} |")


def backbone_step_seconds(config_path: Path, overrides: list[str], repeats: int, batch: int) -> float:
    """Median seconds of one forward + backward pass of the detector's backbone (with FPN) on one batch."""
    config = detect_config(config_path, overrides)
    detector = build_detection_model(pretrained_for(config), config, 3)
    backbone = detector.backbone.train()
    images = torch.randn(batch, 3, 64, 64)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        loss = sum(level.square().mean() for level in backbone(images).values())
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first two warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/detection/transfer"))
    parser.add_argument("--config", type=Path, default=Path("configs/detect_shapes.yaml"))
    parser.add_argument("--mae", default="runs/detection/mae_vit_shapes/last.pt")
    parser.add_argument("--convmae", default="runs/detection/convmae_shapes/last.pt")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every row (data order, init, sampling)")
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="indices of the rows to run (default all)")
    parser.add_argument("--deepforest", action="store_true", help="the box-only pair on deepforest's tree tiles")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.deepforest:
        run_deepforest(args)
        return
    summary_path = args.out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {"rows": {}}
    common = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.seed={args.seed}"]
    common.append("train.progress=false")
    for index, (name, overrides) in enumerate(ROWS):
        if args.rows is not None and index not in args.rows:
            continue
        run_dir = args.out / f"row{index}"
        filled = [item.format(mae=args.mae, convmae=args.convmae) for item in overrides]
        if (run_dir / "results.json").exists():
            results = json.loads((run_dir / "results.json").read_text())
        else:
            config = detect_config(args.config, [*filled, *common, f"train.output_dir={run_dir}"])
            results = run_detect_train(config, progress=False)
        row = {
            "name": name,
            "overrides": filled,
            "box_AP": results["val"]["box"]["AP"],
            "box_AP50": results["val"]["box"]["AP50"],
            "mask_AP": results["val"]["mask"]["AP"],
            "mask_AP50": results["val"]["mask"]["AP50"],
            "train_seconds": results["train"]["seconds"],
            "train_img_per_s": results["train"]["img_per_s"],
            "steps": results["train"]["steps"],
        }
        summary["rows"][str(index)] = row
        summary_path.write_text(json.dumps(summary, indent=2))
        print(
            f"{name}: box AP {row['box_AP']:.1f} (AP50 {row['box_AP50']:.1f}), mask AP {row['mask_AP']:.1f} "
            f"(AP50 {row['mask_AP50']:.1f}), {row['train_seconds']:.0f} s, {row['train_img_per_s']:.1f} img/s",
            flush=True,
        )
    timing = {}
    for label, ratio in (("all tokens", 1.0), ("sampling 0.5", 0.5), ("sampling 0.25", 0.25)):
        overrides = [f"model.checkpoint={args.mae}", f"model.sample_ratio={ratio}"]
        timing[label] = backbone_step_seconds(args.config, overrides, repeats=20, batch=args.batch_size)
    summary["backbone_step_seconds"] = timing
    summary_path.write_text(json.dumps(summary, indent=2))
    shown = {label: f"{seconds * 1000:.0f} ms" for label, seconds in timing.items()}
    print("backbone forward+backward, batch", args.batch_size, shown)
    print("\n| backbone | box AP | box AP50 | mask AP | mask AP50 | train s | img/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in summary["rows"].values():
        print(
            f"| {row['name']} | {row['box_AP']:.1f} | {row['box_AP50']:.1f} | {row['mask_AP']:.1f} | "
            f"{row['mask_AP50']:.1f} | {row['train_seconds']:.0f} | {row['train_img_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
