"""mimkit: masked image modeling (MAE and its variants), pretraining and transfer of vision encoders.

The top-level names are imported on first use (PEP 562), so ``import mimkit`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mimkit.build import create_model, load_checkpoint
    from mimkit.config import load_config
    from mimkit.masking import MaskSpec
    from mimkit.models.mim import MaskedImageModel

# Public name -> the module that defines it.
_LAZY = {
    "create_model": "mimkit.build",
    "load_checkpoint": "mimkit.build",
    "MaskedImageModel": "mimkit.models.mim",
    "MaskSpec": "mimkit.masking",
    "load_config": "mimkit.config",
}

__all__ = ["MaskSpec", "MaskedImageModel", "__version__", "create_model", "load_checkpoint", "load_config"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'mimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
