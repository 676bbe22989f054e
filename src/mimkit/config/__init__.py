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
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    MaskConfig,
    ModelConfig,
    OptimConfig,
    TargetConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    mask_options,
    model_overrides,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "TargetConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "from_dict",
    "load_config",
    "mask_options",
    "model_overrides",
    "nearest_key",
    "read_yaml_mapping",
    "to_plain",
]
