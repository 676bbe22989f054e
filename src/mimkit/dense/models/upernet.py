"""UperNet (Xiao et al., Unified Perceptual Parsing for Scene Understanding, 2018) on the multi-scale
backbones: a pyramid pooling module on the coarsest level, an FPN top-down path, and the fusion of all
levels at the finest one, then a per-pixel classifier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class UperNetHead(nn.Module):
    """UperNet: pyramid pooling on the coarsest level, FPN top-down fusion, all levels fused at the finest.

    Args:
        in_channels: channels of the backbone levels, finest first.
        channels: width of the head.
        num_classes: output classes.
        pool_scales: output sides of the pyramid pooling module.
    """

    def __init__(
        self, in_channels: Sequence[int], channels: int, num_classes: int, pool_scales: Sequence[int] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        top = in_channels[-1]
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_norm_relu(top, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = _conv_norm_relu(top + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_conv_norm_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_norm_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = _conv_norm_relu(len(in_channels) * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Levels (B, C_i, H_i, W_i), finest first -> logits (B, num_classes, H_0, W_0)."""
        top = features[-1]
        pooled = [
            F.interpolate(pool(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for pool in self.pools
        ]
        maps = [lateral(x) for lateral, x in zip(self.laterals, features[:-1], strict=True)]
        maps.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))  # (B, channels, H_top, W_top)
        for level in range(len(maps) - 1, 0, -1):  # top-down: coarse context into finer levels
            size = maps[level - 1].shape[-2:]
            maps[level - 1] = maps[level - 1] + F.interpolate(
                maps[level], size=size, mode="bilinear", align_corners=False
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, maps[:-1], strict=True)] + [maps[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs], dim=1)
        return self.classifier(self.fuse(fused))


class Segmenter(nn.Module):
    """A multi-scale backbone and a :class:`UperNetHead`; normalizes [0, 1] images itself.

    Args:
        body: a backbone of :mod:`mimkit.dense.models.backbones` (``channels``, ordered dict of levels).
        num_classes: output classes.
        channels: width of the head.
        mean, std: per-channel normalization of the encoder's pretraining.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, body: nn.Module, num_classes: int, *, channels: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.body = body
        self.head = UperNetHead(list(body.channels), channels, num_classes)  # type: ignore[arg-type]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, num_classes, H, W) logits."""
        features: OrderedDict[str, Tensor] = self.body((images - self.mean) / self.std)
        logits = self.head(list(features.values()))  # (B, K, H_0, W_0)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
