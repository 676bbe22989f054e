"""Frozen teacher networks whose per-patch features are targets to predict."""

from mimkit.targets.teachers.base import (
    CheckpointTeacher,
    CLIPTeacher,
    EfficientNetLite0Teacher,
    FeatureCache,
    LastOutput,
    Teacher,
    TimmTeacher,
    build_teacher,
    keep_teacher_out_of_state_dict,
    resample_to_grid,
)

__all__ = [
    "CLIPTeacher",
    "CheckpointTeacher",
    "EfficientNetLite0Teacher",
    "FeatureCache",
    "LastOutput",
    "Teacher",
    "TimmTeacher",
    "build_teacher",
    "keep_teacher_out_of_state_dict",
    "resample_to_grid",
]
