"""Throughput of mimkit's batched MAE augmentation against torchvision's per-image pipeline.

Both do RandomResizedCrop(scale=(0.2, 1.0)) + horizontal flip + normalize on the same uint8 batch of
Fashion-MNIST images; the ratio printed is torchvision time / mimkit time (above 1: mimkit is faster).

    .venv/bin/python benchmarks/augment_throughput.py [--batch 256] [--size 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from mimkit.data.fashion_mnist import load_fashion_mnist
from mimkit.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD, MAEAugment


def median_seconds(fn: Callable[[int], object], repeats: int) -> float:
    for seed in range(3):  # warm-up
        fn(seed)
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        fn(seed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    images, _ = load_fashion_mnist(split="train")
    batch = images[: args.batch]  # (B, 1, 28, 28) uint8
    ours = MAEAugment(args.size, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    peer = v2.Compose(
        [
            v2.RandomResizedCrop(args.size, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
        ]
    )

    def run_ours(seed: int) -> object:
        return ours(batch, torch.Generator().manual_seed(seed))

    def run_peer(seed: int) -> object:
        torch.manual_seed(seed)
        return torch.stack([peer(image) for image in batch])

    t_ours = median_seconds(run_ours, args.repeats)
    t_peer = median_seconds(run_peer, args.repeats)
    print(f"batch {args.batch} of 28x28 -> {args.size}x{args.size}, median of {args.repeats}")
    print(f"mimkit MAEAugment (batched):        {1e3 * t_ours:8.2f} ms  ({args.batch / t_ours:10.0f} img/s)")
    print(f"torchvision v2 (per image):         {1e3 * t_peer:8.2f} ms  ({args.batch / t_peer:10.0f} img/s)")
    print(f"ratio torchvision / mimkit:         {t_peer / t_ours:8.1f}x")


if __name__ == "__main__":
    main()
