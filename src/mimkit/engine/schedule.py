"""Learning-rate schedules as pure functions of the step (nothing a resume could lose)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then half-cosine to ``min_lr``.

    Args:
        step: optimizer step, starting at 0.
        base_lr: peak learning rate.
        total_steps: steps of the whole run.
        warmup_steps: warmup length (clipped to ``total_steps``).
        min_lr: final learning rate.
    """
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def effective_lr(blr: float, effective_batch: int, lr: float | None = None) -> float:
    """MAE's scaling rule ``lr = blr * effective_batch / 256`` unless an absolute ``lr`` is given."""
    return lr if lr is not None else blr * effective_batch / 256
