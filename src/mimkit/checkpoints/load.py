"""Read any MAE checkpoint, and save a model in the mimkit, MAE or HuggingFace layout.

:func:`read_checkpoint` tells what a checkpoint describes (model arguments, run config, weights) without building
anything; :func:`mimkit.build.load_checkpoint` builds the whole model from it, :func:`load_encoder` the encoder
alone. They read

* mimkit training checkpoints (``last.pt``: ``model`` + ``model_args`` and ``config``) and the files
  :func:`save_checkpoint_as` writes (``model`` in the mimkit or MAE layout + ``model_args``);
* original MAE checkpoints (facebookresearch/mae): ``{"model": ..., "args": argparse.Namespace, ...}``
  from ``main_pretrain.py``, or the released ``{"model": ...}`` files;
* bare state dicts in any of :data:`~mimkit.checkpoints.convert.LAYOUTS` (``.pt``/``.pth``/``.bin`` or
  ``.safetensors``), the architecture read off the tensor shapes;
* HuggingFace ``save_pretrained`` directories of ``ViTMAEForPreTraining`` (``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``, sharded or not).

Files are read with ``weights_only=True``: no code stored in a checkpoint is ever executed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mimkit.checkpoints.convert import (
    args_from_hf_config,
    detect_layout,
    fit_problems,
    from_mimkit,
    hf_config_from_args,
    infer_args_from_mae_state_dict,
    load_into,
    to_mimkit,
    unwrap_checkpoint,
)
from mimkit.files import CheckpointError, error_summary, load_checkpoint_file, save_checkpoint
from mimkit.models.convvit import ConvViT
from mimkit.models.mae_decoder import MAEDecoder
from mimkit.models.mim import MaskedImageModel
from mimkit.models.registry import create_encoder, stored_model_args
from mimkit.models.vit import VisionTransformer

SAVE_LAYOUTS = ("mimkit", "mae", "hf")
HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
# mimkit's own arguments and run config beside config.json, so mimkit -> hf -> mimkit restores them exactly.
MIMKIT_EXTRA_NAME = "mimkit.json"
# Key names in the weights file: those of the Hub and transformers 4.x, which transformers 5.x renames on
# load (and writes itself for the encoder), so the directory loads in either version.
HF_FILE_LAYOUT = "hf_legacy"
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HF_WRITTEN_FILES = frozenset({HF_CONFIG_NAME, HF_WEIGHTS_NAME, MIMKIT_EXTRA_NAME})
# Arguments that config.json and mimkit.json must agree on for mimkit.json to be used.
_HF_CONFIG_KEYS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "norm_eps",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mask_ratio",
    "norm_pix",
)
_KINDS = (
    "a mimkit training checkpoint (model + model_args/config), an original MAE checkpoint (model [+ args]), "
    "a state dict in the mimkit, MAE or HuggingFace layout, or a HuggingFace save_pretrained directory"
)


class OptionalDependencyError(ImportError):
    """An optional dependency (transformers, safetensors) is needed for this file and is not installed."""


def import_transformers(purpose: str = "HuggingFace checkpoints") -> Any:
    """The ``transformers`` module, or an :class:`OptionalDependencyError` saying what needs it."""
    try:
        import transformers
    except ImportError:
        raise OptionalDependencyError(
            f"{purpose} need the optional dependency transformers: pip install 'mimkit[hf]'"
        ) from None
    return transformers


def _import_safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise OptionalDependencyError(
            "safetensors files need the optional dependency safetensors: pip install 'mimkit[hf]'"
        ) from None
    return safetensors.torch


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    safetensors_torch = _import_safetensors()
    try:
        return dict(safetensors_torch.load_file(str(path), device="cpu"))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(
            f"{path} could not be read as safetensors ({error_summary(err)}); it may be truncated; export it again"
        ) from None


def _read_file(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents, never executing pickled code."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; a run saves <train.output_dir>/last.pt")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    # Original MAE checkpoints store their argparse.Namespace; allow exactly that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_checkpoint_file(path, map_location="cpu")


def _tensors_only(weights: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    if not weights:
        raise CheckpointError(f"{path} holds no weights; expected {_KINDS}")
    others = [key for key, value in weights.items() if not isinstance(value, Tensor)]
    if others:
        shown = ", ".join(f"{key} ({type(weights[key]).__name__})" for key in others[:5])
        raise CheckpointError(
            f"{path} is not a checkpoint mimkit recognizes: entries {shown} are not tensors; expected {_KINDS}"
        )
    return dict(weights)


def load_weights(model: MaskedImageModel, weights: Mapping[str, Tensor], path: Path, *, full: bool) -> None:
    """Load weights of any layout into a model; ``full`` refuses encoder-only weights (a training
    checkpoint has both).

    ConvMAE and models with a decoder beyond MAE's (BEiT v2's class-token head) have the mimkit layout
    only: their own keys, all of them.

    Raises:
        CheckpointError: the weights do not fit the model; the message names ``path``.
    """
    kind = type(model.encoder).__name__ + " + " + type(model.decoder).__name__
    advice = (
        f"the file's weights belong to another architecture than the {kind} it describes; re-save it from the "
        "model that produced the weights"
    )
    native = isinstance(model.encoder, ConvViT) or not isinstance(model.decoder, MAEDecoder)
    if native or set(weights) == set(model.state_dict()):
        if problems := fit_problems(model.state_dict(), weights):
            raise CheckpointError(f"{path}: the weights do not fit the model ({problems}); {advice}")
        model.load_state_dict(weights, strict=True)
        return
    try:
        converted = to_mimkit(weights)
        if full and not any(key.startswith("decoder.") for key in converted):
            raise ValueError("it holds encoder weights only, but a full pretraining model was saved")
        load_into(model, converted, "mimkit")
    except ValueError as err:
        fit = "does not fit the model" in str(err)
        raise CheckpointError(f"{path}: {err}" + (f"; {advice}" if fit else "")) from None


@dataclass
class CheckpointContents:
    """What a checkpoint tells about its model, before any model is built.

    Attributes:
        path: the file or directory read.
        args: :func:`~mimkit.models.registry.model_args` arguments with the preset's ``name``; None when only
            the run config describes the model.
        args_source: where ``args`` come from (``"model_args"``, ``"inferred architecture"``, ``config.json``),
            for error messages.
        run_config: the run config as saved (:meth:`~mimkit.config.Config.to_dict` output), or None.
        run_config_path: the file holding ``run_config``, for error messages.
        run_config_required: whether the model can only be rebuilt from ``run_config`` (no ``args``), so that
            an invalid one is an error rather than a warning.
        full: whether the weights must hold the decoder too (a mimkit checkpoint saves whole models).
        read_weights: returns the weights, in any of :data:`~mimkit.checkpoints.convert.LAYOUTS`.
    """

    path: Path
    args: dict[str, Any] | None
    args_source: str
    run_config: Any
    run_config_path: Path
    run_config_required: bool
    full: bool
    read_weights: Callable[[], dict[str, Tensor]]


def _stored_args(args: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``model_args`` as stored in ``path``, the names of older versions read as today's."""
    try:
        return stored_model_args(args)
    except ValueError as err:
        raise CheckpointError(f"{path}: its model_args are inconsistent ({err})") from None


