"""Multi-scale backbones for dense transfer, built around mimkit's pretrained encoders.

Every backbone maps images (B, C, H, W) to an ordered dict of four maps ``"0"`` to ``"3"``, finest first,
and lists their ``channels`` and ``strides``:

* :class:`MIMDetBackbone` (MIMDet, Fang et al. 2022): a MIM-pretrained ViT that sees only a random subset
  of its patch tokens while fine-tuning (all at inference), a small randomly initialized
  :class:`ConvStem` for the 1/4 and 1/8 maps, the ViT's tokens at 1/16 (the positions it did not see
  filled by the pretrained MAE decoder or by a mask token) and 1/32 by pooling.
* :class:`ConvMAEBackbone`: ConvMAE's three stage maps and a pooled fourth level.
* :class:`ViTPyramid` (ViTDet's simple feature pyramid): four levels from the ViT's last map alone, by
  transposed convolutions and pooling (the segmentation backbone for a plain ViT).

:class:`FPNBackbone` puts torchvision's feature pyramid network on any of them, as torchvision's detection
models expect (``out_channels``, ordered dict of equal-width maps).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from mimkit.layers import LayerNorm2d
from mimkit.masking import MaskSpec, RandomMasker
from mimkit.models.convvit import ConvViT
from mimkit.models.mae_decoder import MAEDecoder
from mimkit.models.vit import VisionTransformer

FILLS = ("decoder", "mask_token")


def _conv_norm_act(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), LayerNorm2d(out_channels), nn.GELU()]


class ConvStem(nn.Module):
    """MIMDet's compact convolution stem: 3x3 stride-2 convolutions with norm and GELU.

    Two of them give the 1/4 map, one more the 1/8 map.

    Args:
        in_chans: image channels.
        channels: (C4, C8) widths of the 1/4 and 1/8 maps.
    """

    def __init__(self, in_chans: int, channels: tuple[int, int] = (64, 128)) -> None:
        super().__init__()
        c4, c8 = channels
        self.stride4 = nn.Sequential(*_conv_norm_act(in_chans, c4 // 2), *_conv_norm_act(c4 // 2, c4))
        self.stride8 = nn.Sequential(*_conv_norm_act(c4, c8))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> (B, C4, H/4, W/4), (B, C8, H/8, W/8)."""
        x4 = self.stride4(images)
        return x4, self.stride8(x4)


def sample_tokens(
    batch: int, grid: tuple[int, int], sample_ratio: float, *, generator: torch.Generator | None = None
) -> MaskSpec:
    """MIMDet's input sampling: each image keeps ``L - round((1 - sample_ratio) * L)`` random patch tokens.

    Args:
        batch: B.
        grid: the patch grid (L = grid_h * grid_w).
        sample_ratio: fraction of tokens the encoder sees, in (0, 1].
        generator: random source (reproducible samples).

    Returns:
        A :class:`~mimkit.masking.MaskSpec`: ``ids_keep`` the sampled tokens, ``mask`` True where unsampled.
    """
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must lie in (0, 1], got {sample_ratio}")
    return RandomMasker(1.0 - sample_ratio)(batch, grid, generator=generator)


def all_tokens(batch: int, num_patches: int, device: torch.device) -> MaskSpec:
    """The mask that hides nothing: every token visible, in raster order."""
    ids = torch.arange(num_patches, device=device).expand(batch, -1)  # (B, L)
    return MaskSpec(
        ids_keep=ids, ids_restore=ids, mask=torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    )


