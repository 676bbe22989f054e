"""A timm model with weights from a local file as the teacher (spec ``"timm:NAME@FILE"``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mimkit.targets.teachers.base import Teacher


def _load_timm_weights(model: nn.Module, path: Path) -> None:
    from timm.models import load_checkpoint

    try:
        load_checkpoint(model, str(path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights {path} do not fit the timm model: {str(err).splitlines()[0][:300]}") from None


class TimmTeacher(Teacher):
    """A timm model with weights from a local file.

    Features come from timm's ``forward_intermediates`` in NCHW layout: for vision transformers the patch
    tokens (prefix tokens removed) after the final norm, reshaped to a map; for CNNs a stage's feature map.
    Normalization and default input size come from ``timm.data.resolve_data_config`` (the model's
    pretrained config); a ViT's default input size is its ``patch_embed.img_size``.

    Args:
        name: timm model name.
        weights: local state-dict file (``.safetensors`` or a torch file, possibly ``{"state_dict": ...}``).
        student_mean, student_std: normalization of the student's images.
        input_size: side the images are resized to; default the model's pretrained input size.
        stage: index of ``forward_intermediates`` (a CNN stage of ``model.feature_info``, a ViT block);
            default the last.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size``), matching the weights.
    """

    def __init__(
        self,
        name: str,
        weights: str | Path,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        input_size: int | None = None,
        stage: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        import timm
        from timm.data import resolve_data_config

        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"timm teacher weights {path} do not exist; 'timm:NAME@FILE' needs a local file")
        model: Any = timm.create_model(name, pretrained=False, **dict(model_kwargs or {}))
        _load_timm_weights(model, path)
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"timm model {name!r} has no forward_intermediates; it cannot be a teacher")
        data_config = resolve_data_config(model=model)
        # A ViT built with another img_size (model_kwargs) takes that size, not its pretrained config's.
        vit_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        input_size = input_size or int(vit_size[-1] if vit_size else data_config["input_size"][-1])
        indices: int | list[int] = 1 if stage is None else [stage]
        with torch.no_grad():
            try:
                probe = model.eval().forward_intermediates(
                    torch.zeros(1, 3, input_size, input_size), indices=indices, norm=True, intermediates_only=True
                )
            except (RuntimeError, ValueError, AssertionError, IndexError) as err:
                raise ValueError(
                    f"timm model {name!r} cannot give stage {stage} of {input_size}x{input_size} images: {err}"
                ) from None
        super().__init__(
            model,
            dim=int(probe[-1].shape[1]),
            input_size=input_size,
            in_chans=3,
            teacher_mean=tuple(data_config["mean"]),
            teacher_std=tuple(data_config["std"]),
            student_mean=student_mean,
            student_std=student_std,
        )
        self.indices = indices

    def feature_map(self, inputs: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, D, h, w)."""
        net: Any = self.backbone
        return net.forward_intermediates(inputs, indices=self.indices, norm=True, intermediates_only=True)[-1]
