"""Dense transfer on the shapes set: Mask R-CNN box and mask AP for random-init and MAE-pretrained ViTs
(MIMDet input sampling on and off) and ConvMAE, at one training budget on the CPU.

Every row trains the same detector recipe (configs/detect_shapes.yaml: FPN 64-d, Mask R-CNN heads, AdamW,
layer decay 0.75, warmup then cosine) for the same number of steps and batch size on the same training
images, then is scored with pycocotools on the same validation images. The rows of the first table were
measured before the ConvStem became the ViT's input and keep that layout (``model.stem=patch_embed``,
side stem 64/128, max-pooled 1/32 level), so they reproduce. The speed of MIMDet's input sampling is
measured twice: as the training throughput of the whole detector, and as the time of one forward and
backward pass of the backbone alone on one batch (median of repeats), sampling on against off.

Make the inputs first (docs/transfer.md), then::

    .venv/bin/python benchmarks/detection_transfer.py --out runs/detection/transfer --threads 1

``--mimdet`` runs MIMDet's own ablations instead, each row changing one thing from MIMDet's recipe
(ConvStem as the ViT's input, decoder fill, sampling 0.5, average-pooled 1/32 level): the pretrained
patch embedding as the ViT's input (``model.stem=patch_embed``, a side stem of the ConvStem's widths for
1/4 and 1/8), the mask-token fill, and sampling 0.25 and 1.0, for every seed of ``--seeds``; then the
backbone's forward and backward time at sampling 1.0, 0.5 and 0.25, interleaved (one of each per repeat,
in rotating order) and reported as the median of the per-repeat ratios to all tokens::

    .venv/bin/python benchmarks/detection_transfer.py --mimdet --out runs/detection/mimdet --steps 100 --seeds 0 1

``--deepforest`` runs a box-only pair instead (Faster R-CNN, ``model.masks=false``: MAE-pretrained ViT
against its random init) on real aerial images: deepforest's three ``Tree`` images cut into 200-pixel
tiles (:func:`mimkit.dense.data.sample_data.deepforest_tiles`), the tiles of one whole image held out::

    .venv/bin/python benchmarks/detection_transfer.py --deepforest --out runs/detection/deepforest --steps 300

Every finished run is cached as its ``results.json`` and skipped when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mimkit.config import load_config
from mimkit.dense.data.sample_data import deepforest_tiles
from mimkit.tasks.detect import DetectConfig, build_detection_model, pretrained_for, run_detect_train

# the layout the first table was measured with: pretrained patch embedding, side stem, max-pooled 1/32 level
PATCH_EMBED_LAYOUT = ["model.stem=patch_embed", "model.stem_channels=[64,128]", "model.p5_pool=max"]
ROWS: list[tuple[str, list[str]]] = [
    (
        "ViT-Tiny/8, random init (sampling 0.5)",
        ["model.checkpoint={mae}", "model.random_init=true", *PATCH_EMBED_LAYOUT],
    ),
    ("MAE ViT-Tiny/8, MIMDet sampling 0.5", ["model.checkpoint={mae}", *PATCH_EMBED_LAYOUT]),
    (
        "MAE ViT-Tiny/8, sampling off (all 64 tokens)",
        ["model.checkpoint={mae}", "model.sample_ratio=1.0", *PATCH_EMBED_LAYOUT],
    ),
    (
        "MAE ViT-Tiny/8, MIMDet sampling 0.25",
        ["model.checkpoint={mae}", "model.sample_ratio=0.25", *PATCH_EMBED_LAYOUT],
    ),
    ("ConvMAE (48/96/192-d), pretrained", ["model.checkpoint={convmae}", "model.backbone=convmae"]),
]

# MIMDet's ablations: the first row is MIMDet's recipe, every other row changes one key of it
MIMDET_ROWS: list[tuple[str, list[str]]] = [
    ("MIMDet: ConvStem input, decoder fill, sampling 0.5", []),
    ("pretrained patch-embed input (side stem for 1/4, 1/8)", ["model.stem=patch_embed"]),
    ("fill=mask_token", ["model.fill=mask_token"]),
    ("sampling 0.25", ["model.sample_ratio=0.25"]),
    ("sampling 1.0 (all 64 tokens)", ["model.sample_ratio=1.0"]),
]

DEEPFOREST_ROWS: list[tuple[str, list[str]]] = [  # measured with the patch-embed layout, like the first table
    (
        "ViT-Tiny/8, random init (sampling 0.5)",
        ["model.checkpoint={mae}", "model.random_init=true", *PATCH_EMBED_LAYOUT],
    ),
    ("MAE ViT-Tiny/8 (shapes), MIMDet sampling 0.5", ["model.checkpoint={mae}", *PATCH_EMBED_LAYOUT]),
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
            config = load_config(
                args.config, [*filled, *data, *common, f"train.output_dir={run_dir}"], schema=DetectConfig
            )
            results = run_detect_train(config, progress=False)
        box, train = results["val"]["box"], results["train"]
        rows.append((name, box["AP"], box["AP50"], box["AP75"], train["seconds"], train["img_per_s"]))
        print(f"{name}: box AP {box['AP']:.1f} (AP50 {box['AP50']:.1f}), {train['seconds']:.0f} s", flush=True)
    print("\n| backbone | box AP | box AP50 | box AP75 | train s | img/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ap, ap50, ap75, seconds, speed in rows:
        print(f"| {name} | {ap:.1f} | {ap50:.1f} | {ap75:.1f} | {seconds:.0f} | {speed:.1f} |")


def run_mimdet(args: argparse.Namespace) -> None:
    """Box and mask AP of the :data:`MIMDET_ROWS` for every seed, then the interleaved backbone timing."""
    summary_path = args.out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {"runs": {}}
    for seed in args.seeds:  # every row of one seed before the next seed: a cut-short run still has whole tables
        for index, (name, overrides) in enumerate(MIMDET_ROWS):
            if args.rows is not None and index not in args.rows:
                continue
            run_dir = args.out / f"row{index}_seed{seed}"
            filled = [f"model.checkpoint={args.mae}", *overrides]
            common = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.seed={seed}"]
            if (run_dir / "results.json").exists():
                results = json.loads((run_dir / "results.json").read_text())
            else:
                run_overrides = [*filled, *common, "train.progress=false", f"train.output_dir={run_dir}"]
                config = load_config(args.config, run_overrides, schema=DetectConfig)
                results = run_detect_train(config, progress=False)
            box, mask, train = results["val"]["box"], results["val"]["mask"], results["train"]
            summary["runs"][f"{index}/{seed}"] = {
                "name": name, "overrides": filled, "seed": seed, "box_AP": box["AP"], "box_AP50": box["AP50"],
                "mask_AP": mask["AP"], "mask_AP50": mask["AP50"], "train_seconds": train["seconds"],
                "train_img_per_s": train["img_per_s"], "steps": train["steps"], "final_loss": train["final_loss"],
            }  # fmt: skip
            summary_path.write_text(json.dumps(summary, indent=2))
            print(f"seed {seed} | {name}: box AP {box['AP']:.1f}, mask AP {mask['AP']:.1f}, "
                  f"{train['seconds']:.0f} s", flush=True)  # fmt: skip
    if "backbone_timing" not in summary:
        ratios = {"sampling 1.0": 1.0, "sampling 0.5": 0.5, "sampling 0.25": 0.25}
        summary["backbone_timing"] = interleaved_backbone_timing(
            args.config,
            {label: [f"model.checkpoint={args.mae}", f"model.sample_ratio={ratio}"] for label, ratio in ratios.items()},
            repeats=args.repeats,
            batch=args.batch_size,
        )
        summary_path.write_text(json.dumps(summary, indent=2))
    timing = summary["backbone_timing"]
    print("backbone forward+backward, batch", args.batch_size, {k: f"{v['ms']:.0f} ms, {v['speedup']:.2f}x"
                                                              for k, v in timing.items()})  # fmt: skip
    print("\n| row | box AP (seed " + " / ".join(map(str, args.seeds)) + ") | box AP50 | mask AP | mask AP50 | "
          "final train loss | train img/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for index, (name, _) in enumerate(MIMDET_ROWS):
        runs = [summary["runs"].get(f"{index}/{seed}") for seed in args.seeds]
        if any(run is None for run in runs):
            continue

        def cell(key: str, runs: list[Any] = runs) -> str:
            return " / ".join(f"{run[key]:.2f}" for run in runs)  # two decimals: short budgets give AP under 1

        print(f"| {name} | {cell('box_AP')} | {cell('box_AP50')} | {cell('mask_AP')} | {cell('mask_AP50')} | "
              f"{cell('final_loss')} | {cell('train_img_per_s')} |")  # fmt: skip


def interleaved_backbone_timing(
    config_path: Path, settings: dict[str, list[str]], repeats: int, batch: int
) -> dict[str, dict[str, float]]:
    """One forward + backward pass of each setting's backbone (with FPN, training mode) on the same batch,
    interleaved: every repeat times each setting once, in an order that rotates, so machine load falls on
    all alike. Returns per setting the median ms and the median of the per-repeat ratios of the first
    setting's time to its own (its speed-up)."""
    backbones = {}
    for label, overrides in settings.items():
        config = load_config(config_path, overrides, schema=DetectConfig)
        backbones[label] = build_detection_model(pretrained_for(config), config, 3).backbone.train()
    images = torch.randn(batch, 3, 64, 64)
    labels = list(backbones)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for repeat in range(repeats + 2):
        order = labels[repeat % len(labels) :] + labels[: repeat % len(labels)]
        for label in order:
            start = time.perf_counter()
            loss = sum(level.square().mean() for level in backbones[label](images).values())
            loss.backward()
            times[label].append(time.perf_counter() - start)
    first = labels[0]
    return {
        label: {
            "ms": 1000 * statistics.median(times[label][2:]),  # the first two repeats warm up
            "speedup": statistics.median(a / b for a, b in zip(times[first][2:], times[label][2:], strict=True)),
        }
        for label in labels
    }


def backbone_step_seconds(config_path: Path, overrides: list[str], repeats: int, batch: int) -> float:
    """Median seconds of one forward + backward pass of the detector's backbone (with FPN) on one batch."""
    config = load_config(config_path, overrides, schema=DetectConfig)
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
    parser.add_argument("--mimdet", action="store_true", help="MIMDet's ablations (stem, fill, sampling ratio)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="--mimdet: train.seed of each run")
    parser.add_argument("--repeats", type=int, default=20, help="--mimdet: timed repeats of each backbone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.deepforest:
        run_deepforest(args)
        return
    if args.mimdet:
        run_mimdet(args)
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
            config = load_config(args.config, [*filled, *common, f"train.output_dir={run_dir}"], schema=DetectConfig)
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
        overrides = [f"model.checkpoint={args.mae}", f"model.sample_ratio={ratio}", *PATCH_EMBED_LAYOUT]
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
