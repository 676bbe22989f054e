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
STEMS = ("conv", "patch_embed")
P5_POOLS = ("avg", "max")


def _conv_norm_act(in_channels: int, out_channels: int, *, bias: bool = True) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=bias),
        LayerNorm2d(out_channels),
        nn.GELU(),
    ]


def conv_stem_widths(embed_dim: int, patch_size: int) -> list[int]:
    """Widths of :class:`ConvStem`'s stride-2 stages, finest first: the channels double from
    ``embed_dim / 2^(n-1)`` to ``embed_dim`` over n = log2(patch_size) stages.

    Raises:
        ValueError: ``patch_size`` is not a power of two of at least 8 (the stem must give a 1/8 map before
            it reaches the patch grid), or ``embed_dim`` is not divisible by ``2^(n-1)``.
    """
    stages = round(math.log2(patch_size)) if patch_size > 0 else 0
    if patch_size < 8 or 2**stages != patch_size:
        raise ValueError(
            f"model.stem=conv needs a patch_size that is a power of two of at least 8 (the stem's 1/4 and 1/8 "
            f"maps come before the patch grid), got {patch_size}; use model.stem=patch_embed"
        )
    first = embed_dim // 2 ** (stages - 1)
    if first * 2 ** (stages - 1) != embed_dim:
        raise ValueError(f"model.stem=conv halves embed_dim {embed_dim} {stages - 1} times; it must divide evenly")
    return [first * 2**index for index in range(stages)]


class ConvStem(nn.Module):
    """MIMDet's compact ConvStem, the ViT's input in place of the pretrained patch embedding.

    ``log2(patch_size)`` 3x3 stride-2 convolutions (no bias: a norm follows), the channels doubling up to
    ``embed_dim``, each followed by LayerNorm (over channels, at every position) and GELU, then a 1x1
    projection: (B, C, H, W) -> (B, L, D) tokens of exactly the patch embedding's shape, plus the stage maps,
    whose 1/4 and 1/8 ones feed the pyramid. Randomly initialized (it cannot be MIM-pretrained: its
    overlapping kernels would leak hidden pixels into visible tokens).

    At ViT-Base width (``embed_dim=768``, ``patch_size=16``: 96, 192, 384, 768 channels) it holds
    4,079,712 parameters (3,486,240 in the 3x3 convolutions, 2,880 in the norms, 590,592 in the 1x1
    projection): the 4.1 M of the MIMDet paper, under 5 % of the 86 M of a ViT-B encoder.

    Args:
        in_chans: image channels.
        embed_dim: the encoder's token width D.
        patch_size: the encoder's patch size, the stem's total stride (a power of two, at least 8).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.widths = conv_stem_widths(embed_dim, patch_size)
        self.patch_size = patch_size
        inputs = [in_chans, *self.widths[:-1]]
        self.stages = nn.ModuleList(
            nn.Sequential(*_conv_norm_act(cin, cout, bias=False)) for cin, cout in zip(inputs, self.widths, strict=True)
        )
        self.proj = nn.Conv2d(embed_dim, embed_dim, 1)

    def channels_at(self, stride: int) -> int:
        """Width of the stage map at ``stride`` (2, 4, ..., patch_size)."""
        return self.widths[round(math.log2(stride)) - 1]

    def forward(self, images: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """(B, C, H, W) -> tokens (B, L, D) in raster order, and {stride: (B, C_s, H/s, W/s)} for every stage."""
        maps = {}
        x = images
        for index, stage in enumerate(self.stages):
            x = stage(x)
            maps[2 ** (index + 1)] = x
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, L, D)
        return tokens, maps


class SideStem(nn.Module):
    """The side stem of the ``stem="patch_embed"`` ablation: 3x3 stride-2 convolutions with norm and GELU
    beside the pretrained patch embedding, for the 1/4 and 1/8 maps only (the ViT reads raw pixels).

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


