"""The data pipeline's share of a step: a short real pretraining run against the model-only step."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mimkit.bench.timing import Contender, time_interleaved


def pipeline_share(
    config_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    steps: int = 40,
    log_every: int = 10,
    repeats: int = 3,
) -> dict[str, Any]:
    """End-to-end ``mimkit pretrain`` images/s on a recipe against the model-only step of the same model,
    batch and optimizer: the data pipeline's share of a step.

    Runs a :class:`~mimkit.engine.pretrain.Pretrainer` on the recipe (None: the built-in defaults) with
    ``overrides`` for ``steps`` steps into a temporary folder (no progress bar, no TensorBoard, no
    checkpoint before the last step) and reads its logged images/s after the first logging interval (which
    holds the warm-up); then times the model-only step on random images of the same shape.
    """
    from mimkit.build import build_model
    from mimkit.config import load_config
    from mimkit.engine.optim import build_optimizer
    from mimkit.engine.pretrain import Pretrainer

    with tempfile.TemporaryDirectory() as out_dir:
        run_overrides = [
            *overrides,
            f"train.max_steps={steps}",
            "train.progress=false",
            f"train.output_dir={out_dir}/run",
            f"log.every_steps={log_every}",
            "log.tensorboard=false",
            "train.save_every_steps=null",
            f"train.num_threads={torch.get_num_threads()}",
        ]
        config = load_config(config_path, run_overrides)
        trainer = Pretrainer(config)
        result = trainer.fit()
        metrics = [json.loads(line) for line in (Path(out_dir) / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m["train/img_per_s"] for m in metrics if "train/img_per_s" in m][1:]
    end_to_end = statistics.median(logged) if logged else result.images_per_second

    torch.manual_seed(config.train.seed)
    model = build_model(config).train()
    optimizer = build_optimizer(model, 1e-4, config.optim.weight_decay, config.optim.betas)
    batch, size = config.train.batch_size, config.model.img_size
    images = torch.randn(batch, config.model.in_chans, size, size)
    counter = iter(range(1 << 62))

    def step() -> None:
        loss = model(images, generator=torch.Generator().manual_seed(next(counter))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_interleaved([Contender("model only", step, batch)], steps=log_every, repeats=repeats)["model only"]
    return {
        "config": str(config_path),
        "overrides": list(overrides),
        "batch": batch,
        "steps": steps,
        "num_workers": config.data.num_workers,
        "end_to_end_img_per_s": end_to_end,
        "model_only_img_per_s": timing.images_per_second,
        "fraction": end_to_end / timing.images_per_second,
    }