def resample_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A map (B, C, h, w) at ``size``: average pooling to shrink, bilinear interpolation to grow."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MIMDetBackbone(nn.Module):
    """MIMDet: a pretrained ViT on a sample of its tokens, a ConvStem, and a 4-level pyramid.

    In training mode the ViT sees a random ``sample_ratio`` of its patch tokens (fewer tokens, faster
    steps, and the input statistics of MAE pretraining); in eval mode it sees all of them. The 1/16 map
    has every position: with ``fill="decoder"`` the pretrained MAE decoder runs on the sampled tokens
    plus its mask token at the others, and its last hidden states (after its final norm) are the map,
    as in MIMDet; with ``fill="mask_token"`` a learned token (plus the position embedding) stands at the
    unsampled positions of the encoder's output. A ViT whose patch size is not 16 is resampled to 1/16.

    Args:
        encoder: the pretraining model's :class:`~mimkit.models.vit.VisionTransformer`.
        decoder: its :class:`~mimkit.models.mae_decoder.MAEDecoder` (needed for ``fill="decoder"``).
        sample_ratio: fraction of tokens seen in training, in (0, 1]; 1 turns sampling off.
        fill: ``"decoder"`` or ``"mask_token"``.
        stem_channels: (C4, C8) of the :class:`ConvStem`.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder: MAEDecoder | None = None,
        *,
        sample_ratio: float = 0.5,
        fill: str = "decoder",
        stem_channels: tuple[int, int] = (64, 128),
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise ValueError(
                f"MIMDet needs a ViT encoder, got {type(encoder).__name__}; use ConvMAEBackbone for ConvMAE"
            )
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
        if fill == "decoder" and decoder is None:
            raise ValueError(
                "fill='decoder' needs the pretraining model's MAE decoder; pass it or use fill='mask_token'"
            )
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must lie in (0, 1], got {sample_ratio}")
        self.encoder = encoder
        self.decoder = decoder if fill == "decoder" else None
        if self.decoder is not None:
            self.decoder.pred.requires_grad_(False)  # the pixel head is not used: its hidden states are the map
        self.fill = fill
        self.sample_ratio = sample_ratio
        self.stem = ConvStem(encoder.in_chans, stem_channels)
        if fill == "mask_token":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)
        width = self.decoder.embed_dim if self.decoder is not None else encoder.embed_dim
        self.channels = [stem_channels[0], stem_channels[1], width, width]
        self.strides = [4, 8, 16, 32]
        self.img_size = encoder.patch_embed.img_size

    def token_map(self, images: Tensor, mask: MaskSpec | None) -> Tensor:
        """The ViT's output at every patch as a (B, D, grid_h, grid_w) map (D: decoder width with the decoder
        fill), from the sampled tokens (``mask``) or all of them (None)."""
        batch = images.shape[0]
        grid = self.encoder.grid
        num_patches = grid[0] * grid[1]
        enc = self.encoder(images, mask)  # tokens (B, 1 + N, D)
        if self.decoder is not None:
            spec = mask if mask is not None else all_tokens(batch, num_patches, images.device)
            dec = self.decoder(enc, spec, return_hidden=True)
            tokens = self.decoder.norm(dec.hidden_states[-1])[:, self.decoder.num_prefix_tokens :]  # (B, L, Dd)
        else:
            tokens = enc.patch_tokens  # (B, N, D)
            if mask is not None:
                full = (self.mask_token + self.encoder.pos_embed[:, 1:]).expand(batch, num_patches, -1)  # (B, L, D)
                index = mask.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (B, Lk, D)
                tokens = full.scatter(1, index, tokens)  # (B, L, D) raster order
        return tokens.transpose(1, 2).reshape(batch, -1, *grid)  # (B, D, grid_h, grid_w)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> OrderedDict[str, Tensor]:
        """(B, C, H, W) -> ``"0"`` to ``"3"`` at strides 4, 8, 16, 32 (see :attr:`channels`)."""
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(
                f"the ViT backbone takes {self.img_size[0]}x{self.img_size[1]} images, got "
                f"{images.shape[-2]}x{images.shape[-1]}; the detector resizes to the encoder's img_size"
            )
        x4, x8 = self.stem(images)  # (B, C4, H/4, W/4), (B, C8, H/8, W/8)
        mask = None
        if self.training and self.sample_ratio < 1.0:
            mask = sample_tokens(images.shape[0], self.encoder.grid, self.sample_ratio, generator=generator)
            mask = mask.to(images.device)
        size16 = (math.ceil(images.shape[-2] / 16), math.ceil(images.shape[-1] / 16))
        x16 = resample_to(self.token_map(images, mask), size16)  # (B, D, H/16, W/16)
        x32 = F.max_pool2d(x16, 2, ceil_mode=True)  # (B, D, H/32, W/32)
        return OrderedDict([("0", x4), ("1", x8), ("2", x16), ("3", x32)])


class ConvMAEBackbone(nn.Module):
    """ConvMAE's stage maps E1, E2, E3 (strides p1, p1 p2, p1 p2 p3) and E4, E3 max-pooled (twice the last
    stride), as ConvMAE's detection and segmentation models take them: the unmasked encoder, without the
    multi-scale fusion of pretraining (its convolutions stay in the module, frozen, so checkpoints load).

    Args:
        encoder: the pretraining model's :class:`~mimkit.models.convvit.ConvViT`.
    """

    def __init__(self, encoder: ConvViT) -> None:
        super().__init__()
        if not isinstance(encoder, ConvViT):
            raise ValueError(f"ConvMAEBackbone needs a ConvViT encoder, got {type(encoder).__name__}")
        self.encoder = encoder
        for module in encoder.fusion_layers():  # they feed only the pretraining decoder
            module.requires_grad_(False)
        p1, p2, p3 = encoder.patch_sizes
        self.channels = [*encoder.embed_dims, encoder.embed_dims[2]]
        self.strides = [p1, p1 * p2, p1 * p2 * p3, 2 * p1 * p2 * p3]
        self.img_size = encoder.img_size

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """(B, C, H, W) -> ``"0"`` to ``"3"`` at :attr:`strides`."""
        x1, x2, x3 = self.encoder(images).stage_features  # finest first
        x4 = F.max_pool2d(x3, 2, ceil_mode=True)
        return OrderedDict([("0", x1), ("1", x2), ("2", x3), ("3", x4)])


class ViTPyramid(nn.Module):
    """ViTDet's simple feature pyramid: levels at strides 4, 8, 16, 32 from the ViT's last map only.

    A level finer than the patch size comes from 2x transposed convolutions (LayerNorm and GELU between
    them), a coarser one from max pooling; each then passes a 1x1 and a 3x3 convolution with LayerNorm.

    Args:
        encoder: a :class:`~mimkit.models.vit.VisionTransformer` (all tokens, no sampling).
        out_channels: width of every level.
        strides: the strides of the levels; each must be the patch size times or over a power of two.
    """

    def __init__(
        self, encoder: VisionTransformer, out_channels: int = 128, strides: tuple[int, ...] = (4, 8, 16, 32)
    ) -> None:
        super().__init__()
        self.encoder = encoder
        dim = encoder.embed_dim
        patch = encoder.patch_size
        self.levels = nn.ModuleList()
        for stride in strides:
            ratio = patch / stride
            steps = round(math.log2(ratio)) if ratio >= 1 else -round(math.log2(1 / ratio))
            if 2.0**steps != ratio:
                raise ValueError(f"stride {stride} is not a power-of-two multiple of the patch size {patch}")
            layers: list[nn.Module] = []
            for step in range(max(steps, 0)):
                layers.append(nn.ConvTranspose2d(dim, dim, 2, stride=2))
                if step < steps - 1:
                    layers += [LayerNorm2d(dim), nn.GELU()]
            if steps < 0:
                layers.append(nn.MaxPool2d(2 ** (-steps), ceil_mode=True))
            layers += [
                nn.Conv2d(dim, out_channels, 1),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1),
                LayerNorm2d(out_channels),
            ]
            self.levels.append(nn.Sequential(*layers))
        self.channels = [out_channels] * len(strides)
        self.strides = list(strides)
        self.img_size = encoder.patch_embed.img_size

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        out = self.encoder(images)
        tokens = out.patch_tokens  # (B, L, D)
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *out.grid)  # (B, D, grid_h, grid_w)
        return OrderedDict((str(index), level(x)) for index, level in enumerate(self.levels))


class FPNBackbone(nn.Module):
    """A multi-scale backbone followed by torchvision's feature pyramid network (``out_channels`` wide).

    Args:
        body: a backbone of this module (``channels``, ordered dict of maps).
        out_channels: the FPN width.
    """

    def __init__(self, body: MIMDetBackbone | ConvMAEBackbone | ViTPyramid, out_channels: int = 64) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.channels), out_channels)
        self.out_channels = out_channels
        self.strides = list(body.strides)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(images))
