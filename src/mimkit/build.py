"""Config -> :class:`~mimkit.models.MaskedImageModel`: the one place that wires the parts together.

The registry (:mod:`mimkit.models.registry`) describes architectures, :mod:`mimkit.targets` the targets and
:mod:`mimkit.masking` the maskers; :func:`create_model` assembles an encoder, a decoder, a masker and a target
into the frame, :func:`build_model` does so for a run's :class:`~mimkit.config.Config`, and
:func:`load_checkpoint` for what a checkpoint describes (:func:`~mimkit.checkpoints.load.read_checkpoint`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mimkit.checkpoints.load import SAVE_LAYOUTS, load_weights, read_checkpoint, save_checkpoint_as
from mimkit.config import Config, ConfigError, config_from_dict, model_overrides
from mimkit.files import CheckpointError
from mimkit.masking import create_masker
from mimkit.models.convvit import ConvViT
from mimkit.models.mim import MaskedImageModel
from mimkit.models.protocols import GridCheckedMasker
from mimkit.models.registry import create_decoder, create_encoder, encoder_stride, model_args
from mimkit.targets import create_target

__all__ = ["build_model", "convert_checkpoint", "create_model", "load_checkpoint"]


def create_model(name: str, **overrides: Any) -> MaskedImageModel:
    """Build an MAE pretraining model, e.g. ``create_model("vit_tiny", patch_size=4, img_size=32)``, or a
    ConvMAE one, e.g. ``create_model("convmae_tiny", patch_sizes=(2, 2, 2), img_size=32, in_chans=1)``.

    Args:
        name: a preset of :data:`~mimkit.models.registry.ENCODERS` or
            :data:`~mimkit.models.registry.CONV_ENCODERS`.
        overrides: arguments of :func:`~mimkit.models.registry.model_args`.

    Returns:
        A :class:`MaskedImageModel`; ``model.encoder`` is the encoder used for evaluation and
        ``model.config`` the resolved arguments (enough to rebuild it).
    """
    args = model_args(name, **overrides)
    encoder = create_encoder(name, **overrides)
    target = create_target(
        args["target"],
        patch_size=encoder_stride(args),
        in_chans=args["in_chans"],
        grid=encoder.grid,
        loss=args["loss"],
        norm_pix=args["norm_pix"],
        teacher=args["teacher"],
        teacher_options=args["teacher_options"],
        mean=args["data_mean"],
        std=args["data_std"],
        tokenizer=args["tokenizer"],
        teacher_cache=args["teacher_cache"],
        norm_features=args["norm_features"],
    )
    decoder = create_decoder(args, encoder, int(target.dim))
    mask_options = dict(args["mask_options"] or {})
    if args["mask_type"] == "fine_random":  # drawn on the first convolution stage's grid
        if not isinstance(encoder, ConvViT) or args["target"] != "pixel":
            raise ValueError(
                "mask_type 'fine_random' masks ConvMAE's stage-1 grid: it needs ConvMAE and a pixel target"
            )
        mask_options["factor"] = encoder.stage_factors[0]
    masker = create_masker(args["mask_type"], args["mask_ratio"], **mask_options)
    if isinstance(masker, GridCheckedMasker):  # e.g. grid masking needs even sides: say so now, not at a batch
        masker.check_grid(encoder.grid)
    model = MaskedImageModel(encoder, decoder, masker, target, loss_on=args["loss_on"])
    model.name = name
    model.config = {"name": name, **args}
    return model


def build_model(config: Config) -> MaskedImageModel:
    """The pretraining model described by a config."""
    return create_model(config.model.name, **model_overrides(config))


def _build(args: Mapping[str, Any], path: Path, source: str) -> MaskedImageModel:
    args = dict(args)
    name = args.pop("name", "vit_base")
    try:
        return create_model(name, **args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot build the model from its {source} ({err})") from None


def _run_config(data: Any, path: Path, required: bool) -> Config | None:
    try:
        return config_from_dict(data)
    except ConfigError as err:
        if required:
            raise CheckpointError(f"{path}: its run config is not valid for this mimkit version ({err})") from None
        warnings.warn(f"{path}: ignoring its run config, not valid for this mimkit version ({err})", stacklevel=3)
        return None


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    overrides: Mapping[str, Any] | None = None,
) -> MaskedImageModel:
    """Build the pretraining model a checkpoint describes and load its weights.

    Accepts mimkit training checkpoints, files from :func:`~mimkit.checkpoints.load.save_checkpoint_as`, original MAE
    checkpoints, bare state dicts of any layout (also ``.safetensors``) and HuggingFace ``save_pretrained``
    directories (see :mod:`mimkit.checkpoints.load`). Nothing stored in the file is executed (``weights_only``).

    Args:
        path: checkpoint file or HuggingFace directory.
        map_location: device the returned model is placed on.
        overrides: :func:`~mimkit.models.registry.model_args` arguments the file does not tell, e.g.
            ``{"num_heads": 3}`` for a bare state dict whose width is not in the registry.

    Returns:
        The model in eval mode; ``model.config`` holds its arguments and ``model.run_config`` the
        :class:`~mimkit.config.Config` it was trained with, or None when the checkpoint has none.

    Raises:
        CheckpointError: missing, truncated or unrecognized checkpoint, or weights that do not fit the
            architecture it describes; the message names the path.
        OptionalDependencyError: a HuggingFace directory or ``.safetensors`` file without transformers/safetensors.
    """
    contents = read_checkpoint(path, overrides=overrides)
    run_config = None
    if contents.run_config is not None:
        run_config = _run_config(contents.run_config, contents.run_config_path, required=contents.run_config_required)
    if contents.args is not None:
        model = _build(contents.args, contents.path, contents.args_source)
    elif run_config is not None:
        model = build_model(run_config)
    else:  # read_checkpoint refuses a checkpoint with neither
        raise CheckpointError(f"{contents.path} has neither model_args nor a run config to rebuild its model from")
    load_weights(model, contents.read_weights(), contents.path, full=contents.full)
    model.run_config = run_config
    return model.to(map_location).eval()


def convert_checkpoint(input: str | Path, output: str | Path, to: str) -> Path:
    """Convert any checkpoint :func:`load_checkpoint` reads to the ``to`` layout (see
    :func:`~mimkit.checkpoints.load.save_checkpoint_as`).

    Conversion is lossless: mimkit -> mae -> mimkit and mimkit -> hf -> mimkit give bit-identical tensors.
    A failed conversion leaves an existing ``output`` as it was.

    Args:
        input: checkpoint file or HuggingFace directory.
        output: output file (mimkit, mae) or directory (hf).
        to: one of :data:`~mimkit.checkpoints.load.SAVE_LAYOUTS`.

    Returns:
        The path written.
    """
    if to not in SAVE_LAYOUTS:
        raise ValueError(f"unknown layout {to!r}; choose one of {SAVE_LAYOUTS}")
    return save_checkpoint_as(load_checkpoint(input), output, to)
