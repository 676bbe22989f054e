"""Reconstructions of a fixed set of held-aside images while pretraining, so a run shows what it learns.

Every ``log.images_every_steps`` steps (default: about ten times a run) rank 0 masks the same images with
the same random mask, reconstructs them, writes ``reconstruction_step<N>.png`` and logs the grid to
TensorBoard as the image ``reconstruction``; the seconds it took go into the next metrics record as
``time/reconstruction_s``. It runs off the training path: without gradients, in eval
mode, on a forked RNG, with a random masker of its own, so the trained weights and every random stream
are exactly those of a run without previews.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mimkit.config import Config

log = logging.getLogger(__name__)

PREVIEWS_PER_RUN = 10  # the default number of pictures over a run


def preview_every(config: Config, total_steps: int) -> int:
    """Steps between pictures: ``log.images_every_steps``, or about ten per run when unset; 0 is off."""
    every = config.log.images_every_steps
    if every is None:
        return max(1, total_steps // PREVIEWS_PER_RUN)
    return every


def held_aside_images(config: Config) -> Tensor:
    """The first ``eval.num_images`` images of the test split (of the training split when there is
    none) in the evaluation view, (N, C, S, S) uint8."""
    from mimkit.data import build_dataset

    def split(name: str) -> Any:
        return build_dataset(
            config.data.dataset,
            root=config.data.root,
            split=name,
            img_size=config.model.img_size,
            in_chans=config.model.in_chans,
            in_memory=True,
            limit=config.eval.num_images,
            progress=False,
            num_workers=1,
            crop_ratio=config.data.eval_crop_ratio,
        )

    try:
        data = split("test")
    except FileNotFoundError:
        data = split("train")
    assert data.images is not None  # in_memory=True decodes every image
    return data.images[: config.eval.num_images]


class ReconstructionPreviews:
    """Draws the held-aside images' reconstructions for :class:`~mimkit.engine.pretrain.Pretrainer`.

    Args:
        config: the run's config.
        out_dir: where the PNGs go.
        device: the model's device.
        mean, std: the run's normalization.
    """

    def __init__(
        self, config: Config, out_dir: Path, device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        from mimkit.data.transforms import EvalTransform

        self.config, self.out_dir, self.mean, self.std = config, out_dir, mean, std
        images = held_aside_images(config)
        self.batch = EvalTransform(config.model.img_size, mean=mean, std=std)(images).to(device)  # (N, C, S, S)
        self.seconds: list[float] = []

    def __call__(self, model: Any, step: int, logger: Any) -> Path:
        """Write ``reconstruction_step<step>.png`` and log it as a TensorBoard image; its cost in seconds is
        appended to ``seconds`` (the loop logs it with the step's metrics)."""
        from mimkit.engine.reconstruction import reconstruct, save_reconstruction_grid

        started = time.perf_counter()
        devices = [self.batch.device] if self.batch.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            result = reconstruct(
                model,
                self.batch,
                mask_ratio=self.config.mask.ratio,
                generator=torch.Generator(self.batch.device).manual_seed(self.config.train.seed),
                mean=self.mean,
                std=self.std,
            )
        path = save_reconstruction_grid(
            result,
            self.out_dir / f"reconstruction_step{step}.png",
            mean=self.mean,
            std=self.std,
            norm_pix=self.config.target.norm_pix,
            title=f"{self.config.model.name} at step {step}",
        )
        with Image.open(path) as picture:
            logger.log_image("reconstruction", np.asarray(picture.convert("RGB")), step)
        self.seconds.append(time.perf_counter() - started)
        return path
