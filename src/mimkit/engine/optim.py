"""AdamW with MAE's parameter groups."""

from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "dist_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on weight matrices and kernels, none on biases, norms, tokens and
    positional embeddings (timm's ``param_groups_weight_decay`` rule, as used by MAE)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``foreach`` kernels where available."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
