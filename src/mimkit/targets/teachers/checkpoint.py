"""A mimkit encoder from a checkpoint as the teacher (spec: a path to the checkpoint)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mimkit.checkpoints.load import load_encoder
from mimkit.data.transforms import default_normalization
from mimkit.masking.saliency import patch_saliency
from mimkit.targets.teachers.base import Teacher, resample_to_grid


def run_normalization(run_config: Mapping[str, Any], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a run normalized its images with, read off its saved config (as
    :meth:`~mimkit.config.Config.normalization` tells them): ``data.mean``/``data.std`` when set, else the data
    set's defaults (:func:`~mimkit.data.transforms.default_normalization`)."""
    data = run_config.get("data")
    data = data if isinstance(data, Mapping) else {}
    mean, std = default_normalization(in_chans, str(data.get("dataset") or "fashion_mnist"))
    return tuple(data.get("mean") or mean), tuple(data.get("std") or std)


class CheckpointTeacher(Teacher):
    """A mimkit encoder from a checkpoint: its final patch tokens, after the last norm (data2vec-style
    self-distillation when the checkpoint is an earlier student).

    The input size is the checkpoint's ``img_size`` (position embeddings fix it). The normalization is the
    run config's when the checkpoint has one, else the student's own (the teacher is assumed pretrained on
    the same data), unless ``mean``/``std`` are given.

    Args:
        path: a checkpoint file or directory in any layout :func:`~mimkit.checkpoints.load.read_checkpoint` reads.
        student_mean, student_std: normalization of the student's images.
        input_size: None or the checkpoint's ``img_size``.
        mean, std: the teacher's normalization, overriding the one described above.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        encoder, args, run_config = load_encoder(path)
        img_size, in_chans = int(args["img_size"]), int(args["in_chans"])
        if input_size is not None and input_size != img_size:
            raise ValueError(
                f"teacher checkpoint {path} takes {img_size}x{img_size} images; input_size {input_size} cannot be used"
            )
        if mean is None or std is None:
            run_mean, run_std = (
                run_normalization(run_config, in_chans)
                if isinstance(run_config, Mapping)
                else (student_mean, student_std)
            )
            mean, std = mean or run_mean, std or run_std
        super().__init__(
            encoder,
            dim=int(encoder.embed_dim),
            input_size=img_size,
            in_chans=in_chans,
            teacher_mean=mean,
            teacher_std=std,
            student_mean=student_mean,
            student_std=student_std,
        )

    def feature_map(self, inputs: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, D, grid_h, grid_w) of the encoder's normalized patch tokens."""
        out = self.backbone(inputs)
        tokens = out.tokens[:, out.num_prefix_tokens :]  # (B, L, D)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *out.grid)  # (B, D, grid_h, grid_w)

    @torch.no_grad()
    def saliency(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """The class token's head-averaged attention over the patches in the last block (the attention
        each patch receives for an encoder without a class token), on the student's grid: (B, L)."""
        out = self.backbone(self.preprocess(images), return_attn=True)
        attention = patch_saliency(out.attentions[-1].mean(dim=1), out.num_prefix_tokens)  # (B, L_teacher)
        attention_map = attention.reshape(attention.shape[0], 1, *out.grid)  # (B, 1, h, w)
        return resample_to_grid(attention_map, grid).flatten(1)  # (B, L)
