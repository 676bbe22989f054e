"""The one error every training task raises when its loss stops being a number."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. Training stopped after the step that showed it; a checkpoint
    written before that step is left as it was. The message names the task, the step and what to lower."""
