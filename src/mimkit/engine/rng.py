"""The global random-number state a checkpoint holds beside the weights, so that a resume continues exactly."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch


def _numpy_state_plain() -> tuple:
    """NumPy's legacy RNG state with plain Python values, loadable with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = cast(tuple[str, Any, int, int, float], np.random.get_state())
    return (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))


def rng_state() -> dict[str, Any]:
    """Global RNG states of Python, NumPy and torch (CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_plain(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
