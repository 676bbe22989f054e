"""Transformer block with timm/MAE parameter names (``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

ATTENTION_IMPLS = ("sdpa", "math")


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Computes ``softmax(q k^T / sqrt(d)) v`` with ``scaled_dot_product_attention`` or with three plain
    ops (the "math" path), which also returns the attention weights when they are requested (analysis,
    informed masking). Both give the same result up to float rounding.

    Args:
        dim: token width.
        num_heads: attention heads.
        qkv_bias: bias on the qkv projection.
        attn_impl: ``"sdpa"`` or ``"math"``; a plain attribute, settable later. In a ViT-Tiny MAE step on the
            CPU the two ran within 1 % of each other (``mimkit bench``); SDPA keeps less for the backward pass.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTENTION_IMPLS}, got {attn_impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, return_attn: bool = False, query_start: int = 0) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, D) -> ((B, Nq, D), attention (B, heads, Nq, N) or None).

        The tokens from ``query_start`` on are the queries (Nq = N - query_start; all of them by default);
        every token is a key and a value (MILAN's prompting decoder queries with the mask tokens only).
        """
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, hd)
        if query_start:
            q = q[:, :, query_start:]  # (B, heads, Nq, hd)
        attn: Tensor | None = None
        if return_attn or self.attn_impl == "math":
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, Nq, N)
            out = weights @ v
            attn = weights if return_attn else None
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, length - query_start, dim)  # (B, Nq, D)
        return self.proj(out), attn


class Mlp(nn.Module):
    """Two-layer MLP with GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval or when ``drop_prob == 0``)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Block(nn.Module):
    """Pre-norm transformer block.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on the qkv projection.
        drop_path: stochastic depth rate.
        norm_eps: LayerNorm epsilon (MAE uses 1e-6, HuggingFace ViTMAE 1e-12 by default).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, return_attn: bool = False, query_start: int = 0) -> tuple[Tensor, Tensor | None]:
        """x: (B, N, D) -> ((B, N, D), attention or None).

        With ``query_start > 0`` only the tokens from ``query_start`` on are updated (they attend to all
        tokens); the first ``query_start`` tokens are returned unchanged (MILAN's prompts).
        """
        attn_out, attn = self.attn(self.norm1(x), return_attn=return_attn, query_start=query_start)
        queries = x[:, query_start:] if query_start else x  # (B, Nq, D)
        queries = queries + self.drop_path(attn_out)
        queries = queries + self.drop_path(self.mlp(self.norm2(queries)))
        if query_start:
            return torch.cat([x[:, :query_start], queries], dim=1), attn  # (B, N, D)
        return queries, attn


def run_block(block: nn.Module, x: Tensor, *, checkpoint: bool = False, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """``block(x, **kwargs)``, or with ``checkpoint`` (and gradients enabled) the same through
    activation checkpointing: the block's inner activations are not kept for the backward pass but
    recomputed there (same outputs and gradients; the random state is replayed, so drop path matches)."""
    if checkpoint and torch.is_grad_enabled():
        out: tuple[Tensor, Tensor | None] = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
        return out
    return block(x, **kwargs)  # type: ignore[no-any-return]


def run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    *,
    attentions: list[Tensor] | None = None,
    hidden_states: list[Tensor] | None = None,
    checkpoint: bool = False,
) -> Tensor:
    """Run a stack of :class:`Block` on x (B, N, D), appending each block's attention weights to
    ``attentions`` and its output to ``hidden_states`` when those lists are given; ``checkpoint``
    runs each block under activation checkpointing (see :func:`run_block`)."""
    for block in blocks:
        x, attn = run_block(block, x, checkpoint=checkpoint, return_attn=attentions is not None)
        if attentions is not None and attn is not None:
            attentions.append(attn)
        if hidden_states is not None:
            hidden_states.append(x)
    return x


def init_vit_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        torch.nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def set_attention_impl(module: nn.Module, attn_impl: str) -> None:
    """Set ``attn_impl`` (``"sdpa"`` or ``"math"``) of every :class:`Attention` in ``module``."""
    if attn_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTENTION_IMPLS}, got {attn_impl!r}")
    for child in module.modules():
        if isinstance(child, Attention):
            child.attn_impl = attn_impl