def _mimkit_contents(state: dict[str, Any], path: Path) -> CheckpointContents:
    """A training checkpoint or a file from :func:`save_checkpoint_as` (weights in the mimkit or MAE layout)."""
    weights = _tensors_only(unwrap_checkpoint(state), path)
    model_args = state.get("model_args")
    if not isinstance(model_args, Mapping) and state.get("config") is None:
        raise CheckpointError(f"{path} has neither model_args nor a run config to rebuild its model from")
    return CheckpointContents(
        path=path,
        args=_stored_args(model_args, path) if isinstance(model_args, Mapping) else None,
        args_source="model_args",
        run_config=state.get("config"),
        run_config_path=path,
        run_config_required=not isinstance(model_args, Mapping),
        full=True,
        read_weights=lambda: weights,
    )


def _infer_args(weights: Mapping[str, Tensor], path: Path, layout: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    if layout in ("hf", "hf_legacy"):
        # What ViTMAEConfig() would have said: HF's own defaults, not MAE's.
        hints = {"norm_eps": 1e-12, "norm_pix": False}
        if not overrides:
            warnings.warn(
                f"{path}: HuggingFace weights without their config.json; the architecture is read off the shapes, "
                "head counts come from the registry and layer_norm_eps=1e-12, norm_pix_loss=False, mask_ratio=0.75 "
                "are HuggingFace's defaults. Load the save_pretrained directory for the exact model.",
                stacklevel=5,
            )
    try:
        return infer_args_from_mae_state_dict(weights, **{**hints, **overrides})
    except (KeyError, ValueError) as err:
        advice = "pass overrides={'num_heads': ..., 'decoder_num_heads': ...}"
        if layout in ("hf", "hf_legacy"):
            advice = f"load the save_pretrained directory holding its config.json instead, or {advice}"
        raise CheckpointError(f"{path}: cannot infer the architecture from the weights ({err}); {advice}") from None


def _weights_contents(
    weights: Mapping[str, Tensor], path: Path, overrides: Mapping[str, Any], args_hint: Mapping[str, Any]
) -> CheckpointContents:
    """A bare state dict (or an original MAE checkpoint's ``model``), architecture read off the shapes."""
    try:
        layout = detect_layout(weights)
    except ValueError as err:
        raise CheckpointError(f"{path} is not a checkpoint mimkit recognizes ({err}); expected {_KINDS}") from None
    args = _infer_args(weights, path, layout, {**args_hint, **overrides})
    tensors = dict(weights)
    return CheckpointContents(
        path=path,
        args=args,
        args_source="inferred architecture",
        run_config=None,
        run_config_path=path,
        run_config_required=False,
        full=False,
        read_weights=lambda: tensors,
    )


def _mae_args_hint(args: Any) -> dict[str, Any]:
    """Arguments of MAE's ``main_pretrain.py`` that the weights do not tell."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    hint: dict[str, Any] = {}
    if isinstance(values.get("norm_pix_loss"), bool):
        hint["norm_pix"] = values["norm_pix_loss"]
    if isinstance(values.get("mask_ratio"), float):
        hint["mask_ratio"] = values["mask_ratio"]
    if isinstance(values.get("input_size"), int):
        hint["img_size"] = values["input_size"]
    return hint


def _hf_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of a save_pretrained directory (single file or shards), keys as stored."""
    for name in _HF_WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{path} is not a valid shard index ({err})") from None
            weights: dict[str, Tensor] = {}
            for shard in shards:
                weights.update(_hf_weights_file(directory / shard))
            return weights
        return _hf_weights_file(path)
    raise CheckpointError(
        f"{directory} has a config.json but no weights ({' or '.join(_HF_WEIGHT_FILES[::2])}); "
        "save the model with save_pretrained again"
    )


def _hf_weights_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"shard {path} is missing")
        return _read_safetensors(path)
    return _tensors_only(load_checkpoint_file(path, map_location="cpu"), path)


