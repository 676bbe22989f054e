"""The optimizer step every training task shares: :class:`TrainLoop`.

A task keeps its data order, its loss and its evaluation; the loop owns what lies around each step: the
learning rate of every parameter group from a schedule (times the group's ``lr_scale`` where it has one),
the check that the loss is a number (:class:`~mimkit.engine.divergence.TrainingDiverged` naming the task,
the step and the key to lower; agreed by every rank under ``torchrun``), zero_grad, backward, gradient
clipping, the optimizer step, the progress bar, a logging window whose means go to a
:class:`~mimkit.engine.logging.MetricsLogger`, periodic saves and the stop signals (SIGTERM/SIGINT finish
the step, ``save``, then raise :class:`~mimkit.engine.run_guard.TrainingInterrupted`).

One step, in this order::

    lr = schedule(step); group["lr"] = lr * group.get("lr_scale", 1)   # every group
    loss, terms = compute()                                             # the task's forward
    non-finite loss (on any rank) -> TrainingDiverged
    zero_grad; loss.backward(); clip_grad_norm_(params, clip_grad); optimizer.step()
    on_update(loss)                                                     # e.g. an EMA, a loss sum
    step += 1; on_step(step); window += loss and terms; bar
    a log step: metrics.log(step, window means, lr, on_log's extras)
    step < total: a stop signal -> save(), raise; else a save step -> save()

A task that runs forward and backward itself (gradient accumulation, autocast) hands the loop ``update``
instead of ``compute`` (:meth:`TrainLoop.run_update`): the loop sets the lr, calls it, then clips, steps and
zeroes the gradients. With ``defer_check`` the loss is not read back every step: a flag on the device
collects non-finite losses and is checked at each log step and before every save, so no checkpoint holds
weights a non-finite loss touched (the pretraining loop, where a host sync per step costs throughput).
The window's sums stay on the device too; they are read at log steps and saves only.

The loop draws no random number: a task that moves onto it keeps its sequence of draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimkit.engine import distributed
from mimkit.engine.divergence import TrainingDiverged
from mimkit.engine.run_guard import StopSignals

Computed = Tensor | tuple[Tensor, dict[str, Tensor]]  # the loss, or the loss and its named terms


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's lr: ``lr`` times the group's ``lr_scale`` (``lr`` itself without one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def clip_and_step(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], clip_grad: float | None) -> None:
    """The update from the gradients in place: their norm over ``params`` (in this order) clipped to
    ``clip_grad`` when given, then the optimizer's step."""
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()


def _split(computed: Computed) -> tuple[Tensor, dict[str, Tensor]]:
    return computed if isinstance(computed, tuple) else (computed, {})


