"""The one config loader of every command: nested dataclass configuration <-> YAML, with dotted command-line
overrides.

Unknown keys and values of the wrong type are errors that name the key, raised before any compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (YAML-friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {annotation}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # YAML 1.1 reads "1e-3" as a str
            with contextlib.suppress(ValueError, OverflowError):  # not a number, or an int beyond float range
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # NaN or inf would only surface as a NaN loss, hours later
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {annotation}")


def nearest_key(name: str, names: typing.Iterable[str]) -> list[str]:
    """The valid key closest to a misspelt ``name`` (``epochz`` -> ``[epochs]``), or ``[]`` when none is close."""
    return difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types name the key.

    A schema may list keys it no longer has in a class attribute ``MOVED_KEYS`` (old name -> new dotted name
    under the same section); such a key is refused with its new name, and so is one that names a section now
    (``teacher`` -> ``teacher.spec``) when it holds a value instead of a mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    moved: dict[str, str] = getattr(cls, "MOVED_KEYS", {})  # keys of older configs -> where they live now
    old = [
        key
        for key in sorted(data)
        if key in moved
        and (key not in names or (dataclasses.is_dataclass(hints[key]) and not isinstance(data[key], dict)))
    ]
    if old:
        raise ConfigError(
            "; ".join(f"{prefix}{key} moved to {prefix}{moved[key]}" for key in old)
            + " (rename the key in the recipe or override)"
        )
    if unknown:
        where = f"section {prefix.rstrip('.')}" if prefix else "the config"
        # a misspelt moved key is pointed to its new place
        guesses = {k: moved.get(near[0], near[0]) for k in unknown if (near := nearest_key(k, names | set(moved)))}
        if len(unknown) == 1 and guesses:
            guess = f"; did you mean {prefix}{guesses[unknown[0]]}?"
        else:
            guess = "".join(f"; {prefix}{k}: did you mean {prefix}{near}?" for k, near in guesses.items())
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}{guess}; valid: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key + ".")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{dotted}: cannot parse value {raw!r}: {err}") from None
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


SchemaT = typing.TypeVar("SchemaT")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, schema: type[SchemaT]
) -> SchemaT:
    """The one config loader of every command: a YAML recipe (or the schema's defaults), then dotted
    ``key=value`` overrides, built into ``schema`` and validated.

    Args:
        path: the YAML recipe, or None for the defaults.
        overrides: ``section.key=value`` strings, values parsed as YAML, applied in order.
        schema: the command's config dataclass (:class:`~mimkit.config.Config` for pretraining, the default of
            :func:`mimkit.config.load_config`; fine-tuning, detection, segmentation and the tokenizer have their
            own), with a ``validate()`` that returns it.

    Raises:
        ConfigError: invalid YAML, unknown key (with the nearest valid one), wrong type or inconsistent values.
        FileNotFoundError: the YAML file does not exist.
    """
    data = read_yaml_mapping(path, "config file") if path is not None else {}
    apply_overrides(data, overrides or [])
    return from_dict(schema, data).validate()  # type: ignore[no-any-return]


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML recipe file holds (empty for an empty file).

    Raises:
        FileNotFoundError: no such file (the message names ``what``).
        ConfigError: invalid YAML, or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded or {}