def _hf_key_fixes(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Key names transformers writes that :mod:`~mimkit.checkpoints.convert` does not list.

    * transformers 5.x ``save_pretrained`` reverses its ``encoder.layer.`` -> ``layers.`` rename inside
      ``decoder_layers.`` too, writing ``decoder.decoder_encoder.layer.N``; it reads that back as
      ``decoder.decoder_layers.N``, and so does this.
    * ``ViTMAEModel`` directories have the encoder without its ``vit.`` prefix.
    """
    renamed = {
        key.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers.", 1): v for key, v in weights.items()
    }
    if all(key.startswith(("embeddings.", "encoder.layer.", "layers.", "layernorm.")) for key in renamed):
        renamed = {f"vit.{key}": value for key, value in renamed.items()}
    return renamed


def _hf_contents(directory: Path, overrides: Mapping[str, Any]) -> CheckpointContents:
    config_path = directory / HF_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} is a directory without {HF_CONFIG_NAME}; pass a checkpoint file, or a HuggingFace "
            "save_pretrained directory (config.json + model.safetensors)"
        )
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("model_type", "vit_mae") != "vit_mae":
        kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{config_path} describes a {kind!r} model, not a ViTMAE ('vit_mae') one")
    transformers = import_transformers()
    try:
        hf_config = transformers.ViTMAEConfig.from_pretrained(str(directory))
        args = args_from_hf_config(hf_config)
    except (OSError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    run_config = None
    extra_path = directory / MIMKIT_EXTRA_NAME
    if extra_path.is_file():
        try:
            extra = json.loads(extra_path.read_text())
        except ValueError as err:
            raise CheckpointError(f"{extra_path} is not valid JSON ({err})") from None
        saved = extra.get("model_args") if isinstance(extra, dict) else None
        saved = _stored_args(saved, extra_path) if isinstance(saved, dict) else None
        if isinstance(saved, dict) and all(saved.get(key) == args.get(key) for key in _HF_CONFIG_KEYS):
            args = dict(saved)  # keeps the name, decoder preset, loss and mask type
            run_config = extra.get("config")
        else:
            warnings.warn(f"{extra_path} does not match {config_path}; using {HF_CONFIG_NAME}", stacklevel=4)
    return CheckpointContents(
        path=directory,
        args={**args, **overrides},
        args_source=HF_CONFIG_NAME,
        run_config=run_config,
        run_config_path=extra_path,
        run_config_required=False,
        full=False,
        read_weights=lambda: _hf_key_fixes(_hf_weights(directory)),
    )


def read_checkpoint(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> CheckpointContents:
    """Read what a checkpoint tells about its model (arguments, run config, weights) without building it.

    Accepts the files and directories of the module docstring; :func:`mimkit.build.load_checkpoint` builds
    the model, :func:`load_encoder` its encoder alone. Nothing stored in the file is executed
    (``weights_only``).

    Args:
        path: checkpoint file or HuggingFace directory.
        overrides: :func:`~mimkit.models.registry.model_args` arguments the file does not tell, e.g.
            ``{"num_heads": 3}`` for a bare state dict whose width is not in the registry.

    Raises:
        CheckpointError: missing, truncated or unrecognized checkpoint; the message names the path.
        OptionalDependencyError: a HuggingFace directory or ``.safetensors`` file without transformers/safetensors.
    """
    path = Path(path)
    overrides = dict(overrides or {})
    if path.is_dir():
        return _hf_contents(path, overrides)
    state = _read_file(path)
    if isinstance(state.get("model"), Mapping) and ("model_args" in state or "config" in state):
        if overrides:
            raise CheckpointError(f"{path} describes its model fully; overrides {sorted(overrides)} are not used")
        return _mimkit_contents(state, path)
    args_hint = _mae_args_hint(state.get("args")) if isinstance(state.get("model"), Mapping) else {}
    return _weights_contents(_tensors_only(unwrap_checkpoint(state), path), path, overrides, args_hint)


def load_encoder(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[VisionTransformer | ConvViT, dict[str, Any], Any]:
    """The encoder of any checkpoint :func:`read_checkpoint` reads, with its weights; decoder and target are
    neither built nor loaded (a teacher needs the encoder only).

    Args:
        path: checkpoint file or HuggingFace directory.
        map_location: device the returned encoder is placed on.

    Returns:
        ``(encoder, args, run_config)``: the encoder in eval mode, the model's
        :func:`~mimkit.models.registry.model_args` (with ``name``) and its run config as saved, or None.

    Raises:
        CheckpointError: as :func:`read_checkpoint`, a checkpoint that only a run config describes (load it
            with :func:`mimkit.build.load_checkpoint`), or encoder weights that do not fit.
    """
    contents = read_checkpoint(path)
    if contents.args is None:
        raise CheckpointError(
            f"{contents.path} has no model_args, only a run config: load it with mimkit.build.load_checkpoint"
        )
    args = dict(contents.args)
    name = args.pop("name", "vit_base")
    try:
        encoder = create_encoder(name, **args)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{contents.path}: cannot build the encoder from its {contents.args_source} ({err})"
        ) from None
    weights = contents.read_weights()
    expected = encoder.state_dict()
    if not {f"encoder.{key}" for key in expected} <= set(weights):
        try:
            weights = to_mimkit(weights)
        except ValueError as err:
            raise CheckpointError(f"{contents.path}: {err}") from None
    encoder_weights = {
        key.removeprefix("encoder."): value for key, value in weights.items() if key.startswith("encoder.")
    }
    if problems := fit_problems(expected, encoder_weights):
        raise CheckpointError(f"{contents.path}: the encoder's weights do not fit its {name} encoder ({problems})")
    encoder.load_state_dict(encoder_weights, strict=True)
    return encoder.to(map_location).eval(), {"name": name, **args}, contents.run_config


def _replaceable_directory(out: Path) -> None:
    """Refuse to replace a file, or a directory holding anything but a previous export."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a directory; the hf layout writes a directory")
    if out.is_dir():
        foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in _HF_WRITTEN_FILES or entry.is_dir())
        if foreign:
            raise FileExistsError(
                f"{out} exists and holds {', '.join(foreign[:5])}, which an export would delete; choose a new "
                "output directory or empty it"
            )


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out``; a previous ``out`` is restored if that fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old)  # renaming over the empty mkdtemp directory
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir_files(directory: Path) -> None:
    for entry in directory.iterdir():
        with open(entry, "rb") as handle:
            os.fsync(handle.fileno())


