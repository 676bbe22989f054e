"""MAE's linear-probe head, trained on frozen features by :mod:`mimkit.eval.linear` and online during
pretraining."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LinearProbe"]


class LinearProbe(nn.Module):
    """MAE's linear-probe head: ``BatchNorm1d(dim, affine=False, eps=1e-6)`` then ``Linear(dim, num_classes)``.

    The parameter-free BatchNorm whitens each feature with running statistics (MAE: it "does not affect
    the linear classifier's power" but makes LARS's step sizes comparable across encoders); the linear
    layer starts from ``trunc_normal(std=0.01)`` weights and zero bias.

    Args:
        dim: feature width D.
        num_classes: number of classes.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        if dim <= 0 or num_classes <= 1:
            raise ValueError(f"a linear probe needs dim > 0 and at least 2 classes, got dim={dim}, {num_classes}")
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: Tensor) -> Tensor:
        """(B, D) features -> (B, num_classes) logits."""
        return self.head(self.norm(features))
