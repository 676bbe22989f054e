"""MAE's linear probe: a BatchNorm-then-linear head trained with LARS on cached frozen features.

Features are extracted once (no augmentation, as in MAE's ``main_linprobe.py`` the encoder is frozen and
only the head learns), so every epoch is a pass over an (N, D) tensor rather than over images. SIGTERM or
Ctrl-C stop the probe after a step; given a ``state_path`` it saves its state there first and continues
from it (``resume_state``) to the head a run never stopped ends with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimkit.engine.loop import TrainLoop
from mimkit.engine.resumable import ResumableState
from mimkit.engine.schedule import effective_lr, warmup_cosine
from mimkit.eval.report import classification_metrics
from mimkit.models.probe_head import LinearProbe

OPTIMIZERS = ("lars", "sgd")


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's ``util/lars.py``: SGD with momentum whose step for each matrix is rescaled by
    ``trust_coefficient * ||w|| / ||g + weight_decay * w||``.

    1-D parameters (biases, norm scales) get neither weight decay nor the trust ratio, only momentum SGD.
    Per parameter and step::

        d = g + weight_decay * w;  d *= trust_coefficient * ||w|| / ||d||   (p.ndim > 1, both norms > 0)
        mu = momentum * mu + d;    w -= lr * mu

    Args:
        params: parameters or parameter groups.
        lr: learning rate (usually set every step by the schedule).
        weight_decay: L2 penalty added to the gradient of matrices.
        momentum: heavy-ball momentum (MAE: 0.9).
        trust_coefficient: scale of the layer-wise trust ratio (MAE: 0.001).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1 and trust_coefficient > 0; got lr={lr}, "
                f"weight_decay={weight_decay}, momentum={momentum}, trust_coefficient={trust_coefficient}"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:  # not a bias or a norm scale
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        one,
                    )
                    update = update.mul(trust)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                param.add_(mu, alpha=-group["lr"])
        return loss


def _batch_loss(probe: nn.Module, features: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(probe(features), labels)


@dataclass
class LinearProbeResult:
    """What :func:`train_linear_probe` measured on the test features.

    Attributes:
        top1: top-1 accuracy in [0, 1].
        top5: top-5 accuracy in [0, 1], None with fewer than 5 classes.
        per_class_accuracy: (num_classes,) recall of each class (NaN for a class absent from the test set).
        confusion: (num_classes, num_classes) int64 counts, rows = true class, columns = prediction.
        head: the trained :class:`LinearProbe`, in eval mode, on the CPU.
        losses: mean training loss of every epoch.
        lr: the peak learning rate used (``blr * batch_size / 256`` unless given).
    """

    top1: float
    top5: float | None
    per_class_accuracy: Tensor
    confusion: Tensor
    head: LinearProbe
    losses: list[float] = field(default_factory=list)
    lr: float = 0.0


def _check_features(features: Tensor, labels: Tensor, name: str, num_classes: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} features must be (N, D), got {tuple(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"{name} labels must be ({features.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(
            f"{name} labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: Tensor,
    batch_size: int = 4096,
    *,
    transform: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
    desc: str = "predict",
) -> Tensor:
    """Outputs (N, num_classes) on the CPU of a model in eval mode, batch by batch (training flag restored).

    Args:
        model: a head on features, or a whole classifier on images.
        inputs: (N, ...) features or images, kept where they are; each batch moves to the model's device.
        batch_size: inputs per forward pass.
        transform: applied to each batch on the device first (e.g. uint8 images -> normalized floats).
        progress: show a tqdm bar.
        desc: the bar's label.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        starts = range(0, len(inputs), batch_size)
        outputs = []
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            batch = inputs[start : start + batch_size].to(device)
            outputs.append(model(transform(batch) if transform is not None else batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs)  # (N, num_classes)


def train_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float | None = None,
    blr: float = 0.1,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    warmup_epochs: int = 10,
    min_lr: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    state_path: str | Path | None = None,
    resume_state: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    keep: dict[str, Any] | None = None,
) -> LinearProbeResult:
    """Train MAE's linear probe on frozen features and measure it on the test features.

    Each epoch visits the training features in a fresh seeded order, in ``N // batch_size`` full batches
    (MAE's ``drop_last``; one batch of all N when N < batch_size). The learning rate warms up linearly for
    ``warmup_epochs`` then follows a half-cosine, updated every step; the loss is cross-entropy.

    MAE's probe (LARS, ``blr=0.1``) assumes ImageNet at batch 16384: lr 6.4 over ~7,000 steps. LARS
    moves each weight matrix by about ``lr * 0.001`` of its norm per step, so with small data or batches
    (a few hundred steps at lr 0.1) its head underfits; hence the default here is momentum SGD at the same
    ``blr``, and ``optimizer="lars"`` (with a larger ``blr``, e.g. 5) reproduces MAE's recipe.

    Args:
        train_features: (N, D) features, e.g. from :func:`~mimkit.eval.knn.extract_features`.
        train_labels: (N,) integer labels in [0, num_classes).
        test_features: (M, D).
        test_labels: (M,).
        num_classes: number of classes.
        epochs: passes over the training features (MAE: 90).
        batch_size: features per step (MAE: 16384 over 8 GPUs on ImageNet; 256 suits small sets).
        lr: absolute peak learning rate; default ``blr * batch_size / 256``.
        blr: base learning rate (MAE's linear probe: 0.1).
        weight_decay: applied to the weight matrix only (MAE: 0).
        optimizer: ``"sgd"`` (momentum 0.9) or ``"lars"`` (MAE's; same decay rule).
        warmup_epochs: linear warmup length in epochs (MAE: 10), clipped to ``epochs``.
        min_lr: learning rate at the end of the cosine.
        seed: seeds the head's initialisation and the shuffling.
        device: where to train.
        progress: show a tqdm bar over the steps.
        state_path: where a stop signal saves the probe's state (head, optimizer, shuffling generator,
            RNG, step, position in the epoch, losses) before it ends the run; None saves nothing.
        resume_state: such a state, loaded: training continues after its step and ends with the head
            and losses of a run never stopped.
        settings: what a resume must share with the run it continues (checked against ``resume_state``).
        keep: the caller's own values saved with the state, under ``progress["keep"]``.

    Returns:
        A :class:`LinearProbeResult`.

    Raises:
        ValueError: mismatched shapes, labels out of range, or bad hyperparameters.
        TrainingInterrupted: SIGTERM or SIGINT stopped it after a step (the message says what was saved).
        SettingsChanged: ``resume_state`` was saved with other settings.
    """
    _check_features(train_features, train_labels, "train", num_classes)
    _check_features(test_features, test_labels, "test", num_classes)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dims, test features {test_features.shape[1]}")
    if train_features.shape[0] < 2 or test_features.shape[0] == 0:
        raise ValueError(
            f"a linear probe needs at least 2 training and 1 test feature, got {train_features.shape[0]} and "
            f"{test_features.shape[0]}"
        )
    if epochs <= 0 or batch_size <= 1 or warmup_epochs < 0:
        raise ValueError(
            f"need epochs > 0, batch_size > 1 (BatchNorm) and warmup_epochs >= 0; got {epochs}, {batch_size}, "
            f"{warmup_epochs}"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(train_features.shape[1], num_classes).to(device)
    peak_lr = effective_lr(blr, batch_size, lr)
    decayed, plain = [probe.head.weight], [probe.head.bias]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    opt: torch.optim.Optimizer
    if optimizer == "lars":
        opt = LARS(groups, lr=peak_lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=peak_lr, momentum=0.9)

    features = train_features.float().to(device)  # (N, D)
    labels = train_labels.long().to(device)  # (N,)
    num_train = features.shape[0]
    batch = min(batch_size, num_train)
    steps_per_epoch = num_train // batch
    total_steps, warmup_steps = epochs * steps_per_epoch, min(warmup_epochs, epochs) * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    probe.train()
    step, first_epoch, first_index = 0, 0, 0
    epoch_loss = torch.zeros((), device=device)
    state = ResumableState({"probe": probe, "optimizer": opt}, settings=settings or {})
    if resume_state is not None:
        step, saved = state.load_state_dict(resume_state, source=state_path or "the resumed state")
        first_epoch, first_index, losses = saved["epoch"], saved["index"], list(saved["losses"])
        generator.set_state(saved["order"])  # as at the start of that epoch: it draws the same order again
        epoch_loss = saved["epoch_loss"].to(device)

    def save() -> Path | None:
        """The state after the step just taken (``index`` of ``epoch``), when there is a ``state_path``."""
        if state_path is None:
            return None
        counters = {
            "epoch": epoch,
            "index": index + 1,
            "order": order_state,
            "epoch_loss": epoch_loss.cpu(),
            "losses": losses,
            "keep": keep or {},
        }
        return state.save(state_path, loop.step, counters)

    schedule = partial(
        warmup_cosine, base_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=min_lr
    )
    loop = TrainLoop(
        opt,
        schedule,
        total_steps=total_steps,
        task="linear probe",
        lower="blr or lr",
        context=f" with peak lr {peak_lr:g}",
        step=step,
        progress=progress,
        on_update=lambda loss: epoch_loss.add_(loss),
        save=save,
        device=device,
        ranks_agree=False,  # one process trains the head (rank 0 under torchrun): no all-reduce
    )
    with loop:
        for epoch in range(first_epoch, epochs):
            order_state = generator.get_state()
            order = torch.randperm(num_train, generator=generator).to(device)  # (N,)
            if epoch > first_epoch or resume_state is None:
                epoch_loss = torch.zeros((), device=device)
            for index in range(first_index if epoch == first_epoch else 0, steps_per_epoch):
                rows = order[index * batch : (index + 1) * batch]  # (B,)
                loop.run_step(partial(_batch_loss, probe, features[rows], labels[rows]))
            losses.append(epoch_loss.item() / steps_per_epoch)

    probe = probe.cpu().eval()
    metrics = classification_metrics(predict(probe, test_features.float()), test_labels, num_classes)
    return LinearProbeResult(
        top1=metrics.top1,
        top5=metrics.top5,
        per_class_accuracy=metrics.per_class_accuracy,
        confusion=metrics.confusion,
        head=probe,
        losses=losses,
        lr=peak_lr,
    )
