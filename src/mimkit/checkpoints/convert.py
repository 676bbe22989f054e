"""Lossless weight conversion between mimkit, the original MAE code, HuggingFace ``ViTMAE`` and timm.

Layouts of the full pretraining model's state dict:

* ``"mimkit"``: ``MaskedImageModel.state_dict()`` (``encoder.*``, ``decoder.*``).
* ``"mae"``: facebookresearch/mae ``models_mae.py`` (``blocks.N.*``, ``decoder_blocks.N.*``, ...); its
  encoder part is also timm's ``VisionTransformer`` layout.
* ``"hf"``: ``transformers.ViTMAEForPreTraining.state_dict()`` of transformers 5.x (``vit.layers.N``,
  split ``q_proj/k_proj/v_proj``).
* ``"hf_legacy"``: the same model in transformers 4.x and on the Hub (``vit.encoder.layer.N``,
  ``attention.attention.query``, ...); transformers 5.x renames it on load.

One table of renames, :data:`RENAMES`, drives every direction; the only non-rename is the fused qkv
projection, which HuggingFace stores as three row blocks (q, k, v) and mimkit/MAE/timm as one tensor.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mimkit.models.registry import DECODERS, ENCODERS, model_args
from mimkit.models.vit import VisionTransformer

if TYPE_CHECKING:
    from transformers import ViTMAEConfig

LAYOUTS = ("mimkit", "mae", "hf", "hf_legacy")

# A name is a key template ({i}: block index, {p}: weight/bias); a triple is one fused qkv tensor stored
# as its (q, k, v) row blocks.
Name = str | tuple[str, str, str]

# Where each block lives, per layout in LAYOUTS order.
_BLOCK_PREFIXES = (
    ("encoder.blocks.{i}.", "blocks.{i}.", "vit.layers.{i}.", "vit.encoder.layer.{i}."),
    ("decoder.blocks.{i}.", "decoder_blocks.{i}.", "decoder.decoder_layers.{i}.", "decoder.decoder_layers.{i}."),
)
# Inside a block: mimkit (= mae = timm), hf, hf_legacy.
_BLOCK_PARTS: tuple[tuple[Name, Name, Name], ...] = (
    ("norm1.{p}", "layernorm_before.{p}", "layernorm_before.{p}"),
    (
        "attn.qkv.{p}",
        ("attention.q_proj.{p}", "attention.k_proj.{p}", "attention.v_proj.{p}"),
        ("attention.attention.query.{p}", "attention.attention.key.{p}", "attention.attention.value.{p}"),
    ),
    ("attn.proj.{p}", "attention.o_proj.{p}", "attention.output.dense.{p}"),
    ("norm2.{p}", "layernorm_after.{p}", "layernorm_after.{p}"),
    ("mlp.fc1.{p}", "mlp.fc1.{p}", "intermediate.dense.{p}"),
    ("mlp.fc2.{p}", "mlp.fc2.{p}", "output.dense.{p}"),
)


def _prefixed(prefix: str, name: Name) -> Name:
    return prefix + name if isinstance(name, str) else (prefix + name[0], prefix + name[1], prefix + name[2])


# Every key of the pretraining model, one row per tensor, columns in LAYOUTS order.
RENAMES: tuple[tuple[Name, Name, Name, Name], ...] = (
    ("encoder.cls_token", "cls_token", "vit.embeddings.cls_token", "vit.embeddings.cls_token"),
    ("encoder.pos_embed", "pos_embed", "vit.embeddings.position_embeddings", "vit.embeddings.position_embeddings"),
    (
        "encoder.patch_embed.proj.{p}",
        "patch_embed.proj.{p}",
        "vit.embeddings.patch_embeddings.projection.{p}",
        "vit.embeddings.patch_embeddings.projection.{p}",
    ),
    ("encoder.norm.{p}", "norm.{p}", "vit.layernorm.{p}", "vit.layernorm.{p}"),
    ("decoder.embed.{p}", "decoder_embed.{p}", "decoder.decoder_embed.{p}", "decoder.decoder_embed.{p}"),
    ("decoder.mask_token", "mask_token", "decoder.mask_token", "decoder.mask_token"),
    ("decoder.pos_embed", "decoder_pos_embed", "decoder.decoder_pos_embed", "decoder.decoder_pos_embed"),
    ("decoder.norm.{p}", "decoder_norm.{p}", "decoder.decoder_norm.{p}", "decoder.decoder_norm.{p}"),
    ("decoder.pred.{p}", "decoder_pred.{p}", "decoder.decoder_pred.{p}", "decoder.decoder_pred.{p}"),
    *(
        (
            _prefixed(mimkit, ours),
            _prefixed(mae, ours),
            _prefixed(hf, hf_part),
            _prefixed(legacy, legacy_part),
        )
        for mimkit, mae, hf, legacy in _BLOCK_PREFIXES
        for ours, hf_part, legacy_part in _BLOCK_PARTS
    ),
)

_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


def _compile(template: str) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w)\}", template)  # literal, field, literal, ...
    return re.compile("".join(_FIELDS[piece] if n % 2 else re.escape(piece) for n, piece in enumerate(pieces)))


# Per layout: (pattern, row index, part of a split qkv or None).
_PATTERNS: dict[str, list[tuple[re.Pattern[str], int, int | None]]] = {
    layout: [
        (_compile(template), row_index, None if isinstance(name, str) else part)
        for row_index, row in enumerate(RENAMES)
        for name in [row[column]]
        for part, template in enumerate([name] if isinstance(name, str) else name)
    ]
    for column, layout in enumerate(LAYOUTS)
}


def _match(key: str, layout: str) -> tuple[int, int | None, dict[str, str]] | None:
    for pattern, row_index, part in _PATTERNS[layout]:
        found = pattern.fullmatch(key)
        if found:
            return row_index, part, found.groupdict()
    return None


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict inside a checkpoint: its ``"model"`` (MAE, mimkit) or ``"state_dict"`` entry, else itself."""
    for entry in ("model", "state_dict"):
        inner = checkpoint.get(entry)
        if isinstance(inner, Mapping):
            return dict(inner)
    return dict(checkpoint)


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Which of :data:`LAYOUTS` a state dict (or a checkpoint holding one) is in.

    Returns:
        The layout naming the most keys; HF 5.x and 4.x names tell ``"hf"`` from ``"hf_legacy"``.

    Raises:
        ValueError: if no key belongs to any layout.
    """
    keys = list(unwrap_checkpoint(state_dict))
    counts = {layout: sum(_match(key, layout) is not None for key in keys) for layout in LAYOUTS}
    best = max(LAYOUTS, key=lambda layout: counts[layout])  # first in LAYOUTS wins a tie
    if counts[best] == 0:
        raise ValueError(
            f"cannot tell the layout of this state dict: none of its keys ({_preview(keys)}) is a key of an "
            f"MAE pretraining model in any of {LAYOUTS}"
        )
    return best


def _convert(state_dict: Mapping[str, Tensor], source: str, target: str) -> dict[str, Tensor]:
    """Rename (and split or fuse qkv of) every key from ``source`` to ``target`` layout."""
    out: dict[str, Tensor] = {}
    qkv_parts: dict[str, dict[int, Tensor]] = {}  # fused target key -> the q/k/v blocks seen so far
    unknown = []
    column = LAYOUTS.index(target)
    for key, value in state_dict.items():
        found = _match(key, source)
        if found is None:
            unknown.append(key)
            continue
        row_index, part, fields = found
        name = RENAMES[row_index][column]
        if part is None:
            if isinstance(name, str):
                out[name.format(**fields)] = value
            else:  # fused source -> split target; clones so no two tensors share storage
                for split_name, block in zip(name, value.chunk(3, dim=0), strict=True):
                    out[split_name.format(**fields)] = block.clone()
        elif isinstance(name, str):  # split source -> fused target
            fused = name.format(**fields)
            out.setdefault(fused, value)  # placeholder keeps the key order; replaced below
            qkv_parts.setdefault(fused, {})[part] = value
        else:
            out[name[part].format(**fields)] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) are not keys of an MAE pretraining model in the {source!r} layout: "
            f"{_preview(unknown)}"
        )
    for fused, parts in qkv_parts.items():
        if len(parts) != 3:
            raise ValueError(f"{fused} needs q, k and v blocks; the {source!r} state dict has only {len(parts)}")
        out[fused] = torch.cat([parts[0], parts[1], parts[2]], dim=0)  # (3 * D, ...) rows q, k, v
    return out


def to_mimkit(state_dict: Mapping[str, Any], layout: str | None = None) -> dict[str, Tensor]:
    """Convert a state dict (or a ``{"model": ...}`` checkpoint) of any layout to mimkit keys.

    Encoder-only dicts (e.g. MAE's released pretrained encoders, timm ViTs) give encoder keys only.

    Args:
        state_dict: weights in ``layout``.
        layout: one of :data:`LAYOUTS`; detected when None.

    Raises:
        ValueError: naming every key that is not part of the layout.
    """
    weights = unwrap_checkpoint(state_dict)
    layout = layout or detect_layout(weights)
    _check_layout(layout)
    return _convert(weights, layout, "mimkit")


def from_mimkit(state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Convert mimkit weights to ``layout`` (one of :data:`LAYOUTS`); the inverse of :func:`to_mimkit`."""
    _check_layout(layout)
    return _convert(unwrap_checkpoint(state_dict), "mimkit", layout)


def load_into(model: nn.Module, state_dict: Mapping[str, Any], layout: str | None = None) -> list[str]:
    """Load weights of any layout into a :class:`MaskedImageModel` or a :class:`VisionTransformer`.

    Every key is checked before anything is copied. An encoder-only checkpoint loads into a full model,
    leaving the decoder as initialised; a full checkpoint loads into an encoder, dropping the decoder.

    Args:
        model: a ``MaskedImageModel`` or its encoder.
        state_dict: weights or a checkpoint holding them, in ``layout`` (detected when None).
        layout: one of :data:`LAYOUTS`.

    Returns:
        The model keys the checkpoint did not set (the decoder's, for an encoder-only checkpoint).

    Raises:
        ValueError: naming unexpected, missing and shape-mismatched keys.
    """
    weights = to_mimkit(state_dict, layout)
    if isinstance(model, VisionTransformer):
        weights = {key.removeprefix("encoder."): value for key, value in weights.items() if key.startswith("encoder.")}
    expected = model.state_dict()
    encoder_only = not any(key.startswith("decoder.") for key in weights)
    left_out = [key for key in expected if key not in weights and encoder_only and key.startswith("decoder.")]
    if problems := fit_problems(expected, weights, allowed_missing=left_out):
        raise ValueError(f"state dict does not fit the model (a different architecture or size?): {problems}")
    model.load_state_dict(weights, strict=False)
    if left_out:
        warnings.warn(
            f"encoder-only checkpoint: {len(left_out)} decoder keys keep their initialisation "
            f"({_preview(left_out, 3)})",
            stacklevel=2,
        )
    return left_out


def fit_problems(
    expected: Mapping[str, Tensor], weights: Mapping[str, Tensor], allowed_missing: Sequence[str] = ()
) -> str:
    """Why ``weights`` do not fit a model whose ``state_dict()`` is ``expected``: its unexpected keys,
    missing keys (other than ``allowed_missing``) and shape mismatches, previewed; empty when they fit."""
    problems = []
    if unexpected := [key for key in weights if key not in expected]:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    allowed = set(allowed_missing)
    if missing := [key for key in expected if key not in weights and key not in allowed]:
        problems.append(f"missing keys: {_preview(missing)}")
    if mismatched := [
        f"{key} {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in weights.items()
        if key in expected and value.shape != expected[key].shape
    ]:
        problems.append(f"shape mismatches: {_preview(mismatched)}")
    return "; ".join(problems)


def encoder_to_timm(state_dict: Mapping[str, Any], layout: str | None = None) -> dict[str, Tensor]:
    """Encoder weights for a timm ``VisionTransformer`` with a class token (names as in MAE's encoder).

    Build the timm model with the same sizes and ``global_pool="token"`` (timm's ``"avg"`` replaces the
    final ``norm`` by ``fc_norm``), e.g. ``timm.create_model("vit_tiny_patch16_224", img_size=32,
    patch_size=4, in_chans=1, num_classes=0, global_pool="token")``, and ``load_state_dict`` strictly.
    timm's LayerNorm epsilon is 1e-6 (MAE's); its ``forward_features(x)[:, 0]`` then equals
    ``VisionTransformer.forward_features(x, pool="cls")``.

    Args:
        state_dict: weights in any of :data:`LAYOUTS` (detected when ``layout`` is None).
        layout: the layout of ``state_dict``.
    """
    weights = unwrap_checkpoint(state_dict)
    layout = layout or detect_layout(weights)
    if layout != "mimkit":
        weights = to_mimkit(weights, layout)
    # mimkit's encoder keys are timm's; the BEiT-style mask embedding is a pretraining part timm has no slot for
    encoder = {
        key.removeprefix("encoder."): value
        for key, value in weights.items()
        if key.startswith("encoder.") and key != "encoder.mask_token"
    }
    if not encoder:
        raise ValueError("the state dict holds no encoder weights")
    return encoder


def _encoder_name(embed_dim: int) -> str:
    """The registry encoder of this width, else the nearest (a label only; sizes are set explicitly)."""
    return min(ENCODERS, key=lambda name: abs(ENCODERS[name]["embed_dim"] - embed_dim))


def _square(value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    height, width = value
    if height != width:
        raise ValueError(f"{what} {tuple(value)} is not square; mimkit's MAE models are square")
    return int(height)


def hf_config_from_args(args: Mapping[str, Any]) -> ViTMAEConfig:
    """The ``transformers.ViTMAEConfig`` of a mimkit model.

    Args:
        args: ``model.config`` (or any subset of :func:`model_args`' arguments with a ``"name"``).

    Raises:
        ValueError: for what ``ViTMAEForPreTraining`` cannot express (losses other than MSE, stochastic
            depth, non-random masks, no qkv bias).
    """
    from transformers import ViTMAEConfig  # optional dependency: mimkit[hf]

    overrides = {key: value for key, value in args.items() if key != "name"}
    resolved = model_args(args.get("name", "vit_base"), **overrides)
    if resolved["target"] != "pixel":
        raise ValueError(f"ViTMAEForPreTraining only predicts pixels, not {resolved['target']!r} targets")
    if resolved["loss"] not in (None, "mse"):
        raise ValueError(f"ViTMAEForPreTraining only has an MSE loss, not {resolved['loss']!r}")
    if resolved["mask_type"] != "random":
        raise ValueError(f"ViTMAEForPreTraining only has random masking, not {resolved['mask_type']!r}")
    if resolved["drop_path_rate"]:
        raise ValueError(f"ViTMAEForPreTraining has no stochastic depth (drop_path_rate={resolved['drop_path_rate']})")
    if not resolved["qkv_bias"]:
        raise ValueError("qkv_bias=False has no ViTMAE equivalent: HF applies it to the decoder, mimkit does not")
    mlp_ratio = resolved["mlp_ratio"]
    return ViTMAEConfig(
        hidden_size=resolved["embed_dim"],
        num_hidden_layers=resolved["depth"],
        num_attention_heads=resolved["num_heads"],
        intermediate_size=int(resolved["embed_dim"] * mlp_ratio),
        hidden_act="gelu",
        layer_norm_eps=resolved["norm_eps"],
        image_size=_square(resolved["img_size"], "img_size"),
        patch_size=resolved["patch_size"],
        num_channels=resolved["in_chans"],
        qkv_bias=True,
        decoder_hidden_size=resolved["decoder_embed_dim"],
        decoder_num_hidden_layers=resolved["decoder_depth"],
        decoder_num_attention_heads=resolved["decoder_num_heads"],
        decoder_intermediate_size=int(resolved["decoder_embed_dim"] * mlp_ratio),
        mask_ratio=resolved["mask_ratio"],
        norm_pix_loss=resolved["norm_pix"],
    )


def args_from_hf_config(config: ViTMAEConfig) -> dict[str, Any]:
    """mimkit model arguments equivalent to a ``ViTMAEConfig``: ``create_model(**args)`` rebuilds it.

    Returns:
        Resolved arguments in the form of ``model.config`` (``"name"`` is the registry encoder of the
        same width, or the nearest; every size is set explicitly).

    Raises:
        ValueError: for what mimkit cannot express: a decoder MLP ratio different from the encoder's,
            activations other than exact GELU, dropout, no qkv bias, non-square images or patches.
    """
    hidden, decoder_hidden = config.hidden_size, config.decoder_hidden_size
    mlp_ratio = config.intermediate_size / hidden
    if int(hidden * mlp_ratio) != config.intermediate_size:
        raise ValueError(f"intermediate_size {config.intermediate_size} is not hidden_size {hidden} * a ratio")
    if int(decoder_hidden * mlp_ratio) != config.decoder_intermediate_size:
        raise ValueError(
            f"decoder_intermediate_size {config.decoder_intermediate_size} != decoder_hidden_size {decoder_hidden} "
            f"* mlp_ratio {mlp_ratio} (intermediate_size / hidden_size); mimkit's encoder and decoder share one "
            "mlp_ratio"
        )
    if config.hidden_act != "gelu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; mimkit uses exact GELU ('gelu')")
    if config.hidden_dropout_prob or config.attention_probs_dropout_prob:
        raise ValueError("mimkit's MAE has no dropout; set hidden_dropout_prob and attention_probs_dropout_prob to 0")
    if not config.qkv_bias:
        raise ValueError("qkv_bias=False is not supported: HF drops the decoder's qkv bias too, mimkit keeps it")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != hidden:
        raise ValueError(f"head_dim {head_dim} * num_attention_heads != hidden_size {hidden}")
    name = _encoder_name(hidden)
    return {
        "name": name,
        **model_args(
            name,
            img_size=_square(config.image_size, "image_size"),
            patch_size=_square(config.patch_size, "patch_size"),
            in_chans=config.num_channels,
            embed_dim=hidden,
            depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            norm_eps=config.layer_norm_eps,
            decoder_embed_dim=decoder_hidden,
            decoder_depth=config.decoder_num_hidden_layers,
            decoder_num_heads=config.decoder_num_attention_heads,
            mask_ratio=config.mask_ratio,
            norm_pix=config.norm_pix_loss,
        ),
    }


def _num_blocks(weights: Mapping[str, Tensor], prefix: str) -> int:
    indices = {int(key[len(prefix) :].split(".")[0]) for key in weights if key.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"blocks {sorted(indices)} under {prefix!r} are not numbered 0..N-1")
    return len(indices)


def infer_args_from_mae_state_dict(state_dict: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """mimkit model arguments read off the shapes of an MAE checkpoint (any layout works).

    Shapes give widths, depths, patch size, channels, image size, MLP ratio and qkv bias. Head counts
    are not in the weights: they come from the registry entry of the same width (:data:`ENCODERS`,
    :data:`DECODERS`) unless given in ``overrides``. An encoder-only checkpoint keeps the registry's
    decoder (MAE's 512-d x 8). ``norm_eps`` defaults to MAE's 1e-6.

    Args:
        state_dict: weights or a ``{"model": ...}`` checkpoint.
        overrides: any :func:`model_args` argument, e.g. ``num_heads`` for a width not in the registry.

    Returns:
        Resolved arguments in the form of ``model.config``; ``create_model(**args)`` builds the model.

    Raises:
        ValueError: if a head count cannot be taken from the registry or the shapes are inconsistent.
    """
    weights = to_mimkit(state_dict)
    if "encoder.patch_embed.proj.weight" not in weights:
        raise ValueError("the state dict has no patch embedding (encoder.patch_embed.proj.weight)")
    embed_dim, in_chans, patch_size, _ = weights["encoder.patch_embed.proj.weight"].shape  # (D, C, p, p)
    num_patches = weights["encoder.pos_embed"].shape[1] - 1  # (1, 1 + L, D)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} positions do not form a square patch grid")
    mlp_ratio = weights["encoder.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim  # fc1: (D * ratio, D)
    inferred: dict[str, Any] = dict(
        img_size=side * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=_num_blocks(weights, "encoder.blocks."),
        mlp_ratio=mlp_ratio,
        qkv_bias="encoder.blocks.0.attn.qkv.bias" in weights,
    )
    name = _encoder_name(embed_dim)
    if ENCODERS[name]["embed_dim"] == embed_dim:
        inferred["num_heads"] = ENCODERS[name]["num_heads"]
    elif "num_heads" not in overrides:
        raise ValueError(f"no registry encoder is {embed_dim} wide; pass num_heads=... for this checkpoint")
    if "decoder.embed.weight" in weights:
        decoder_dim = weights["decoder.embed.weight"].shape[0]  # (Dd, D)
        decoder_depth = _num_blocks(weights, "decoder.blocks.")
        decoder_hidden = weights["decoder.blocks.0.mlp.fc1.weight"].shape[0]
        if decoder_hidden != int(decoder_dim * mlp_ratio):
            raise ValueError(
                f"decoder MLP width {decoder_hidden} != {decoder_dim} * encoder mlp_ratio {mlp_ratio}; "
                "mimkit's encoder and decoder share one mlp_ratio"
            )
        inferred.update(decoder_embed_dim=decoder_dim, decoder_depth=decoder_depth)
        presets = [preset for preset in DECODERS.values() if preset["decoder_embed_dim"] == decoder_dim]
        presets.sort(key=lambda preset: preset["decoder_depth"] != decoder_depth)  # same depth first
        if presets:
            inferred["decoder_num_heads"] = presets[0]["decoder_num_heads"]
        elif "decoder_num_heads" not in overrides:
            raise ValueError(f"no registry decoder is {decoder_dim} wide; pass decoder_num_heads=...")
    inferred.update(overrides)
    return {"name": name, **model_args(name, **inferred)}
