"""Cost of one ConvMAE training step relative to one MAE step on the same images and grid.

Times forward + backward + AdamW of ``convmae_tiny`` (patch sizes (1, 2, 2): 8x8 tokens on 32x32
images) and a ConvMAE of the ViT-Tiny's size against the demo's MAE ViT-Tiny/4 (8x8 patches), all with
the "tiny" decoder and 75 % masks, and prints the ratio with the parameter counts (upstream reports
about 2x per iteration at Base size).

    .venv/bin/python benchmarks/convmae_step_cost.py [--batch 64] [--repeats 10] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
from typing import Any

import ablation  # benchmarks/ablation.py, beside this script
import torch

from mimkit.build import create_model

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mae vit_tiny/4": ("vit_tiny", dict(patch_size=4)),
    "convmae_tiny (1,2,2)": ("convmae_tiny", dict(patch_sizes=(1, 2, 2))),
    "convmae_tiny (1,2,2), no fusion": ("convmae_tiny", dict(patch_sizes=(1, 2, 2), fuse=False)),
    # The ablation's ConvMAE of the ViT-Tiny's size (benchmarks/convmae_ablation.py).
    "convmae 48/96/192 x 2/2/11": (
        "convmae_tiny",
        dict(patch_sizes=(1, 2, 2), embed_dims=(48, 96, 192), depths=(2, 2, 11), num_heads=3),
    ),
}


def step_seconds(name: str, options: dict, batch: int, repeats: int, device: torch.device) -> tuple[float, int]:
    torch.manual_seed(0)
    model = create_model(name, img_size=32, in_chans=1, decoder="tiny", mask_type="block", **options).to(device)
    images = torch.randn(batch, 1, 32, 32, device=device)
    seconds = ablation.median_step_seconds(model, images, repeats=repeats, warmup=3)
    return seconds, sum(p.numel() for p in model.encoder.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"# one training step, batch {args.batch}, 32x32 gray, block masks 0.75, device {device}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats}"
    )
    print(f"{'model':<34} {'encoder params':>15} {'step ms':>9} {'vs MAE':>7}")
    reference = None
    for label, (name, options) in MODELS.items():
        seconds, params = step_seconds(name, options, args.batch, args.repeats, device)
        reference = reference or seconds
        print(f"{label:<34} {params:>15,} {seconds * 1e3:>9.1f} {seconds / reference:>6.2f}x")


if __name__ == "__main__":
    main()
