"""What changes the cost of a step: the encoder's speed-up from masking, levers (plain-ops attention, fused
AdamW, activation checkpointing, ``torch.compile``) and the step time of other variants relative to MAE."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mimkit.bench.contenders import CONFIGS, build_mimkit, make_images, mimkit_contender, step_flops
from mimkit.bench.timing import Contender, Peak, paired_ratio, time_interleaved


def masking_speedup(config: dict[str, Any], *, steps: int, repeats: int, ratio: float = 0.75) -> dict[str, Any]:
    """Encoder forward + backward at mask ratio ``ratio`` against no masking (MAE reports 3x or more)."""
    model = build_mimkit(config, mask_ratio=ratio)
    encoder = model.encoder
    images = make_images(config)
    batch = images.shape[0]

    def encoder_step(mask_ratio: float) -> Callable[[], Any]:
        counter = iter(range(1 << 62))

        def step() -> Tensor:
            generator = torch.Generator().manual_seed(next(counter))
            mask = model.make_mask(batch, generator=generator) if mask_ratio else None  # None: all patches
            tokens = encoder(images, mask).tokens  # (B, 1 + N, D)
            tokens.square().mean().backward()
            return tokens.detach()

        return step

    masked, full = f"encoder masked {ratio:g}", "encoder unmasked"
    timings = time_interleaved(
        [Contender(masked, encoder_step(ratio), batch), Contender(full, encoder_step(0.0), batch)],
        steps=steps,
        repeats=repeats,
    )
    return {
        "mask_ratio": ratio,
        "masked": timings[masked].summary(),
        "unmasked": timings[full].summary(),
        "speedup": paired_ratio(timings[full], timings[masked]),
        "speedup_cpu": paired_ratio(timings[full], timings[masked], cpu=True),
    }


def levers(config: dict[str, Any], *, steps: int, repeats: int, peak: Peak, compile: bool) -> dict[str, Any]:
    """The same step with one change at a time against mimkit's default, interleaved: attention by plain
    ops instead of SDPA, fused AdamW, activation checkpointing and, with ``compile``, ``torch.compile`` of
    encoder and decoder (inductor)."""
    from mimkit.layers import set_attention_impl

    images = make_images(config)
    contenders = [mimkit_contender("default", build_mimkit(config), images)]
    math = build_mimkit(config)
    set_attention_impl(math, "math")
    contenders.append(mimkit_contender("math attention", math, images))
    contenders.append(mimkit_contender("fused AdamW", build_mimkit(config), images, fused_adamw=True))
    contenders.append(mimkit_contender("grad checkpointing", build_mimkit(config, grad_checkpointing=True), images))
    results: dict[str, Any] = {}
    if compile:
        compiled = build_mimkit(config)
        flops = step_flops(compiled, images.shape[0])
        compiled.encoder = torch.compile(compiled.encoder)  # type: ignore[assignment]
        compiled.decoder = torch.compile(compiled.decoder)  # type: ignore[assignment]
        contender = mimkit_contender("torch.compile", compiled, images, flops=flops)
        start = time.perf_counter()
        contender.step()  # compiles forward and backward
        results["compile_seconds"] = time.perf_counter() - start
        contenders.append(contender)
    timings = time_interleaved(contenders, steps=steps, repeats=repeats)
    default = timings["default"]
    results["rows"] = [
        {
            **timing.summary(peak),
            "speedup_vs_default": paired_ratio(default, timing),
            "speedup_vs_default_cpu": paired_ratio(default, timing, cpu=True),
        }
        for timing in timings.values()
    ]
    return results


def variant_costs(
    config: dict[str, Any], *, steps: int, repeats: int, convmae: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Step time of ConvMAE-Small, self-guided MAE (after its switch to informed masks) and a teacher
    target (MaskDistill with EfficientNet-Lite0) relative to plain MAE on the same images and grid
    (``convmae``: the ConvMAE config, by default :data:`CONFIGS` ``"convmae"``)."""
    images = make_images(config)
    contenders = [mimkit_contender("mae", build_mimkit(config), images)]
    convmae = convmae or CONFIGS["convmae"]
    contenders.append(mimkit_contender(convmae["name"], build_mimkit(convmae), images))
    guided = build_mimkit(config, mask_type="self_guided", mask_options={"trigger": "epoch", "start_epoch": 0.0})
    guided.masker.update(step=0, total_steps=1000, epoch=0.0)  # type: ignore[attr-defined]  # informed from now
    contenders.append(mimkit_contender("self-guided (informed)", guided, images))
    skipped: dict[str, str] = {}
    try:
        stats = (0.5,) * config["in_chans"]  # the teacher undoes the images' normalization
        teacher = build_mimkit(
            config, target="maskdistill", teacher="efficientnet_lite0", data_mean=stats, data_std=stats
        )
        contenders.append(mimkit_contender("maskdistill teacher", teacher, images, flops=0.0))
    except (FileNotFoundError, ValueError, ImportError) as err:  # the teacher's weights are not installed
        skipped["maskdistill teacher"] = str(err)
    timings = time_interleaved(contenders, steps=steps, repeats=repeats)
    mae = timings["mae"]
    rows = [
        {
            **timing.summary(),
            "relative_step_time": paired_ratio(timing, mae),
            "relative_step_time_cpu": paired_ratio(timing, mae, cpu=True),
        }
        for timing in timings.values()
    ]
    return {"rows": rows, "skipped": skipped}
