"""Cost of Self-Guided MAE's normalized-cut bipartition relative to one MAE training step.

Times one training step (forward + backward + AdamW) of the demo model, ViT-Tiny on 32x32 images with
patch 4 (8x8 = 64 patches, embed 192) and the "tiny" decoder (128-d), against ``ncut_bipartition`` +
``choose_foreground`` on (B, 64, 128) decoder features; prints the ratio ncut / step (target < 15%), and
what a whole self-guided step costs over a random-mask step (the no-grad guidance pass that gives the
decoder features, the Ncut and the informed mask included).

    .venv/bin/python benchmarks/ncut_overhead.py [--batches 64 256] [--repeats 10] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mimkit.build import create_model
from mimkit.masking import choose_foreground, ncut_bipartition

GRID = (8, 8)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up (allocator, kernels, AdamW state)
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:  # on a shared CPU, oversubscribed OpenMP threads distort small LAPACK calls
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = create_model("vit_tiny", img_size=32, patch_size=4, in_chans=1, decoder="tiny").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05)
    decoder_dim = model.config["decoder_embed_dim"]
    generator = torch.Generator(device).manual_seed(0)

    print(f"# Ncut overhead vs. one training step: vit_tiny, 8x8 patches, decoder {decoder_dim}-d, device {device}")
    print(
        f"# median of {args.repeats} repeats after 3 warm-up runs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    guided = create_model(
        "vit_tiny",
        img_size=32,
        patch_size=4,
        in_chans=1,
        decoder="tiny",
        mask_type="self_guided",
        mask_options={"trigger": "epoch", "start_epoch": 0},
    ).to(device)
    guided.masker.update(step=0, total_steps=1, epoch=0.0)  # informed masks from the first step
    guided_optimizer = torch.optim.AdamW(guided.parameters(), lr=1.5e-4, weight_decay=0.05)
    print(
        f"{'batch':>6} {'step ms':>10} {'ncut f64 ms':>12} {'ratio f64':>10} {'ncut f32 ms':>12} {'ratio f32':>10} "
        f"{'informed step ms':>17} {'ratio':>7}"
    )
    for batch in args.batches:
        images = torch.randn(batch, 1, 32, 32, device=device, generator=generator)
        features = torch.randn(batch, GRID[0] * GRID[1], decoder_dim, device=device, generator=generator)

        def train_step(images: torch.Tensor = images) -> None:
            optimizer.zero_grad(set_to_none=True)
            model(images).loss.backward()
            optimizer.step()

        def ncut(dtype: torch.dtype, features: torch.Tensor = features) -> torch.Tensor:
            with torch.no_grad():
                return choose_foreground(ncut_bipartition(features, dtype=dtype), GRID)

        def informed_step(images: torch.Tensor = images) -> None:
            # the whole self-guided step: decoder features of a random-masked pass, Ncut, informed mask, update
            mask = guided.make_mask(images.shape[0], generator=torch.Generator().manual_seed(0), images=images)
            guided_optimizer.zero_grad(set_to_none=True)
            guided(images, mask=mask).loss.backward()
            guided_optimizer.step()

        step = median_seconds(train_step, args.repeats, device)
        informed = median_seconds(informed_step, args.repeats, device)
        ncut64 = median_seconds(lambda: ncut(torch.float64), args.repeats, device)
        ncut32 = median_seconds(lambda: ncut(torch.float32), args.repeats, device)
        print(
            f"{batch:>6} {step * 1e3:>10.1f} {ncut64 * 1e3:>12.2f} {ncut64 / step:>10.1%} "
            f"{ncut32 * 1e3:>12.2f} {ncut32 / step:>10.1%} {informed * 1e3:>17.1f} {informed / step - 1:>+7.1%}"
        )


if __name__ == "__main__":
    main()