class Logs(Protocol):
    """What the loop logs to (a :class:`~mimkit.engine.logging.MetricsLogger` or ``NullLogger``)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...


class TrainLoop:
    """The steps of one training run from ``step`` to ``total_steps``; use as a context manager (it installs
    the stop-signal handlers and closes the bar on exit).

    Args:
        optimizer: its parameter groups get ``schedule(step) * group["lr_scale"]`` (``lr_scale`` 1 when absent).
        schedule: ``step -> lr``.
        total_steps: the run's last step; neither a stop signal nor a periodic save acts after it.
        task: names the task in the bar and in the divergence message (e.g. ``"detection"``).
        lower: what the divergence message says to lower (e.g. ``"train.lr or set train.clip_grad"``).
        context: added to the divergence message after the loss (e.g. ``" with peak lr 0.001"``).
        params: what ``clip_grad`` clips, in this order (clipping's norm sums in it); default the optimizer's.
        clip_grad: the largest gradient norm, or None.
        step: the step the run starts at (a resumed run's).
        progress: show a tqdm bar over the steps.
        metrics: receives every log step's record; None logs nothing.
        log_every_steps: log every this many steps and at the last one (unless ``log_at`` is given).
        log_at: ``step -> bool``, the log steps (after the step counter moved on).
        prefix: of the logged keys (``"train/"``: ``train/loss``, ``train/lr``, ``train/<term>``).
        on_update: called with the detached loss after each optimizer step, while :attr:`step` is still
            the step just taken (an EMA update, a loss sum the task keeps).
        on_step: called with the new :attr:`step` once the counter has moved, before the window is logged
            (pictures or measurements of the updated weights).
        on_log: ``(step, means) -> extra metrics`` at each log step, after the window's means are taken.
        save: writes the run's state after :attr:`step`; returns where (None: nothing written).
        save_every_steps: call ``save`` after every this many steps (not after the last).
        save_on_log: call ``save`` after each log step (not after the last).
        save_at: ``step -> bool``, further steps to call ``save`` after (not after the last).
        defer_check: check the loss for NaN/inf at log steps and before saves instead of every step (see
            above); the message then names the steps between two checks and ``checkpoint_dir``.
        checkpoint_dir: where the task's checkpoints are, for the deferred check's message.
        device: where the loss lives (the all-reduces under ``torchrun`` run there).
        ranks_agree: the stop and divergence decisions and the logged means are agreed by every rank (one
            all-reduce each); False where one process trains alone under ``torchrun`` (e.g. rank 0's probe).
            Default: whether this process is one of several.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Callable[[int], float],
        *,
        total_steps: int,
        task: str,
        lower: str,
        context: str = "",
        params: Iterable[Tensor] | None = None,
        clip_grad: float | None = None,
        step: int = 0,
        progress: bool = False,
        metrics: Logs | None = None,
        log_every_steps: int = 1,
        log_at: Callable[[int], bool] | None = None,
        prefix: str = "train/",
        on_update: Callable[[Tensor], object] | None = None,
        on_step: Callable[[int], object] | None = None,
        on_log: Callable[[int, dict[str, float]], dict[str, Any]] | None = None,
        save: Callable[[], Path | None] | None = None,
        save_every_steps: int | None = None,
        save_on_log: bool = False,
        save_at: Callable[[int], bool] | None = None,
        defer_check: bool = False,
        checkpoint_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        ranks_agree: bool | None = None,
    ) -> None:
        if log_every_steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {log_every_steps}")
        self.optimizer = optimizer
        self.schedule = schedule
        self.total_steps = total_steps
        self.task, self.lower, self.context = task, lower, context
        if params is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        self.params = list(params)
        self.clip_grad = clip_grad
        self.step = step
        self.progress = progress
        self.metrics = metrics
        self.log_every_steps = log_every_steps
        self.log_at = log_at
        self.prefix = prefix
        self.on_update, self.on_step, self.on_log = on_update, on_step, on_log
        self.save, self.save_every_steps, self.save_on_log = save, save_every_steps, save_on_log
        self.save_at = save_at
        self.defer_check, self.checkpoint_dir = defer_check, checkpoint_dir
        self.device = torch.device(device)
        self.ranks_agree = distributed.place().distributed if ranks_agree is None else ranks_agree
        self.lr = schedule(step)
        self.window: dict[str, Tensor] = {}  # float64 sums on the device of each logged value since the last log
        self.window_steps = 0
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # since the last deferred check
        self.checked_step = step  # the step of the last deferred check
        self.last: dict[str, float] = {}  # the means of the last logging window
        self.logged = False  # whether the step just taken was a log step
        self.signals = StopSignals()
        self.bar: Any = None

    # --- lifetime -------------------------------------------------------------------------------------

    def __enter__(self) -> TrainLoop:
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.task,
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.signals.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.signals.restore()
        if self.bar is not None:
            self.bar.close()

    @property
    def done(self) -> bool:
        """Whether the run has taken its last step."""
        return self.step >= self.total_steps

    # --- what a resume needs --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The logging window in progress and the last one's means (the step is the task's to save)."""
        sums = torch.stack(list(self.window.values())).tolist() if self.window else []
        window = dict(zip(self.window, sums, strict=True))
        return {"window": window, "window_steps": self.window_steps, "last": dict(self.last)}

    def agreed_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with the window's sums averaged over the ranks when they agree, so that every
        rank resumes with it and the next logged mean is the one a run never stopped logs. Every rank must
        call it."""
        state = self.state_dict()
        if self.ranks_agree and self.window:
            sums = torch.stack(list(self.window.values()))
            world = distributed.place().world_size
            averaged = (value / world for value in distributed.all_reduce(sums).tolist())
            state["window"] = dict(zip(self.window, averaged, strict=True))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the windows :meth:`state_dict` saved."""
        self.window = {
            key: torch.tensor(float(value), dtype=torch.float64, device=self.device)
            for key, value in state.get("window", {}).items()
        }
        self.window_steps = int(state.get("window_steps", 0))
        self.last = {key: float(value) for key, value in state.get("last", {}).items()}

    # --- the step -------------------------------------------------------------------------------------

    def set_lr(self) -> float:
        """Set every group's lr for :attr:`step` from the schedule; returns the schedule's value."""
        lr = self.schedule(self.step)
        set_group_lrs(self.optimizer, lr)
        self.lr = lr
        return lr

    def run_step(self, compute: Callable[[], Computed]) -> Tensor:
        """One step: the lr, ``compute()`` (the loss, or the loss and its named terms), the divergence check,
        backward, clipping, the optimizer step, the window, the log, a save, the stop signal.

        Returns:
            The step's loss, detached.

        Raises:
            TrainingDiverged: the loss is not finite (on any rank); nothing was updated.
            TrainingInterrupted: a stop signal arrived; ``save`` wrote the state after this step.
        """
        self.set_lr()
        loss, terms = _split(compute())
        if not self.defer_check:
            self.check(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(self.optimizer, self.params, self.clip_grad)
        return self._finish(loss, terms)

    def run_update(self, update: Callable[[], Computed]) -> Tensor:
        """One step whose forward and backward the task runs itself: the lr, ``update()`` (it calls backward
        and returns the loss, or the loss and its named terms), the divergence check, clipping, the optimizer
        step, zero_grad (no gradient is held past the step), then what :meth:`run_step` does after its step.

        Returns:
            The step's loss, detached.

        Raises:
            TrainingDiverged: the loss is not finite (on any rank); without ``defer_check`` the optimizer has
                not stepped.
            TrainingInterrupted: a stop signal arrived; ``save`` wrote the state after this step.
        """
        self.set_lr()
        loss, terms = _split(update())
        if not self.defer_check:
            self.check(loss)
        clip_and_step(self.optimizer, self.params, self.clip_grad)
        self.optimizer.zero_grad(set_to_none=True)
        return self._finish(loss, terms)

    def _finish(self, loss: Tensor, terms: dict[str, Tensor]) -> Tensor:
        """After the optimizer step: ``on_update``, the step counter, ``on_step``, the window, the log, a save
        and the stop signal."""
        loss = loss.detach()
        if self.defer_check:
            self.nonfinite |= ~torch.isfinite(loss)
        if self.on_update is not None:
            self.on_update(loss)
        self.step += 1
        if self.on_step is not None:
            self.on_step(self.step)
        self.record({"loss": loss, **{key: value.detach() for key, value in terms.items()}})
        self.end_step()
        return loss

    def check(self, loss: Tensor) -> None:
        """Raise :class:`TrainingDiverged` when ``loss`` is NaN or infinite (on any rank, when they agree)."""
        bad = ~torch.isfinite(loss.detach())
        diverged = distributed.any_rank(bad, self.device) if self.ranks_agree else bool(bad)
        if diverged:
            raise TrainingDiverged(
                f"{self.task} diverged at step {self.step} (loss {loss.item()}){self.context}; lower {self.lower}"
            )

    def check_deferred(self) -> None:
        """With ``defer_check``: raise :class:`TrainingDiverged` when a loss since the last check was NaN or
        infinite (on any rank, when they agree). Every rank must call it at the same steps; a second call at the
        same step (a log step that is also a save step) has nothing new to check."""
        if not self.defer_check or self.checked_step == self.step:
            return
        bad = distributed.any_rank(self.nonfinite, self.device) if self.ranks_agree else bool(self.nonfinite)
        since, self.checked_step = self.checked_step, self.step
        if bad:
            kept = f" in {self.checkpoint_dir}" if self.checkpoint_dir is not None else ""
            raise TrainingDiverged(
                f"{self.task}: loss became NaN/inf between steps {since} and {self.step}; training stopped and the "
                f"last good checkpoint{kept} was kept. Lower {self.lower}, or check the data."
            )

    def checkpoint(self) -> Path | None:
        """``save()`` after the deferred check (a checkpoint never holds weights a non-finite loss touched);
        where it wrote, or None without ``save``. Every rank must call it."""
        self.check_deferred()
        return self.save() if self.save is not None else None

    def record(self, values: dict[str, Tensor]) -> None:
        """Add the step's values to the window, move the bar, and log the window's means at a log step."""
        for key, value in values.items():
            value = value.to(self.device, torch.float64)
            self.window[key] = self.window[key] + value if key in self.window else value
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)
        self.logged = self.is_log_step()
        if not self.logged:
            return
        self.check_deferred()
        sums = torch.stack(list(self.window.values())) / self.window_steps
        if self.ranks_agree:
            sums = distributed.all_reduce(sums) / distributed.place().world_size
        means = dict(zip(self.window, sums.tolist(), strict=True))
        self.last, self.window, self.window_steps = means, {}, 0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{self.lr:.2e}")
        extra = self.on_log(self.step, means) if self.on_log is not None else {}
        if self.metrics is not None:
            record = {f"{self.prefix}{key}": value for key, value in means.items()}
            self.metrics.log(self.step, {**record, f"{self.prefix}lr": self.lr, **extra})

    def is_log_step(self) -> bool:
        """Whether the step just taken is a log step."""
        if self.log_at is not None:
            return self.log_at(self.step)
        return self.step % self.log_every_steps == 0 or self.step == self.total_steps

    def end_step(self) -> None:
        """Before the last step: a stop signal saves and raises; otherwise a save step saves. Every rank
        must call it after every step (the stop decision is one all-reduce)."""
        if self.done:
            return
        stop = self.signals.agreed(self.device) if self.ranks_agree else self.signals.requested
        if stop:
            raise self.signals.interrupted(self.step, self.checkpoint())
        periodic = bool(self.save_every_steps and self.step % self.save_every_steps == 0)
        chosen = self.save_at is not None and self.save_at(self.step)
        if self.save is not None and (periodic or chosen or (self.save_on_log and self.logged)):
            self.checkpoint()