def resample_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A map (B, C, h, w) at ``size``: average pooling to shrink, bilinear interpolation to grow."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MIMDetBackbone(nn.Module):
    """MIMDet: a ConvStem feeding a pretrained ViT that sees a sample of its tokens, and a 4-level pyramid.

    With ``stem="conv"`` (MIMDet, the default) a randomly initialized :class:`ConvStem` replaces the
    pretrained patch embedding, which is kept in the encoder, frozen and never called (so the encoder's
    weights keep their pretraining layout): the stem's tokens plus the encoder's position embedding are the
    ViT's input, and the pretrained ViT is the third stage of a ConvNet-ViT hybrid. The stem's 1/4 and 1/8
    maps are the first two levels. With ``stem="patch_embed"`` (an ablation, and the layout of detectors
    trained before the ConvStem) the ViT reads raw pixels through its pretrained patch embedding and a
    :class:`SideStem` beside it gives the 1/4 and 1/8 maps.

    In training mode the ViT sees a random ``sample_ratio`` of its patch tokens (fewer tokens, faster
    steps, and the input statistics of MAE pretraining); in eval mode it sees all of them. The 1/16 map
    has every position: with ``fill="decoder"`` the pretrained MAE decoder runs on the sampled tokens
    plus its mask token at the others, and its last hidden states (after its final norm) are the map,
    as in MIMDet; with ``fill="mask_token"`` a learned token (plus the position embedding) stands at the
    unsampled positions of the encoder's output. A ViT whose patch size is not 16 is resampled to 1/16.
    The 1/32 map pools the 1/16 one, parameter-free: 2x2 averages (``p5_pool="avg"``, MIMDet) or maxima
    (``"max"``, the layout of detectors trained before).

    Args:
        encoder: the pretraining model's :class:`~mimkit.models.vit.VisionTransformer`.
        decoder: its :class:`~mimkit.models.mae_decoder.MAEDecoder` (needed for ``fill="decoder"``).
        sample_ratio: fraction of tokens seen in training, in (0, 1]; 1 turns sampling off.
        fill: ``"decoder"`` or ``"mask_token"``.
        stem: ``"conv"`` (MIMDet's ConvStem as the ViT's input) or ``"patch_embed"`` (pretrained patch
            embedding, side stem).
        stem_channels: (C4, C8) of the side stem of ``stem="patch_embed"``; None: the ConvStem's widths at
            1/4 and 1/8 (``embed_dim * stride / patch_size``), so the two stems differ only in what the ViT
            reads. ``stem="conv"`` takes None only: its widths follow the encoder.
        p5_pool: ``"avg"`` or ``"max"``.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder: MAEDecoder | None = None,
        *,
        sample_ratio: float = 0.5,
        fill: str = "decoder",
        stem: str = "conv",
        stem_channels: tuple[int, int] | None = None,
        p5_pool: str = "avg",
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise ValueError(
                f"MIMDet needs a ViT encoder, got {type(encoder).__name__}; use ConvMAEBackbone for ConvMAE"
            )
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
        if stem not in STEMS:
            raise ValueError(f"model.stem must be one of {STEMS}, got {stem!r}")
        if p5_pool not in P5_POOLS:
            raise ValueError(f"model.p5_pool must be one of {P5_POOLS}, got {p5_pool!r}")
        if stem == "conv" and stem_channels is not None:
            raise ValueError(
                f"model.stem_channels={list(stem_channels)} sets the side stem of model.stem=patch_embed; the "
                "ConvStem's widths follow the encoder (leave model.stem_channels unset)"
            )
        if fill == "decoder" and decoder is None:
            raise ValueError(
                "fill='decoder' needs the pretraining model's MAE decoder; pass it or use fill='mask_token'"
            )
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must lie in (0, 1], got {sample_ratio}")
        encoder.drop_mask_token()  # sampled-out tokens are dropped, never replaced by a pretraining mask embedding
        self.encoder = encoder
        self.decoder = decoder if fill == "decoder" else None
        if self.decoder is not None:
            self.decoder.pred.requires_grad_(False)  # the pixel head is not used: its hidden states are the map
        self.fill = fill
        self.stem_kind = stem
        self.p5_pool = p5_pool
        self.sample_ratio = sample_ratio
        self.stem: ConvStem | SideStem
        if stem == "conv":
            self.stem = ConvStem(encoder.in_chans, encoder.embed_dim, encoder.patch_size)
            encoder.patch_embed.requires_grad_(False)  # replaced by the stem: kept for the layout, never called
            fine = (self.stem.channels_at(4), self.stem.channels_at(8))
        else:
            dim, patch = encoder.embed_dim, encoder.patch_size
            fine = stem_channels or (max(dim * 4 // patch, 2), max(dim * 8 // patch, 1))
            self.stem = SideStem(encoder.in_chans, fine)
        if fill == "mask_token":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)
        width = self.decoder.embed_dim if self.decoder is not None else encoder.embed_dim
        self.channels = [fine[0], fine[1], width, width]
        self.strides = [4, 8, 16, 32]
        self.img_size = encoder.patch_embed.img_size

    def token_map(self, images: Tensor, mask: MaskSpec | None, patches: Tensor | None = None) -> Tensor:
        """The ViT's output at every patch as a (B, D, grid_h, grid_w) map (D: decoder width with the decoder
        fill), from the sampled tokens (``mask``) or all of them (None).

        Args:
            images: (B, C, H, W), read through the encoder's patch embedding when ``patches`` is None.
            mask: the sampled tokens, or None for all.
            patches: (B, L, D) the ViT's input tokens made by the ConvStem.
        """
        batch = images.shape[0]
        grid = self.encoder.grid
        num_patches = grid[0] * grid[1]
        # tokens (B, 1 + N, D)
        enc = self.encoder(images, mask) if patches is None else self.encoder.forward_patches(patches, mask)
        if self.decoder is not None:
            spec = mask if mask is not None else MaskSpec.unmasked(batch, num_patches, images.device)
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
        patches = None
        if isinstance(self.stem, ConvStem):
            patches, maps = self.stem(images)  # (B, L, D) the ViT's input; {stride: (B, C_s, H/s, W/s)}
            x4, x8 = maps[4], maps[8]
        else:
            x4, x8 = self.stem(images)  # (B, C4, H/4, W/4), (B, C8, H/8, W/8)
        mask = None
        if self.training and self.sample_ratio < 1.0:
            mask = sample_tokens(images.shape[0], self.encoder.grid, self.sample_ratio, generator=generator)
            mask = mask.to(images.device)
        size16 = (math.ceil(images.shape[-2] / 16), math.ceil(images.shape[-1] / 16))
        x16 = resample_to(self.token_map(images, mask, patches), size16)  # (B, D, H/16, W/16)
        pool = F.avg_pool2d if self.p5_pool == "avg" else F.max_pool2d
        x32 = pool(x16, 2, ceil_mode=True)  # (B, D, H/32, W/32)
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
