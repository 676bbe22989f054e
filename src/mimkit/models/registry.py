"""Architectures as data: encoder and decoder sizes, ``model_args(name, **overrides)`` and the encoders and
decoders they describe. :func:`mimkit.build.create_model` assembles them with a masker and a target."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mimkit.models.cls_pretraining import ClassTokenPretraining
from mimkit.models.convvit import ConvViT
from mimkit.models.linear_head import LinearHead
from mimkit.models.mae_decoder import MAEDecoder
from mimkit.models.mim import LOSS_ON
from mimkit.models.prompting_decoder import PromptingDecoder
from mimkit.models.vit import ENCODER_SEES, VisionTransformer

# Standard ViT widths (timm / MAE vocabulary). Patch sizes are MAE's defaults; CPU recipes override.
ENCODERS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}

# ConvMAE encoders (ConvViT): three stages of widths ``embed_dims`` and depths ``depths``, downsampled by
# ``patch_sizes`` (total stride 16 upstream). Base is the paper's; small and tiny are narrower. For 32x32
# inputs (Fashion-MNIST) pass ``patch_sizes=(2, 2, 2)`` (a 4x4 grid) or ``(1, 2, 2)`` (8x8).
CONV_ENCODERS: dict[str, dict[str, Any]] = {
    "convmae_tiny": dict(embed_dims=(32, 64, 128), depths=(1, 1, 4), num_heads=4, patch_sizes=(4, 2, 2)),
    "convmae_small": dict(embed_dims=(128, 256, 384), depths=(2, 2, 11), num_heads=6, patch_sizes=(4, 2, 2)),
    "convmae_base": dict(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12, patch_sizes=(4, 2, 2)),
}

# Decoder presets: MAE's default 512-d x 8 and lighter ones for small models and CPUs.
DECODERS: dict[str, dict[str, Any]] = {
    "mae": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "small": dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "tiny": dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "micro": dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
}

# What predicts the target from the encoder's output (MaskDistill's "head"): MAE's transformer decoder with a
# shared mask token, MILAN's prompting decoder (only mask tokens are updated), or BEiT's FC layer.
HEADS = ("mae", "prompting", "linear")


def default_head(target: str) -> str:
    """The head a model without an explicit ``head`` argument has: MILAN's prompting decoder for the
    ``milan`` target, MAE's decoder otherwise (what every model was built with before ``head`` existed)."""
    return "prompting" if target == "milan" else "mae"


DEFAULTS: dict[str, Any] = dict(
    img_size=224,
    in_chans=3,
    mlp_ratio=4.0,
    qkv_bias=True,
    drop_path_rate=0.0,
    norm_eps=1e-6,
    norm_pix=True,  # MAE's norm_pix_loss: the pixel target is each patch normalized
    loss=None,  # the target's usual loss (mimkit.targets.DEFAULT_LOSSES): MSE for pixels
    target="pixel",
    teacher=None,
    teacher_options=None,
    data_mean=None,
    data_std=None,
    tokenizer=None,
    teacher_cache=None,
    cls_enabled=False,
    cls_layer=None,
    cls_depth=2,
    mask_ratio=0.75,
    mask_type="random",
    mask_options=None,
    grad_checkpointing=False,
    encoder_sees="visible",  # "all": BEiT's encoder, every patch with the hidden ones as a mask embedding
    head=None,  # one of HEADS; None: default_head(target)
    loss_on="hidden",  # "all": the loss on every patch (MAE's ablation)
    norm_features=None,  # teacher targets: LayerNorm the teacher's features per patch (None: maskdistill yes, milan no)
)

# Arguments that checkpoints of older versions stored under another name (old -> new). A stored ``model_args``
# is read through stored_model_args; model_args refuses the old names, naming the new one.
RENAMED_ARGS: dict[str, str] = {"norm_pix_loss": "norm_pix", "cls_pretraining": "cls_enabled"}

# Arguments of ConvMAE only: the depthwise kernel of the convolution blocks and multi-scale fusion.
CONV_DEFAULTS: dict[str, Any] = dict(kernel_size=5, fuse=True)

ARG_NAMES = frozenset(DEFAULTS) | frozenset(ENCODERS["vit_base"]) | frozenset(DECODERS["mae"]) | {"decoder"}
CONV_ARG_NAMES = (
    frozenset(DEFAULTS)
    | frozenset(CONV_DEFAULTS)
    | frozenset(CONV_ENCODERS["convmae_base"])
    | frozenset(DECODERS["mae"])
    | {"decoder"}
)
_PER_STAGE = ("embed_dims", "depths", "patch_sizes")


