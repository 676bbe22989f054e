"""What the decoder must predict, and the loss on hidden patches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mimkit.targets.feature import FeatureTarget, HOGTarget, TeacherTarget, TokenTarget
from mimkit.targets.hog import HOGFeatures
from mimkit.targets.pixel import LOSSES, PixelTarget, elementwise_loss, masked_mean, patch_loss
from mimkit.targets.teachers import FeatureCache, Teacher, build_teacher
from mimkit.targets.vqkd import (
    CodebookCollapseWarning,
    CodebookStats,
    VQKDTokenizer,
    check_codebook,
    codebook_stats,
    load_tokenizer,
)

TARGETS = ("pixel", "hog", "maskdistill", "milan", "vqkd")
TEACHER_TARGETS = ("maskdistill", "milan")
# Each target's usual loss: MAE's and MaskFeat's MSE, MaskDistill's smooth-L1, MILAN's cosine (mmselfsup's
# MILAN head: 2 - 2 cos, twice this one).
DEFAULT_LOSSES = {"pixel": "mse", "hog": "mse", "maskdistill": "smooth_l1", "milan": "cosine", "vqkd": "cross_entropy"}


def create_target(
    kind: str,
    *,
    patch_size: int,
    in_chans: int,
    grid: tuple[int, int],
    loss: str | None = None,
    norm_pix: bool = True,
    teacher: str | None = None,
    teacher_options: dict[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tokenizer: str | None = None,
    teacher_cache: str | None = None,
    norm_features: bool | None = None,
) -> PixelTarget | FeatureTarget | TokenTarget:
    """A target of :data:`TARGETS` with its ``dim``: the values the decoder predicts per patch.

    Args:
        kind: ``"pixel"`` (MAE), ``"hog"`` (MaskFeat), ``"maskdistill"`` (a teacher's features, LayerNorm
            without affine) or ``"milan"`` (a teacher's features as they come; the model pairs it with
            :class:`~mimkit.models.PromptingDecoder`).
        patch_size: the student's patch side in pixels (its total stride for ConvMAE).
        in_chans: image channels.
        grid: the student's patch grid.
        loss: one of :data:`LOSSES`; None for the target's usual one (:data:`DEFAULT_LOSSES`).
        norm_pix: pixel target only: normalize each target patch.
        teacher: maskdistill and milan: the teacher spec of :func:`build_teacher`.
        teacher_options: keyword options of :func:`build_teacher` (``stage``, ``input_size``, ...).
        mean, std: the normalization of the student's images (the teacher undoes it).
        tokenizer: vqkd only: a ``tokenizer.pt`` written by ``mimkit tokenizer-train`` (or its folder).
        teacher_cache: a directory keeping the teacher's features on disk (:class:`FeatureCache`).
        norm_features: maskdistill and milan: LayerNorm without affine over each patch's teacher features;
            None for the target's usual choice (maskdistill: on, MaskDistill's; milan: off).

    Raises:
        ValueError: unknown kind, a teacher missing or given where none is used.
    """
    if kind not in TARGETS:
        raise ValueError(f"unknown target {kind!r}; choose one of {TARGETS}")
    if kind == "vqkd" and loss not in (None, "cross_entropy"):
        raise ValueError(f"the vqkd target predicts codes with cross-entropy, not {loss!r}")
    if (teacher is not None) != (kind in TEACHER_TARGETS):
        raise ValueError(f"target {kind!r} {'needs a' if kind in TEACHER_TARGETS else 'takes no'} teacher")
    loss = loss or DEFAULT_LOSSES[kind]
    if (tokenizer is not None) != (kind == "vqkd"):
        raise ValueError(f"target {kind!r} {'needs a' if kind == 'vqkd' else 'takes no'} tokenizer")
    if norm_features is not None and kind not in TEACHER_TARGETS:
        raise ValueError(f"norm_features normalizes a teacher's features; target {kind!r} has none")
    target: PixelTarget | FeatureTarget | TokenTarget
    if kind == "vqkd":
        from mimkit.targets.vqkd import load_tokenizer

        target = TokenTarget(load_tokenizer(str(tokenizer)), grid, mean=mean, std=std)
    elif kind == "pixel":
        target = PixelTarget(patch_size, in_chans, norm_pix=norm_pix, loss=loss)
    elif kind == "hog":
        target = HOGTarget(patch_size, in_chans, loss=loss)
    else:
        if mean is None or std is None:
            raise ValueError("a teacher target needs the mean and std the student's images are normalized with")
        built = build_teacher(str(teacher), student_mean=mean, student_std=std, **(teacher_options or {}))
        cache = None
        if teacher_cache is not None:
            identity = dict(teacher=teacher, options=teacher_options or {}, grid=grid, mean=mean, std=std)
            cache = FeatureCache(teacher_cache, identity)
        normalize = kind == "maskdistill" if norm_features is None else norm_features
        target = TeacherTarget(built, grid, loss=loss, normalize=normalize, cache=cache)
    return target


__all__ = [
    "DEFAULT_LOSSES",
    "LOSSES",
    "TARGETS",
    "TEACHER_TARGETS",
    "CodebookCollapseWarning",
    "CodebookStats",
    "FeatureCache",
    "FeatureTarget",
    "HOGFeatures",
    "HOGTarget",
    "PixelTarget",
    "Teacher",
    "TeacherTarget",
    "TokenTarget",
    "VQKDTokenizer",
    "build_teacher",
    "check_codebook",
    "codebook_stats",
    "create_target",
    "elementwise_loss",
    "load_tokenizer",
    "masked_mean",
    "patch_loss",
]
