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


def resize_pos_embed(
    pos_embed: Tensor, grid: tuple[int, int], new_grid: tuple[int, int], num_prefix_tokens: int = 0
) -> Tensor:
    """A position table for another patch grid (fine-tuning or dense transfer at another resolution).

    A fixed sin-cos table (what MAE, ConvMAE and mimkit train with) is recomputed for the new grid, which
    is exact; any other (learned) table has its patch part resampled bicubically, as timm's
    ``resample_abs_pos_embed`` does. Prefix rows are kept.

    Args:
        pos_embed: (1, P + grid_h * grid_w, D).
        grid: the grid it was made for.
        new_grid: the grid it is wanted for.
        num_prefix_tokens: P, the class/prefix rows at the start.

    Returns:
        (1, P + new_h * new_w, D), dtype and device of ``pos_embed``.
    """
    embed_dim = pos_embed.shape[-1]
    if pos_embed.shape[1] != num_prefix_tokens + grid[0] * grid[1]:
        raise ValueError(f"a table of {pos_embed.shape[1]} rows is not {num_prefix_tokens} + {grid[0]}x{grid[1]}")
    if tuple(new_grid) == tuple(grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    fixed = sincos_2d(embed_dim, grid).to(patches)
    if embed_dim % 4 == 0 and torch.allclose(patches[0], fixed, atol=1e-5):
        resized = sincos_2d(embed_dim, new_grid)[None].to(patches)  # (1, L', D)
    else:
        table = patches.reshape(1, *grid, embed_dim).permute(0, 3, 1, 2).float()  # (1, D, grid_h, grid_w)
        table = torch.nn.functional.interpolate(table, size=new_grid, mode="bicubic", align_corners=False)
        resized = table.permute(0, 2, 3, 1).reshape(1, -1, embed_dim).to(patches)  # (1, L', D)
    return torch.cat([prefix, resized], dim=1)