def model_args(name: str, **overrides: Any) -> dict[str, Any]:
    """Resolve the full constructor arguments of a named model with overrides applied.

    Overrides use the original MAE constructor's names (``img_size``, ``patch_size``, ``in_chans``,
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``decoder_embed_dim``, ``decoder_depth``,
    ``decoder_num_heads``) and ``norm_pix`` (MAE's ``norm_pix_loss``, named as the pixel target's option) plus
    ``mask_ratio``, ``mask_type``, ``mask_options`` (keyword arguments of the masker, e.g.
    ``{"min_num_patches": 16}`` for ``block``), ``loss``, ``norm_eps``, ``qkv_bias``, ``drop_path_rate``,
    ``grad_checkpointing`` (activation checkpointing of every encoder and decoder block while training: less
    memory, about one more forward pass of compute) and ``decoder`` (a preset of :data:`DECODERS`), and the
    target: ``target`` (one of :data:`~mimkit.targets.TARGETS`), ``teacher`` (its spec), ``teacher_options``
    (``stage``, ``input_size``), ``teacher_cache`` and ``tokenizer`` (see :func:`~mimkit.targets.create_target`),
    ``data_mean`` and ``data_std`` (the normalization of the images, which a teacher undoes), and BEiT v2's
    class-token pretraining: ``cls_enabled``, ``cls_layer`` (default: the block at 3/4 of the depth),
    ``cls_depth``; and the design switches of MaskDistill's unified view and MAE's ablations: ``encoder_sees``
    (``"visible"``, MAE, or ``"all"``, BEiT's encoder with a mask embedding), ``head`` (one of :data:`HEADS`;
    None: :func:`default_head`) and ``loss_on`` (``"hidden"`` or ``"all"``).

    ConvMAE models (:data:`CONV_ENCODERS`) take ``embed_dims``, ``depths`` and ``patch_sizes`` (one value
    per stage, stored as tuples), ``kernel_size`` and ``fuse`` instead of ``embed_dim``, ``depth`` and
    ``patch_size``. The names older versions used (:data:`RENAMED_ARGS`) are refused, naming today's; a stored
    ``model_args`` is read with :func:`stored_model_args`.
    """
    if name in ENCODERS:
        encoder, defaults, valid = ENCODERS[name], DEFAULTS, ARG_NAMES
    elif name in CONV_ENCODERS:
        encoder, defaults, valid = CONV_ENCODERS[name], {**DEFAULTS, **CONV_DEFAULTS}, CONV_ARG_NAMES
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ENCODERS) + sorted(CONV_ENCODERS)}")
    unknown = set(overrides) - valid
    if renamed := sorted(unknown & set(RENAMED_ARGS)):
        raise ValueError("; ".join(f"model argument {old} is now {RENAMED_ARGS[old]}" for old in renamed))
    if unknown:
        raise ValueError(f"unknown model argument(s) {sorted(unknown)} for {name!r}; valid: {sorted(valid)}")
    decoder = overrides.get("decoder") or "mae"
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder preset {decoder!r}; choose one of {sorted(DECODERS)}")
    args = {**defaults, **encoder, **DECODERS[decoder], "decoder": decoder}
    args.update({key: value for key, value in overrides.items() if value is not None})
    for key in (*_PER_STAGE, "data_mean", "data_std"):
        if args.get(key) is not None:  # lists from YAML or JSON become tuples, so model.config compares equal
            args[key] = tuple(args[key])
    args["head"] = args["head"] or default_head(args["target"])
    check_design(name, args)
    return args


