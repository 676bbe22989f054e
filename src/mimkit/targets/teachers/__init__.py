"""Frozen teacher networks whose per-patch features are targets to predict: the shared base (``base``), one
module per backend (``efficientnet``, ``checkpoint``, ``timm``, ``clip``), the spec reader
:func:`build_teacher` (``spec``) and the on-disk feature cache (``cache``)."""

from mimkit.targets.teachers.base import LastOutput, Teacher, keep_teacher_out_of_state_dict, resample_to_grid
from mimkit.targets.teachers.cache import FeatureCache
from mimkit.targets.teachers.checkpoint import CheckpointTeacher, run_normalization
from mimkit.targets.teachers.clip import CLIPTeacher
from mimkit.targets.teachers.efficientnet import EfficientNetLite0Teacher, load_efficientnet_lite0
from mimkit.targets.teachers.spec import SPEC_FORMS, build_teacher
from mimkit.targets.teachers.timm import TimmTeacher

__all__ = [
    "SPEC_FORMS",
    "CLIPTeacher",
    "CheckpointTeacher",
    "EfficientNetLite0Teacher",
    "FeatureCache",
    "LastOutput",
    "Teacher",
    "TimmTeacher",
    "build_teacher",
    "keep_teacher_out_of_state_dict",
    "load_efficientnet_lite0",
    "resample_to_grid",
    "run_normalization",
]
