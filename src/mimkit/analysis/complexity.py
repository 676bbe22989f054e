"""Parameter counts and analytic forward FLOPs of a masked image model.

FLOPs count a multiply-add as 2 FLOPs (the convention of ``torch.utils.flop_counter`` and fvcore x 2).
Only matrix products are counted: convolutions (the patch embedding; a ConvViT's convolution stages and
fusion convolutions), the linear layers and the two attention products (``Q K^T`` and ``A V``).
LayerNorm, softmax, GELU, biases, residual additions, position embeddings, gathers and the zeroing of
masked convolution are ignored; for ViTs they are well under 1 % of the total. A ConvViT's convolution
stages run on the whole image, masked or not (masked convolution zeroes hidden regions, it does not skip
them); only its transformer stage runs on the visible tokens.

To compare with ``torch.utils.flop_counter.FlopCounterMode`` on the CPU, run under
``sdpa_kernel(SDPBackend.MATH)`` (or with ``return_attn=True``): the CPU's fused attention kernel has
no FLOP formula and would be counted as 0.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mimkit.layers import Block
from mimkit.masking import FineRandomMasker, num_hidden_patches
from mimkit.models import MAEDecoder, MaskedImageModel, VisionTransformer
from mimkit.models.convvit import ConvViT


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module``.

    Args:
        module: any module.
        trainable_only: count only parameters with ``requires_grad`` (a ViT's fixed sin-cos
            ``pos_embed`` is a parameter but not trainable).
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def linear_flops(layer: nn.Linear, num_tokens: int) -> int:
    """FLOPs of a linear layer applied to ``num_tokens`` tokens: ``2 * N * in * out``."""
    return 2 * num_tokens * layer.in_features * layer.out_features


def block_flops(block: Block, num_tokens: int) -> dict[str, int]:
    """FLOPs of one pre-norm transformer block (:class:`mimkit.layers.Block`) on ``num_tokens`` tokens.

    Returns:
        ``qkv``, ``attention`` (``Q K^T`` plus ``A V``: ``2 * 2 * N^2 * D`` over all heads), ``proj``
        and ``mlp`` (fc1 + fc2).
    """
    attn, mlp = block.attn, block.mlp
    dim = attn.proj.in_features
    return {
        "qkv": linear_flops(attn.qkv, num_tokens),
        "attention": 2 * (2 * num_tokens * num_tokens * dim),
        "proj": linear_flops(attn.proj, num_tokens),
        "mlp": linear_flops(mlp.fc1, num_tokens) + linear_flops(mlp.fc2, num_tokens),
    }


def _blocks_flops(blocks: nn.ModuleList, num_tokens: int) -> dict[str, int]:
    """Sum of :func:`block_flops` over a stack of blocks, per component."""
    total = {"qkv": 0, "attention": 0, "proj": 0, "mlp": 0}
    for block in blocks:
        if not isinstance(block, Block):
            raise TypeError(f"FLOPs are defined for mimkit.layers.Block stacks, got a {type(block).__name__}")
        for key, value in block_flops(block, num_tokens).items():
            total[key] += value
    return total


def conv_flops(conv: nn.Conv2d, out_size: tuple[int, int]) -> int:
    """FLOPs of a 2-D convolution producing an ``out_size`` map: ``2 * H * W * out * in / groups * k_h * k_w``."""
    kernel_h, kernel_w = conv.kernel_size
    per_output = conv.in_channels // conv.groups * kernel_h * kernel_w
    return 2 * out_size[0] * out_size[1] * conv.out_channels * per_output


def _convs_flops(module: nn.Module, out_size: tuple[int, int]) -> int:
    """Sum of :func:`conv_flops` over every convolution of a module whose convolutions all keep the
    spatial size (a :class:`~mimkit.layers.ConvBlock`)."""
    return sum(conv_flops(conv, out_size) for conv in module.modules() if isinstance(conv, nn.Conv2d))


def encoder_flops(encoder: VisionTransformer | ConvViT, num_visible: int | None = None) -> dict[str, int]:
    """Forward FLOPs per image of a :class:`~mimkit.models.VisionTransformer` or a ConvMAE
    :class:`~mimkit.models.convvit.ConvViT`.

    The patch embedding (a ConvViT's convolution stages and its stage-3 embedding) always runs on the
    whole image; the blocks run on ``P + num_visible`` tokens (P prefix tokens). A ConvViT's fusion
    convolutions run only masked (pretraining), so they count only when ``num_visible`` is given.

    Args:
        encoder: the encoder.
        num_visible: patches the encoder sees; None means all of them (evaluation).

    Returns:
        ``patch_embed`` (all convolutions and the stage-3 embedding), ``qkv``, ``attention``, ``proj``,
        ``mlp`` and their ``total``.
    """
    num_patches = int(encoder.num_patches)
    masked = num_visible is not None
    num_visible = num_patches if num_visible is None else num_visible
    if isinstance(encoder, ConvViT):
        height, width = encoder.img_size
        patch_embed = 0
        for stride, embed, blocks in (
            (encoder.patch_sizes[0], encoder.patch_embed1, encoder.blocks1),
            (encoder.patch_sizes[0] * encoder.patch_sizes[1], encoder.patch_embed2, encoder.blocks2),
        ):
            size = (height // stride, width // stride)
            patch_embed += conv_flops(embed.proj, size) + sum(_convs_flops(block, size) for block in blocks)
        patch_embed += conv_flops(encoder.patch_embed3.proj, encoder.grid)
        patch_embed += linear_flops(encoder.patch_embed4, num_patches)
        if encoder.fuse and masked:
            patch_embed += conv_flops(encoder.stage1_output_decode, encoder.grid)
            patch_embed += conv_flops(encoder.stage2_output_decode, encoder.grid)
        blocks = encoder.blocks3
    else:
        patch_embed = conv_flops(encoder.patch_embed.proj, encoder.grid)
        blocks = encoder.blocks
    flops = {"patch_embed": patch_embed, **_blocks_flops(blocks, encoder.num_prefix_tokens + num_visible)}
    flops["total"] = sum(flops.values())
    return flops


def decoder_flops(decoder: MAEDecoder, num_encoder_tokens: int, num_patches: int) -> dict[str, int]:
    """Forward FLOPs per image of a :class:`~mimkit.models.MAEDecoder`.

    Args:
        decoder: the MAE decoder.
        num_encoder_tokens: tokens the encoder hands over (prefix tokens + visible patches); the
            decoder's ``embed`` projects these.
        num_patches: L; the blocks and the ``pred`` head run on ``P + L`` tokens (hidden patches are
            mask tokens, the decoder's P prefix tokens are kept until after ``pred``).

    Returns:
        ``embed``, ``qkv``, ``attention``, ``proj``, ``mlp``, ``pred`` and their ``total``.
    """
    num_tokens = decoder.num_prefix_tokens + num_patches
    flops = {
        "embed": linear_flops(decoder.embed, num_encoder_tokens),
        **_blocks_flops(decoder.blocks, num_tokens),
        "pred": linear_flops(decoder.pred, num_tokens),
    }
    flops["total"] = sum(flops.values())
    return flops


def model_info(model: MaskedImageModel, mask_ratio: float | None = None) -> dict[str, Any]:
    """Sizes and analytic forward FLOPs per image of a :class:`~mimkit.models.MaskedImageModel`.

    Args:
        model: a MAE-style model (ViT or ConvViT encoder, MAE decoder).
        mask_ratio: fraction of hidden patches; defaults to ``model.masker.ratio``.

    Returns:
        A flat dict: ``name``, parameter counts (``encoder_params``, ``encoder_trainable_params``,
        ``decoder_params``, ``decoder_trainable_params``, ``total_params``, ``trainable_params``),
        ``num_patches``, ``num_visible``, ``mask_ratio``, and FLOPs per image:
        ``encoder_visible_flops`` (pretraining: prefix tokens + visible patches),
        ``encoder_full_flops`` (evaluation: prefix tokens + all patches), ``decoder_flops``
        (prefix tokens + all patches) and ``pretrain_flops`` (encoder on visible + decoder).
    """
    encoder, decoder = model.encoder, model.decoder
    if not isinstance(encoder, VisionTransformer | ConvViT) or not isinstance(decoder, MAEDecoder):
        raise ValueError(
            "model_info counts FLOPs analytically for a VisionTransformer or ConvViT encoder with an MAEDecoder, "
            f"got {type(encoder).__name__} and {type(decoder).__name__}"
        )
    ratio = float(model.masker.ratio if mask_ratio is None else mask_ratio)
    num_patches = int(encoder.num_patches)
    num_visible = num_patches - num_hidden_patches(num_patches, ratio)
    if mask_ratio is None and isinstance(model.masker, FineRandomMasker):  # hides cells, never whole patches
        num_visible = num_patches
    num_prefix = int(encoder.num_prefix_tokens)
    encoder_visible = encoder_flops(encoder, num_visible)["total"]
    decoder_total = decoder_flops(decoder, num_prefix + num_visible, num_patches)["total"]
    return {
        "name": getattr(model, "name", type(model).__name__),
        "encoder_params": count_parameters(encoder),
        "encoder_trainable_params": count_parameters(encoder, trainable_only=True),
        "decoder_params": count_parameters(decoder),
        "decoder_trainable_params": count_parameters(decoder, trainable_only=True),
        "total_params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "num_patches": num_patches,
        "num_visible": num_visible,
        "mask_ratio": ratio,
        "encoder_visible_flops": encoder_visible,
        "encoder_full_flops": encoder_flops(encoder)["total"],
        "decoder_flops": decoder_total,
        "pretrain_flops": encoder_visible + decoder_total,
    }


def _human(value: float, unit: str = "") -> str:
    """``1234567 -> '1.23 M'``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def format_info(info: dict[str, Any]) -> str:
    """A readable two-column table of :func:`model_info`'s output, exact counts with short forms."""
    rows: list[tuple[str, str]] = [("model", str(info.get("name", "")))]
    for part, total_key, trainable_key in (
        ("encoder", "encoder_params", "encoder_trainable_params"),
        ("decoder", "decoder_params", "decoder_trainable_params"),
        ("total", "total_params", "trainable_params"),
    ):
        total, trainable = info[total_key], info[trainable_key]
        rows.append((f"{part} params", f"{total:,} ({_human(total)}; trainable {trainable:,})"))
    visible = f"{info['num_visible']} visible at mask ratio {info['mask_ratio']:g}"
    rows.append(("patches", f"{info['num_patches']} ({visible})"))
    labels = {
        "encoder_visible_flops": "encoder FLOPs, visible",
        "encoder_full_flops": "encoder FLOPs, all patches",
        "decoder_flops": "decoder FLOPs",
        "pretrain_flops": "pretraining forward FLOPs",
    }
    for key, label in labels.items():
        rows.append((label + " / image", f"{info[key]:,} ({_human(info[key], 'FLOP')})"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append("(FLOPs: multiply-add = 2; matmuls and convs only, norms/softmax/GELU ignored)")
    return "\n".join(lines)