def stored_model_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Model arguments as a checkpoint stored them (``model_args``, ``mimkit.json``), with the names older versions
    wrote (:data:`RENAMED_ARGS`, e.g. ``norm_pix_loss``) read as today's (``norm_pix``).

    Raises:
        ValueError: the old and the new name are both stored, with different values.
    """
    upgraded = {key: value for key, value in args.items() if key not in RENAMED_ARGS}
    for old, new in RENAMED_ARGS.items():
        if old in args:
            if new in args and args[new] != args[old]:
                raise ValueError(f"{old}={args[old]!r} (its old name) and {new}={args[new]!r} disagree")
            upgraded[new] = args[old]
    return upgraded


def check_design(name: str, args: dict[str, Any]) -> None:
    """Refuse combinations of encoder, head and loss that cannot be built, naming the argument."""
    if args["encoder_sees"] not in ENCODER_SEES:
        raise ValueError(f"encoder_sees must be one of {ENCODER_SEES}, got {args['encoder_sees']!r}")
    if args["head"] not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {args['head']!r}")
    if args["loss_on"] not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {args['loss_on']!r}")
    if args["encoder_sees"] == "all" and name in CONV_ENCODERS:
        raise ValueError(
            "encoder_sees='all' (BEiT's mask embedding) is for ViT encoders; ConvMAE masks its convolutions"
        )
    if args["head"] == "linear" and args["encoder_sees"] != "all":
        raise ValueError(
            "head='linear' predicts each patch from the encoder's output there, so the encoder must see every "
            "patch: set encoder_sees='all' (BEiT's encoder)"
        )
    if args["head"] == "prompting" and args["encoder_sees"] == "all":
        raise ValueError(
            "head='prompting' (MILAN) prompts with the visible tokens only; it needs encoder_sees='visible'"
        )


def encoder_stride(args: dict[str, Any]) -> int:
    """Side in pixels of one patch of the encoder's output grid: ``patch_size``, or the product of a
    ConvMAE's ``patch_sizes``; the pixel target's patch size."""
    if "patch_sizes" in args:
        return math.prod(args["patch_sizes"])
    return int(args["patch_size"])


def create_encoder(name: str, **overrides: Any) -> VisionTransformer | ConvViT:
    """Build only the encoder of a named model (for evaluation and transfer)."""
    args = model_args(name, **overrides)
    if name in CONV_ENCODERS:
        return ConvViT(
            img_size=args["img_size"],
            patch_sizes=args["patch_sizes"],
            in_chans=args["in_chans"],
            embed_dims=args["embed_dims"],
            depths=args["depths"],
            num_heads=args["num_heads"],
            mlp_ratio=args["mlp_ratio"],
            qkv_bias=args["qkv_bias"],
            kernel_size=args["kernel_size"],
            fuse=args["fuse"],
            drop_path_rate=args["drop_path_rate"],
            norm_eps=args["norm_eps"],
            grad_checkpointing=args["grad_checkpointing"],
        )
    return VisionTransformer(
        img_size=args["img_size"],
        patch_size=args["patch_size"],
        in_chans=args["in_chans"],
        embed_dim=args["embed_dim"],
        depth=args["depth"],
        num_heads=args["num_heads"],
        mlp_ratio=args["mlp_ratio"],
        qkv_bias=args["qkv_bias"],
        drop_path_rate=args["drop_path_rate"],
        norm_eps=args["norm_eps"],
        grad_checkpointing=args["grad_checkpointing"],
        encoder_sees=args["encoder_sees"],
    )


def create_decoder(
    args: dict[str, Any], encoder: VisionTransformer | ConvViT, out_dim: int
) -> MAEDecoder | LinearHead | ClassTokenPretraining:
    """Build the head that predicts a target of ``out_dim`` values per patch from the encoder's output.

    Args:
        args: resolved arguments of :func:`model_args` (``head``, the ``decoder_*`` sizes, ``cls_enabled``,
            ``cls_layer``, ``cls_depth``).
        encoder: the encoder the head reads (its grid, width and prefix tokens).
        out_dim: values the head predicts per patch, the target's ``dim``.

    Returns:
        MAE's or MILAN's decoder or BEiT's linear head, wrapped in BEiT v2's class-token head when
        ``cls_enabled`` is set.
    """
    main_decoder: MAEDecoder | LinearHead
    if args["head"] == "linear":  # BEiT, MaskDistill, BEiT v2
        main_decoder = LinearHead(encoder.embed_dim, out_dim, encoder.num_prefix_tokens)
    else:
        decoder_class = PromptingDecoder if args["head"] == "prompting" else MAEDecoder
        main_decoder = decoder_class(
            encoder.grid,
            in_dim=encoder.embed_dim,
            out_dim=out_dim,
            embed_dim=args["decoder_embed_dim"],
            depth=args["decoder_depth"],
            num_heads=args["decoder_num_heads"],
            mlp_ratio=args["mlp_ratio"],
            norm_eps=args["norm_eps"],
            num_prefix_tokens=encoder.num_prefix_tokens,
            grad_checkpointing=args["grad_checkpointing"],
        )
    if not args["cls_enabled"]:
        return main_decoder
    # BEiT v2's class-token head on an early block's patch tokens
    depth = len(encoder.blocks)
    layer = args["cls_layer"] if args["cls_layer"] is not None else max(round(0.75 * depth) - 1, 0)
    if not 0 <= layer < depth:
        raise ValueError(f"cls_layer must index one of the {depth} encoder blocks, got {layer}")
    return ClassTokenPretraining(
        main_decoder,
        encoder.embed_dim,
        layer,
        depth=args["cls_depth"],
        # BEiT v2's head blocks are encoder blocks; in an MAE decoder's frame they are decoder blocks
        num_heads=args["num_heads"] if args["head"] == "linear" else args["decoder_num_heads"],
        mlp_ratio=args["mlp_ratio"],
    )
