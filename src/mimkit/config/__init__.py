"""Config schemas and the one loader (YAML + dotted overrides, errors that name the key).

:mod:`mimkit.config.loader` reads any command's schema; :mod:`mimkit.config.pretrain` is pretraining's schema
(fine-tuning, detection, segmentation and the tokenizer keep theirs with their tasks). ``load_config`` loads
pretraining's :class:`Config` unless given another ``schema``.
"""

from mimkit.config.loader import (
    ConfigError,
    apply_overrides,
    from_dict,
    nearest_key,
    read_yaml_mapping,
    to_plain,
)
from mimkit.config.pretrain import (
    MASK_SECTIONS,
    AttentionMaskConfig,
    BlockMaskConfig,
    ClassTokenConfig,
    Config,
    DataConfig,
    EvalConfig,
    GridMaskConfig,
    LogConfig,
    MaskConfig,
    ModelConfig,
    OptimConfig,
    SelfGuidedMaskConfig,
    TargetConfig,
    TeacherConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    mask_options,
    model_overrides,
    nest_mask_keys,
    nest_target_keys,
)

__all__ = [
    "MASK_SECTIONS",
    "AttentionMaskConfig",
    "BlockMaskConfig",
    "ClassTokenConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GridMaskConfig",
    "LogConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "SelfGuidedMaskConfig",
    "TargetConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "from_dict",
    "load_config",
    "mask_options",
    "model_overrides",
    "nearest_key",
    "nest_mask_keys",
    "nest_target_keys",
    "read_yaml_mapping",
    "to_plain",
]
