"""mimkit against HuggingFace ``ViTMAEForPreTraining``: images/s and GFLOP/s of the same architecture
(interleaved, paired ratio), loss trajectories from the same weights and mask noise, and images/s against
batch size and mask ratio."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mimkit.bench.contenders import (
    build_hf,
    build_mimkit,
    count_parameters,
    hf_contender,
    make_images,
    mimkit_contender,
    step_flops,
)
from mimkit.bench.timing import Peak, paired_ratio, time_interleaved

PRECISIONS = ("fp32", "bf16")


def compare_with_hf(
    config: dict[str, Any],
    *,
    steps: int,
    repeats: int,
    peak: Peak,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]:
    """mimkit against HF ``ViTMAEForPreTraining`` on one ViT config: images/s, GFLOP/s, ratio.

    Both run on ``device``; with ``precision="bf16"`` both forwards run under bf16 autocast (weights,
    gradients and AdamW in fp32), and ``peak`` should then be the bf16 matmul peak."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16"
    model = build_mimkit(config).to(device)
    hf = build_hf(model).to(device)
    images = make_images(config).to(device)
    flops = step_flops(model, images.shape[0])
    mimkit_params, hf_params = count_parameters(model), count_parameters(hf)
    timings = time_interleaved(
        [mimkit_contender("mimkit", model, images, bf16=bf16), hf_contender("hf", hf, images, flops, bf16=bf16)],
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        device=device,
    )
    return {
        "config": config,
        "mimkit_params": mimkit_params,
        "hf_params": hf_params,
        "mimkit": timings["mimkit"].summary(peak),
        "hf": timings["hf"].summary(peak),
        "ratio": paired_ratio(timings["hf"], timings["mimkit"]),
        "ratio_cpu": paired_ratio(timings["hf"], timings["mimkit"], cpu=True),
    }


def loss_check(config: dict[str, Any], *, steps: int = 50, lr: float = 1.5e-4, seed: int = 0) -> dict[str, Any]:
    """Train mimkit and HF from the same weights on the same fixed batch and the same mask noise for
    ``steps`` AdamW steps; their losses should agree within float noise at every step.

    Returns:
        ``mimkit_losses``, ``hf_losses`` and the largest absolute and relative difference.
    """
    model = build_mimkit(config, seed=seed)
    hf = build_hf(model, copy_weights=True)
    images = make_images(config, seed=seed)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05) for m in (model, hf)]
    generator = torch.Generator().manual_seed(seed + 1)
    losses: list[list[float]] = [[], []]
    for _ in range(steps):
        noise = torch.rand(images.shape[0], model.grid[0] * model.grid[1], generator=generator)  # (B, L)
        for index, (module, optimizer) in enumerate(zip((model, hf), optimizers, strict=True)):
            out = module(images, noise) if index == 0 else module(pixel_values=images, noise=noise)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            losses[index].append(float(out.loss.detach()))
    diffs = [abs(a - b) for a, b in zip(*losses, strict=True)]
    return {
        "steps": steps,
        "lr": lr,
        "batch": images.shape[0],
        "mimkit_losses": losses[0],
        "hf_losses": losses[1],
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(d / abs(b) for d, b in zip(diffs, losses[1], strict=True)),
        "first_loss": losses[0][0],
        "last_loss": losses[0][-1],
    }


def sweep(
    config: dict[str, Any], *, batches: Sequence[int], ratios: Sequence[float], steps: int, repeats: int
) -> dict[str, Any]:
    """Images/s of mimkit and HF against batch size (at the config's mask ratio 0.75) and against mask
    ratio (at the config's batch)."""
    rows: list[dict[str, Any]] = []
    points = [(batch, 0.75) for batch in batches] + [(config["batch"], ratio) for ratio in ratios if ratio != 0.75]
    for batch, ratio in points:
        model = build_mimkit(config, mask_ratio=ratio)
        hf = build_hf(model)
        images = make_images(config, batch)
        flops = step_flops(model, batch)
        timings = time_interleaved(
            [mimkit_contender("mimkit", model, images), hf_contender("hf", hf, images, flops)],
            steps=steps,
            repeats=repeats,
        )
        rows.append(
            {
                "batch": batch,
                "mask_ratio": ratio,
                "mimkit_img_per_s": timings["mimkit"].images_per_second,
                "hf_img_per_s": timings["hf"].images_per_second,
            }
        )
    return {"rows": rows}


def plot_sweep(result: dict[str, Any], path: Path, title: str) -> Path:
    """Images/s against batch size and against mask ratio, mimkit and HF, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    by_batch = sorted((r for r in rows if r["mask_ratio"] == 0.75), key=lambda r: r["batch"])
    batch = (
        max(r["batch"] for r in rows if r["mask_ratio"] != 0.75) if any(r["mask_ratio"] != 0.75 for r in rows) else 0
    )
    by_ratio = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["mask_ratio"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("mimkit_img_per_s", "mimkit"), ("hf_img_per_s", "HF ViTMAE")):
        axes[0].plot([r["batch"] for r in by_batch], [r[key] for r in by_batch], marker="o", label=label)
        axes[1].plot([r["mask_ratio"] for r in by_ratio], [r[key] for r in by_ratio], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="batch size (mask ratio 0.75)", ylabel="images / s")
    axes[0].set_xticks([r["batch"] for r in by_batch], [str(r["batch"]) for r in by_batch])
    axes[0].minorticks_off()
    axes[1].set(xlabel=f"mask ratio (batch {batch})", ylabel="images / s")
    for axis in axes:
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
