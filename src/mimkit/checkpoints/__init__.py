"""Checkpoint files of the models: reading any MAE checkpoint (mimkit, original MAE, bare state dicts,
HuggingFace directories), saving in the mimkit, MAE or HuggingFace layout, and the lossless conversions
between them (:mod:`mimkit.checkpoints.convert`). Above :mod:`mimkit.models`, whose architectures it
builds; file safety (atomic writes, ``weights_only`` loading) comes from :mod:`mimkit.files`.
"""

from mimkit.checkpoints.convert import LAYOUTS, detect_layout, encoder_to_timm, from_mimkit, load_into, to_mimkit
from mimkit.checkpoints.load import load_encoder, read_checkpoint, save_checkpoint_as

__all__ = [
    "LAYOUTS",
    "detect_layout",
    "encoder_to_timm",
    "from_mimkit",
    "load_encoder",
    "load_into",
    "read_checkpoint",
    "save_checkpoint_as",
    "to_mimkit",
]
