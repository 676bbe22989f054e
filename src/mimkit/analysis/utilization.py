"""Mask-token utilization of an MAE decoder: how much its tokens attend to mask tokens versus visible ones.

Self-Guided MAE (Shin et al., NeurIPS 2024) reads this as the sign that MAE has learned to cluster
patches: once the decoder's tokens draw on the (contextualized) mask tokens as much as on the visible
ones, mask tokens carry cluster-level information, and informed masking can start.

Per decoder layer ``l`` with head-averaged attention ``A`` (queries and keys over the ``L`` patch tokens,
prefix tokens dropped from both), the utilization of a key set ``S`` is the mean attention weight a
patch query gives to one key of ``S``, times the number of keys ``N`` of that layer, so that uniform
attention scores 1 for every set::

    u_l(S) = N * mean_{q in patches} mean_{k in S} A_l[q, k]

The cumulative utilization multiplies the layers' values (attention rollout's product over depth):
``U(S) = prod_l u_l(S)``; informed masking starts when ``U(mask) > U(visible)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Utilization:
    """Mask-token versus visible-token utilization of one batch.

    Attributes:
        mask_per_layer: (layers,) ``u_l(mask tokens)``.
        visible_per_layer: (layers,) ``u_l(visible tokens)``.
    """

    mask_per_layer: Tensor
    visible_per_layer: Tensor

    @property
    def mask(self) -> float:
        """Cumulative mask-token utilization ``prod_l u_l(mask)``."""
        return float(self.mask_per_layer.prod())

    @property
    def visible(self) -> float:
        """Cumulative visible-token utilization ``prod_l u_l(visible)``."""
        return float(self.visible_per_layer.prod())

    def as_metrics(self, prefix: str = "utilization") -> dict[str, float]:
        """Flat scalars for a metrics logger: cumulative values and every layer's."""
        metrics = {f"{prefix}/mask": self.mask, f"{prefix}/visible": self.visible}
        pairs = zip(self.mask_per_layer.tolist(), self.visible_per_layer.tolist(), strict=True)
        for layer, (mask_value, visible_value) in enumerate(pairs):
            metrics[f"{prefix}/mask_layer{layer}"] = mask_value
            metrics[f"{prefix}/visible_layer{layer}"] = visible_value
        return metrics


@torch.no_grad()
def mask_token_utilization(attentions: Sequence[Tensor], mask: Tensor, num_prefix_tokens: int = 1) -> Utilization:
    """Per-layer and cumulative utilization of mask tokens and visible tokens by a decoder's patch tokens.

    Args:
        attentions: per decoder layer (B, heads, P + L, P + L) attention weights (rows sum to 1), e.g.
            ``DecoderOutput.attentions`` from ``decoder(enc, mask, return_attn=True)``.
        mask: (B, L) bool, True = hidden (the decoder fed a mask token there).
        num_prefix_tokens: P, class tokens ahead of the patches in the decoder sequence.

    Returns:
        A :class:`Utilization` averaged over the batch.

    Raises:
        ValueError: no layers, mismatched shapes, or a mask with no hidden or no visible patch.
    """
    if not attentions:
        raise ValueError("mask-token utilization needs the attention of at least one decoder layer")
    batch, length = mask.shape
    hidden_count = mask.sum(dim=1)  # (B,)
    if bool((hidden_count == 0).any()) or bool((hidden_count == length).any()):
        raise ValueError("every image needs both hidden and visible patches to compare their utilization")
    mask_keys = mask.float()  # (B, L)
    visible_keys = 1.0 - mask_keys  # (B, L)
    mask_rows, visible_rows = [], []
    for layer, attn in enumerate(attentions):
        expected = (batch, attn.shape[1], num_prefix_tokens + length, num_prefix_tokens + length)
        if attn.ndim != 4 or tuple(attn.shape) != expected:
            raise ValueError(f"attention of layer {layer} must be {expected}, got {tuple(attn.shape)}")
        num_keys = attn.shape[-1]
        patches = attn.float().mean(dim=1)[:, num_prefix_tokens:, num_prefix_tokens:]  # (B, L, L) query, key
        per_key = patches.mean(dim=1)  # (B, L): mean weight each key receives from the patch queries
        mask_rows.append(num_keys * (per_key * mask_keys).sum(1) / hidden_count)  # (B,)
        visible_rows.append(num_keys * (per_key * visible_keys).sum(1) / (length - hidden_count))  # (B,)
    return Utilization(
        mask_per_layer=torch.stack(mask_rows, dim=1).mean(dim=0).cpu(),  # (layers,)
        visible_per_layer=torch.stack(visible_rows, dim=1).mean(dim=0).cpu(),
    )
