"""What a training task saves to continue exactly where it stopped.

A task names the objects that change as it trains (modules, optimizers, an EMA: anything with
``state_dict``/``load_state_dict``), its own ``torch.Generator`` streams and the settings it ran with.
:class:`ResumableState` writes them atomically with the global RNG state (Python, NumPy, torch, CUDA),
the step and the task's own counters, and puts them back on resume after checking that the settings
are the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mimkit.engine.rng import rng_state, set_rng_state
from mimkit.files import load_checkpoint_file, save_checkpoint


class HasState(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class SettingsChanged(ValueError):
    """A resume with settings other than those of the run it continues."""


@dataclass
class ResumableState:
    """The state of one training run, saved as one file.

    Args:
        parts: name -> object with ``state_dict()`` and ``load_state_dict()`` (module, optimizer, EMA).
        generators: name -> a ``torch.Generator`` the task draws from (any device).
        settings: what must not change between a run and its resume (plain values: the recipe, the
            inputs); a resume with other values is refused naming each differing key.
    """

    parts: dict[str, HasState]
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def state_dict(self, step: int, progress: dict[str, Any]) -> dict[str, Any]:
        """Everything to continue after ``step``; ``progress`` holds the task's own counters (plain values
        and tensors)."""
        return {
            "step": step,
            "progress": progress,
            "settings": self.settings,
            "rng": rng_state(),
            "generators": {name: generator.get_state() for name, generator in self.generators.items()},
            "parts": {name: part.state_dict() for name, part in self.parts.items()},
        }

    def save(self, path: str | Path, step: int, progress: dict[str, Any]) -> Path:
        """Write :meth:`state_dict` to ``path`` atomically (a full disk leaves the previous file whole)."""
        save_checkpoint(path, self.state_dict(step, progress))
        return Path(path)

    def load_state_dict(
        self, state: dict[str, Any], source: str | Path = "the checkpoint"
    ) -> tuple[int, dict[str, Any]]:
        """Put a saved state back; returns its step and the task's counters.

        Raises:
            SettingsChanged: ``state`` was saved with other settings (each differing key is named).
        """
        self.check_settings(state, source)
        for name, part in self.parts.items():
            part.load_state_dict(state["parts"][name])
        for name, generator in self.generators.items():
            generator.set_state(state["generators"][name])
        set_rng_state(state["rng"])
        return int(state["step"]), state["progress"]

    def check_settings(self, state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
        """Refuse ``state`` when it was saved with other settings (before a task spends time on it).

        Raises:
            SettingsChanged: naming each differing key, its saved value and its value now.
        """
        saved = _flat(state["settings"])
        changed = sorted(
            f"{key}: {saved.get(key)!r} there, {value!r} now"
            for key, value in _flat(self.settings).items()
            if saved.get(key) != value
        )
        if changed:
            raise SettingsChanged(
                f"{source} continues a run with other settings ({'; '.join(changed)}); "
                "resume with the same settings, or start again without --resume"
            )


def read_resume_file(path: str | Path) -> dict[str, Any]:
    """The state a stopped run left at ``path``, for ``--resume`` (generator and RNG states stay on the CPU).

    Raises:
        FileNotFoundError: there is none; the message says that a finished run removes it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--resume: no {path} to continue (a stopped run leaves it, a finished one removes it); "
            "run without --resume to start"
        )
    return load_checkpoint_file(path)


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, so that a difference is named by its full key."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