def _save_hf_directory(weights: dict[str, Tensor], args: Mapping[str, Any], extra: dict[str, Any], out: Path) -> Path:
    safetensors_torch = _import_safetensors()
    hf_config = hf_config_from_args(args)  # refuses what ViTMAE cannot express, before touching the disk
    hf_config.architectures = ["ViTMAEForPreTraining"]
    tensors = {key: value.contiguous() for key, value in from_mimkit(weights, HF_FILE_LAYOUT).items()}
    _replaceable_directory(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 directories; give the usual permissions
        hf_config.save_pretrained(str(tmp))
        safetensors_torch.save_file(tensors, str(tmp / HF_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / MIMKIT_EXTRA_NAME).write_text(json.dumps(extra, indent=2))
        _fsync_dir_files(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_checkpoint_as(model: MaskedImageModel, out: str | Path, layout: str) -> Path:
    """Save a model's weights in a layout other tools read; every write is atomic.

    * ``"mimkit"``: a torch file ``{"model": state_dict, "model_args": model.config}``, plus ``"config"``
      (the run config as a dict) when ``model.run_config`` is set.
    * ``"mae"``: the same with ``"model"`` in facebookresearch/mae's key names, which its code reads as
      ``checkpoint["model"]`` (fine-tuning, ``--resume``).
    * ``"hf"``: a ``save_pretrained`` directory (``config.json``, ``model.safetensors`` and mimkit's
      ``mimkit.json``) that ``transformers.ViTMAEForPreTraining.from_pretrained(out)`` loads with no
      missing or unexpected keys. It is written beside ``out`` and renamed into place; a previous export
      at ``out`` is replaced, any other existing directory is refused.

    Args:
        model: a model from :func:`mimkit.build.create_model` or :func:`mimkit.build.load_checkpoint`.
        out: the file (mimkit, mae) or directory (hf).
        layout: one of :data:`SAVE_LAYOUTS`.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: unknown layout, a model without ``config``, or (hf) settings ViTMAE cannot express.
        FileExistsError: ``out`` is of the wrong kind (a directory for a file layout, or a directory
            holding other files for hf).
    """
    if layout not in SAVE_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {SAVE_LAYOUTS}")
    if not model.config:
        raise ValueError("the model has no config (its constructor arguments); build it with create_model")
    out = Path(out)
    weights = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    extra: dict[str, Any] = {"model_args": dict(model.config)}
    run_config = model.run_config
    if run_config is not None:
        extra["config"] = run_config.to_dict()
    if layout == "hf":
        return _save_hf_directory(weights, model.config, extra, out)
    if out.is_dir():
        raise FileExistsError(f"{out} is a directory; the {layout} layout writes a single file")
    state = {"model": weights if layout == "mimkit" else from_mimkit(weights, "mae"), **extra}
    save_checkpoint(out, state)
    return out
