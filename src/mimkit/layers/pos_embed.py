"""Fixed 2-D sine-cosine positional embeddings (as in MAE's ``util/pos_embed.py``)."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(embed_dim: int, positions: Tensor) -> Tensor:
    """1-D sin-cos embedding.

    Args:
        embed_dim: output width, must be even.
        positions: (M,) float positions.

    Returns:
        (M, embed_dim) tensor, sines in the first half and cosines in the second.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = positions.double().reshape(-1)[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(embed_dim: int, grid: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
    """2-D sin-cos embedding for a (grid_h, grid_w) patch grid, row-major.

    Half of the channels encode the column (w) and half the row (h), matching MAE's layout so
    weights and outputs agree with the original code and HuggingFace ``ViTMAE``.

    Args:
        embed_dim: width, must be divisible by 4.
        grid: (grid_h, grid_w).
        num_prefix_tokens: zero rows prepended for class/prefix tokens.

    Returns:
        (num_prefix_tokens + grid_h * grid_w, embed_dim) float32 tensor.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    grid_h, grid_w = grid
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    # MAE builds meshgrid(w, h) and embeds the w coordinate first.
    mesh_w, mesh_h = torch.meshgrid(cols, rows, indexing="xy")  # (H, W) each
    emb_w = sincos_1d(embed_dim // 2, mesh_w)  # (H*W, D/2)
    emb_h = sincos_1d(embed_dim // 2, mesh_h)  # (H*W, D/2)
    emb = torch.cat([emb_w, emb_h], dim=1)  # (H*W, D)
    if num_prefix_tokens:
        emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
