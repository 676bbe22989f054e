"""A HuggingFace CLIP vision model from a local directory as the teacher (spec ``"hf_clip:DIR"``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mimkit.targets.teachers.base import Teacher, resample_to_grid

# CLIP's normalization of its pretraining (pixels in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPTeacher(Teacher):
    """A HuggingFace ``CLIPVisionModel`` from a local ``save_pretrained`` directory.

    Features are the patch tokens of ``last_hidden_state`` (class token removed), reshaped to a map;
    CLIP applies its ``post_layernorm`` to the pooled class token only, so these are the last encoder
    layer's outputs. Normalization comes from ``preprocessor_config.json`` in the directory when present,
    else CLIP's standard mean and std. An ``input_size`` other than the model's ``image_size``
    interpolates the position embeddings (``interpolate_pos_encoding``).

    Args:
        directory: the ``save_pretrained`` directory.
        student_mean, student_std: normalization of the student's images.
        input_size: side the images are resized to; default the config's ``image_size``.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        input_size: int | None = None,
    ) -> None:
        directory = Path(directory).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP teacher directory {directory} does not exist or has no config.json; "
                "'hf_clip:DIR' needs a CLIPVisionModel.save_pretrained directory"
            )
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(str(directory), local_files_only=True)
        config: Any = model.config
        input_size = input_size or int(config.image_size)
        if input_size % config.patch_size:
            raise ValueError(f"CLIP input_size {input_size} is not divisible by its patch_size {config.patch_size}")
        mean, std = CLIP_MEAN, CLIP_STD
        processor_path = directory / "preprocessor_config.json"
        if processor_path.is_file():
            processor = json.loads(processor_path.read_text())
            mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        super().__init__(
            model,
            dim=int(config.hidden_size),
            input_size=input_size,
            in_chans=int(config.num_channels),
            teacher_mean=mean,
            teacher_std=std,
            student_mean=student_mean,
            student_std=student_std,
        )
        self.patch_size = int(config.patch_size)
        self.interpolate = input_size != int(config.image_size)

    def feature_map(self, inputs: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, D, S / patch_size, S / patch_size)."""
        hidden = self.backbone(pixel_values=inputs, interpolate_pos_encoding=self.interpolate).last_hidden_state
        tokens = hidden[:, 1:]  # (B, L, D)
        side = inputs.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)  # (B, D, side, side)

    @torch.no_grad()
    def saliency(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """CLIP's class-token attention over the patches in its last layer, head-averaged, on the student's
        grid (MILAN's semantic-aware sampling): (B, L)."""
        inputs = self.preprocess(images)
        out = self.backbone(pixel_values=inputs, interpolate_pos_encoding=self.interpolate, output_attentions=True)
        if not out.attentions or out.attentions[-1] is None:
            raise ValueError("this CLIP model returns no attention weights; load it with attn_implementation='eager'")
        attention = out.attentions[-1].mean(dim=1)[:, 0, 1:]  # (B, L_teacher)
        side = inputs.shape[-1] // self.patch_size
        return resample_to_grid(attention.reshape(-1, 1, side, side), grid).flatten(1)  # (B, L)
