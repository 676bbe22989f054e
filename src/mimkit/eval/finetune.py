"""Partial and full fine-tuning of a pretrained encoder on labelled images (MAE's protocols).

Full fine-tuning follows MAE's ``main_finetune.py``: AdamW with layer-wise learning-rate decay (BEiT),
drop path, label smoothing, optional mixup/cutmix (timm's), linear warmup then cosine, optional model
EMA (timm's). Partial fine-tuning trains only the last ``k`` blocks (and the final norm) plus the head,
the MAE paper's study of how much of the encoder must move (Fig. 9); ``k = 0`` trains the head alone on
frozen features, which is the linear probe with crop/flip augmentation.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.data.crops import CropDataset
from mimkit.engine.run_guard import holding_run_lock
from mimkit.eval.data import LabelledSplit
from mimkit.eval.linear import LinearProbe, predict
from mimkit.models.convvit import ConvViT
from mimkit.models.vit import VisionTransformer

log = logging.getLogger(__name__)

POOLS = ("avg", "cls")


@dataclass
class FinetuneConfig:
    """Fine-tuning recipe; ``mimkit finetune`` takes these keys as ``key=value`` overrides.

    Defaults follow MAE's fine-tuning recipe (AdamW betas (0.9, 0.999), weight decay 0.05, layer decay
    0.75, drop path 0.1, label smoothing 0.1, lr = blr * batch / 256, warmup then cosine) at a length
    and batch that suit a small data set on a CPU; mixup/cutmix are off unless their alphas are set.
    """

    epochs: int = 5
    batch_size: int = 128
    blr: float = 1e-3
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.999
    pool: str = "avg"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    num_workers: int = 2
    train_limit: int | None = None
    test_limit: int | None = None
    eval_batch_size: int = 256
    log_every_steps: int = 20
    seed: int = 0

    def validate(self) -> FinetuneConfig:
        """Raise :class:`~mimkit.config.ConfigError` naming the first bad key."""
        from mimkit.config import ConfigError

        checks = [
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.batch_size >= 2, "batch_size", "must be >= 2"),
            (self.blr > 0 or (self.lr or 0) > 0, "blr", "must be positive"),
            (self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0"),
            (0 < self.layer_decay <= 1, "layer_decay", "must lie in (0, 1]"),
            (0 <= self.drop_path < 1, "drop_path", "must lie in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "must lie in [0, 1)"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup", "mixup and cutmix alphas must be >= 0"),
            (
                not self.mixing or self.batch_size % 2 == 0,
                "batch_size",
                "must be even with mixup/cutmix (timm mixes a batch with its reverse)",
            ),
            (0 < self.ema_decay < 1, "ema_decay", "must lie in (0, 1)"),
            (self.pool in POOLS, "pool", f"must be one of {POOLS}"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale", "must be (low, high) in (0, 1]"),
            (self.train_limit is None or self.train_limit >= 2, "train_limit", "must be >= 2"),
            (self.test_limit is None or self.test_limit >= 1, "test_limit", "must be >= 1"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad", "must be positive (or null)"),
            (self.log_every_steps >= 1, "log_every_steps", "must be >= 1"),
            (self.num_workers >= 0, "num_workers", "must be >= 0"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")
        return self

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


class Classifier(nn.Module):
    """An encoder (ViT or ConvMAE's ConvViT) with a classification head, fully or partially trainable.

    Full fine-tuning (``trainable_blocks=None``): every encoder parameter learns; the head is MAE's
    ``fc_norm`` LayerNorm then a linear layer initialised with ``trunc_normal(std=2e-5)``.
    Partial (``trainable_blocks=k``): everything before the transformer blocks (the patch embedding and
    class token of a ViT; the convolution stages, embedding and fusion convolutions of a ConvViT) and
    the first ``depth - k`` blocks are frozen (no gradient, kept in eval mode, run under ``no_grad``);
    the last ``k`` blocks and the final norm learn (the norm only when ``k > 0``); the head is the linear
    probe's BatchNorm without affine then linear, so ``k = 0`` is exactly the linear probe's model.

    Args:
        encoder: the pretraining module's encoder: it has ``blocks``, ``norm``, ``embed_dim``,
            ``num_prefix_tokens`` and ``stem(images) -> tokens``; a ConvViT's fusion convolutions (which
            feed only its pretraining decoder) are frozen.
        num_classes: output classes.
        pool: ``"avg"`` (mean of patch tokens) or ``"cls"`` (class token; not for encoders without one),
            after the encoder's final norm.
        trainable_blocks: None for full fine-tuning, else k in [0, depth].
    """

    def __init__(
        self,
        encoder: VisionTransformer | ConvViT,
        num_classes: int,
        pool: str = "avg",
        trainable_blocks: int | None = None,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pool == "cls" and encoder.num_prefix_tokens == 0:
            raise ValueError(f"{type(encoder).__name__} has no class token; use pool='avg'")
        depth = len(encoder.blocks)
        if trainable_blocks is not None and not 0 <= trainable_blocks <= depth:
            raise ValueError(f"partial fine-tuning trains 0 to {depth} blocks of this encoder, got {trainable_blocks}")
        self.encoder = encoder
        self.pool = pool
        self.num_classes = num_classes
        self.trainable_blocks = trainable_blocks
        self.num_frozen_blocks = 0 if trainable_blocks is None else depth - trainable_blocks
        dim = int(encoder.embed_dim)
        self.head: nn.Module
        if trainable_blocks is None:
            linear = nn.Linear(dim, num_classes)
            nn.init.trunc_normal_(linear.weight, std=2e-5)
            nn.init.zeros_(linear.bias)
            self.head = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), linear)
        else:
            self.head = LinearProbe(dim, num_classes)
            encoder.requires_grad_(False)
            for module in self.trainable_modules():
                module.requires_grad_(True)
        if isinstance(encoder, ConvViT):  # the fusion feeds only the pretraining decoder: unused here
            for module in encoder.fusion_layers():
                module.requires_grad_(False)
        self.train(self.training)

    def trainable_modules(self) -> list[nn.Module]:
        """The encoder parts partial fine-tuning trains: the last k blocks and, when k > 0, the final norm
        (the whole encoder for full fine-tuning)."""
        if self.trainable_blocks is None:
            return [self.encoder]
        trained: list[nn.Module] = list(self.encoder.blocks[self.num_frozen_blocks :])
        if self.trainable_blocks > 0:
            trained.append(self.encoder.norm)
        return trained

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.trainable_blocks is not None:
            self.encoder.eval()  # frozen parts never drop paths
            for module in self.trainable_modules():
                module.train(mode)
        return self

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalized images -> (B, num_classes) logits."""
        encoder = self.encoder
        frozen = self.trainable_blocks is not None
        with torch.no_grad() if frozen else contextlib.nullcontext():
            x = encoder.stem(images)  # (B, P + L, D)
            for block in encoder.blocks[: self.num_frozen_blocks]:
                x, _ = block(x)
        for block in encoder.blocks[self.num_frozen_blocks :]:
            x, _ = block(x)
        prefix = encoder.num_prefix_tokens
        with torch.no_grad() if self.trainable_blocks == 0 else contextlib.nullcontext():
            x = encoder.norm(x)  # (B, P + L, D)
        features = x[:, 0] if self.pool == "cls" else x[:, prefix:].mean(dim=1)  # (B, D)
        return self.head(features)


def parameter_layers(encoder: nn.Module) -> dict[str, int]:
    """BEiT/MAE layer index of every encoder parameter name: ``i + 1`` for the parameters of
    ``encoder.blocks[i]``, ``depth + 1`` for the final norm, 0 for everything before the blocks (patch
    embedding, class and position embeddings; a ConvViT's convolution stages and fusion convolutions)."""
    num_layers = len(encoder.blocks) + 1  # type: ignore[arg-type]
    layer_of = {id(param): index + 1 for index, block in enumerate(encoder.blocks) for param in block.parameters()}  # type: ignore[arg-type, union-attr]
    layer_of.update({id(param): num_layers for param in encoder.norm.parameters()})  # type: ignore[union-attr]
    return {name: layer_of.get(id(param), 0) for name, param in encoder.named_parameters()}


def layer_decay_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, *, encoder: nn.Module | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (layer, decay), each group with its ``lr_scale``.

    As MAE's ``param_groups_lrd``: the group of layer ``i`` of ``num_layers = depth + 1`` (see
    :func:`parameter_layers`) gets ``lr_scale = layer_decay ** (num_layers - i)``, so the head learns at
    the full rate, block ``j`` at ``layer_decay ** (depth - j)`` of it and the embeddings (a ConvViT's
    convolution stages too) at ``layer_decay ** (depth + 1)``; biases, norms and tokens get no weight decay.

    Args:
        model: the whole trained model, e.g. a :class:`Classifier` or a detector.
        encoder: the pretrained encoder inside ``model`` (default ``model.encoder``); every other trainable
            parameter (heads, necks, stems, a decoder) learns at the full rate.
    """
    from mimkit.engine.optim import NO_DECAY_NAMES

    encoder = cast(nn.Module, model.encoder) if encoder is None else encoder
    num_layers = len(cast(nn.ModuleList, encoder.blocks)) + 1
    layers = parameter_layers(encoder)
    layer_of = {id(param): layers[name] for name, param in encoder.named_parameters()}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of.get(id(param), num_layers)
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - layer),
                "layer": layer,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


@dataclass
class FinetuneResult:
    """What :func:`finetune` measured.

    Attributes:
        model: the trained :class:`Classifier` (eval mode).
        logits: (M, num_classes) test logits of the final model (of the EMA model when ``ema``).
        history: one record per epoch: ``epoch``, ``train_loss``, ``test_top1``.
        steps: optimizer steps taken.
        lr: peak learning rate.
        ema_logits: test logits of the EMA model when ``ema`` (``logits`` are then the raw model's).
    """

    model: Classifier
    logits: Tensor
    history: list[dict[str, float]]
    steps: int
    lr: float
    ema_logits: Tensor | None = None


def finetune(
    model: Classifier,
    train_images: Tensor | CropDataset,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    config: FinetuneConfig,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
    metrics: Any = None,
    progress: bool = True,
    state_path: str | Path | None = None,
    resume_state: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Train ``model`` on uint8 images with MAE's fine-tuning recipe and measure it on the test images.

    Every epoch visits ``N // batch_size`` full batches in a seeded order. In-memory squares (Fashion-MNIST)
    are randomly resized-cropped (``crop_scale``) and flipped per batch on the device; a
    :class:`~mimkit.data.crops.CropDataset` (photo folders) gives crops of the original images, made by
    ``num_workers`` loader processes and only normalized here. Batches are optionally mixed (timm's
    ``Mixup``, with label smoothing folded into its soft targets), and the loss is cross-entropy with label
    smoothing. The learning rate of each layer-decay group is ``lr_scale * warmup_cosine(step)``.

    Under ``torchrun`` every rank trains a DistributedDataParallel copy on its ``batch_size`` rows of each
    global batch of ``batch_size * world_size`` (augmented as one process would augment the whole batch; lr
    scaled by the global batch); rank 0 alone evaluates, logs and returns the test logits.

    Args:
        model: a :class:`Classifier` (its encoder's drop path is set from ``config.drop_path``).
        train_images: (N, C, S, S) uint8, or a labelled :class:`~mimkit.data.crops.CropDataset` of N images.
        train_labels: (N,) int64 in [0, num_classes) (a CropDataset's ``labels``).
        test_images: (M, C, S, S) uint8.
        test_labels: (M,).
        config: the recipe.
        mean, std: the encoder's input normalization.
        device: where to train.
        metrics: a :class:`~mimkit.engine.logging.MetricsLogger` for loss/lr curves and test accuracy.
        progress: tqdm bars.
        state_path: where rank 0 writes the run's state (weights, optimizer, EMA, generators, RNG, the
            position in the epoch) after every epoch and when a stop signal ends the run after a step;
            None writes nothing (a stop then says that nothing was saved).
        resume_state: such a state, loaded: training continues after its step and ends with the weights,
            history and logits of the run that was not stopped.
        settings: what a resume must share with the run it continues (checked against ``resume_state``;
            ``config`` is always part of it).

    Raises:
        ValueError: too few images for one batch.
        TrainingDiverged: a non-finite loss (the message says which step and lr).
        SettingsChanged: ``resume_state`` was saved with other settings.
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from mimkit.config import to_plain
    from mimkit.data import build_loader
    from mimkit.data.transforms import EvalTransform, MAEAugment, Normalize
    from mimkit.engine import distributed
    from mimkit.engine.loop import TrainLoop
    from mimkit.engine.resumable import HasState, ResumableState
    from mimkit.engine.rng import rng_state, set_rng_state
    from mimkit.engine.schedule import effective_lr, warmup_cosine
    from mimkit.eval.report import classification_metrics

    device = torch.device(device)
    where = distributed.place()
    batch, global_batch = config.batch_size, config.batch_size * where.world_size
    progress = progress and where.is_main
    num_train = len(train_images)
    if len(train_labels) != num_train:
        raise ValueError(f"{num_train} training images but {len(train_labels)} labels")
    if num_train < global_batch:
        raise ValueError(
            f"{num_train} training images are fewer than one batch of {global_batch}"
            + (f" ({batch} x {where.world_size} ranks)" if where.distributed else "")
            + "; lower batch_size"
        )
    num_classes = model.num_classes
    model.encoder.set_drop_path_rate(config.drop_path)
    model.to(device).train()
    trained: nn.Module = model  # what runs forward and backward: the model, or its DDP wrapper
    if where.distributed:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    groups = layer_decay_groups(model, config.weight_decay, config.layer_decay)
    peak_lr = effective_lr(config.blr, global_batch, config.lr)
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999))
    ema = None
    if config.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.ema_decay)
    img_size = int(model.encoder.grid[0] * model.encoder.patch_size)
    augment: MAEAugment | Normalize = MAEAugment(img_size, config.crop_scale, hflip=config.hflip, mean=mean, std=std)
    crops = None  # photo folders: batches of crops of the originals, this rank's share of each global batch
    if isinstance(train_images, CropDataset):
        crops = build_loader(
            train_images,
            batch,
            seed=config.seed,
            drop_last=True,
            num_workers=config.num_workers,
            rank=where.rank,
            world_size=where.world_size,
            pin_memory=device.type == "cuda",
        )
        augment = Normalize(mean, std)
    evaluate = EvalTransform(img_size, mean=mean, std=std)
    mixup = None
    if config.mixing:
        mixup = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing,
            num_classes=num_classes,
        )
    soft_loss = SoftTargetCrossEntropy()

    steps_per_epoch = num_train // global_batch
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    order_generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    # timm's Mixup draws from numpy's global RNG and drop path from torch's: both seeded here (drop path per
    # rank), the caller's states given back at the end
    caller_rng = rng_state()
    np.random.seed(config.seed)
    torch.manual_seed(config.seed + 1_000_003 * where.rank)
    step = 0
    logits = torch.empty(0, num_classes)  # the test logits, on rank 0
    share = {"part": (where.rank * batch, global_batch)} if where.distributed else {}
    parts: dict[str, HasState] = {"model": model, "optimizer": optimizer}
    if ema is not None:
        parts["ema"] = ema
    state = ResumableState(
        parts, {"augment": generator}, {**(settings or {}), "config": to_plain(config), "ranks": where.world_size}
    )
    # where the run stands: the epoch, the next step in it, the order generator at the epoch's start, the
    # epoch's loss sum so far
    first_epoch, first_index, running_sum = 0, 0, 0.0
    loop_state: dict[str, Any] = {}  # the logging window in progress
    if resume_state is not None:
        step, done = state.load_state_dict(resume_state, source=state_path or "the resumed state")
        first_epoch, first_index, running_sum = done["epoch"], done["index"], done["running"]
        loop_state = done.get("loop", {})
        order_generator.set_state(done["order"])
        history = list(done["history"])
        log.info("fine-tuning resumed after step %d (epoch %d, step %d of it)", step, first_epoch + 1, first_index)

    def save(epoch: int, index: int, order_state: Tensor, running: Tensor, window: dict[str, Any]) -> Path | None:
        """Rank 0 writes the state after the step just taken; ``running``: the epoch's loss sum so far, and
        ``window`` the logging window's state (both rank means)."""
        if state_path is None:
            return None
        if where.is_main:
            progress_state = {
                "epoch": epoch,
                "index": index,
                "order": order_state,
                "running": float(running),
                "history": history,
                "loop": window,
            }
            state.save(state_path, loop.step, progress_state)
        return Path(state_path)

    def save_mid_epoch() -> Path | None:
        """What a stop signal saves after step ``index`` of ``epoch`` (every rank takes part)."""
        so_far = distributed.all_reduce(running.clone()) / where.world_size  # every rank resumes with it
        return save(epoch, index + 1, order_state, so_far, loop.agreed_state_dict())

    def batch_loss(index: int, order: Tensor) -> Tensor:
        """The loss of this rank's share of global batch ``index`` of the epoch's ``order``."""
        if crops is None:
            first = index * global_batch + where.rank * batch
            rows = order[first : first + batch]  # (B,) this rank's rows of the global batch
            pixels, labels = cast(Tensor, train_images)[rows], train_labels[rows]  # (B, C, S, S), (B,)
        else:
            pixels, labels = next(crop_batches)  # (B, C, S, S) uint8 crops, (B,)
        images = augment(pixels.to(device, non_blocking=True), generator, **share)  # (B, C, S, S) float
        labels = labels.to(device, non_blocking=True)  # (B,)
        if mixup is not None:
            images, soft_targets = mixup(images, labels)  # (B, C, S, S), (B, num_classes)
            return cast(Tensor, soft_loss(trained(images), soft_targets))
        return F.cross_entropy(trained(images), labels, label_smoothing=config.label_smoothing)

    def after_update(loss: Tensor) -> None:
        if ema is not None:
            ema.update(model, step=loop.step)
        running.add_(loss)

    schedule = partial(
        warmup_cosine, base_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=config.min_lr
    )
    loop = TrainLoop(
        optimizer,
        schedule,
        total_steps=total_steps,
        task="fine-tuning",
        lower="blr or lr",
        context=f" with peak lr {peak_lr:g}",
        clip_grad=config.clip_grad,
        step=step,
        progress=progress,
        metrics=metrics,
        log_at=lambda at: at % config.log_every_steps == 0,
        prefix="finetune/",
        on_update=after_update,
        save=save_mid_epoch,
        device=device,
        ranks_agree=where.distributed,  # SIGTERM/SIGINT: every rank stops after the same step
    )
    loop.load_state_dict(loop_state)
    try:
        with loop:
            for epoch in range(first_epoch, config.epochs):
                order_state = order_generator.get_state()  # saved with a stop mid-epoch, to draw this order again
                order = torch.randperm(num_train, generator=order_generator)  # (N,)
                start = first_index if epoch == first_epoch else 0
                if crops is not None:
                    crops.set_epoch(epoch)
                    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global
                        crop_batches = iter(crops.iter_from(start))  # generator, which drop path must not see
                running = torch.full((), running_sum if epoch == first_epoch else 0.0, device=device)
                for index in range(start, steps_per_epoch):
                    loop.run_step(partial(batch_loss, index, order))
                running = distributed.all_reduce(running) / where.world_size  # the mean over ranks
                window = loop.agreed_state_dict()
                if not where.is_main:
                    continue  # rank 0 evaluates; the others wait for it in the next step's gradient all-reduce
                logits = predict(
                    model, test_images, config.eval_batch_size, transform=evaluate, progress=progress, desc="evaluate"
                )
                top1 = classification_metrics(logits, test_labels, num_classes).top1
                record = {"epoch": epoch + 1, "train_loss": running.item() / steps_per_epoch, "test_top1": top1}
                history.append(record)
                if metrics is not None:
                    metrics.log(loop.step, {"finetune/epoch_loss": record["train_loss"], "finetune/test_top1": top1})
                log.info(
                    "fine-tune epoch %d: loss %.4f, test top-1 %.2f%%", epoch + 1, record["train_loss"], 100 * top1
                )
                save(epoch + 1, 0, order_generator.get_state(), torch.zeros(()), window)
    finally:
        set_rng_state(caller_rng)
    step = loop.step
    model.eval()
    ema_logits = None
    if ema is not None and where.is_main:
        ema_logits = predict(
            ema.module, test_images, config.eval_batch_size, transform=evaluate, progress=progress, desc="evaluate"
        )
    return FinetuneResult(model=model, logits=logits, history=history, steps=step, lr=peak_lr, ema_logits=ema_logits)


def finetune_run_dir(out_dir: str | Path, partial_blocks: int | None, random_init: bool) -> Path:
    """Where :func:`run_finetune` writes: ``out_dir/<full|partial<k>>/<pretrained|random_init>``."""
    protocol = "full" if partial_blocks is None else f"partial{partial_blocks}"
    return Path(out_dir) / protocol / ("random_init" if random_init else "pretrained")


@holding_run_lock(
    lambda out_dir, partial_blocks, random_init, **_: finetune_run_dir(out_dir, partial_blocks, random_init), "--out"
)
def run_finetune(
    checkpoint: str | Path,
    *,
    data: str | Path = "fashion_mnist",
    partial_blocks: int | None = None,
    random_init: bool = False,
    config: FinetuneConfig | None = None,
    out_dir: str | Path = "finetune",
    device: torch.device | str | None = None,
    progress: bool = True,
    save_model: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune a checkpoint's encoder on labelled data and write what it measured.

    Args:
        checkpoint: any checkpoint :func:`~mimkit.build.load_checkpoint` reads (mimkit, MAE, HF).
        data: ``"fashion_mnist"`` or a folder with ``train/`` and ``test/`` (or ``val/``), one subfolder
            of images per class, the same classes in both.
        partial_blocks: None for full fine-tuning, else train only the last k blocks plus the head.
        random_init: the same architecture untrained (seeded with ``config.seed``), the baseline.
        config: the recipe (defaults: :class:`FinetuneConfig`).
        out_dir: receives ``<full|partial<k>>/<pretrained|random_init>/`` with ``results.json``,
            ``confusion.png``, ``metrics.jsonl``, TensorBoard events under ``tb/`` and, with
            ``save_model``, ``classifier.pt``.
        device: default CUDA when available.
        progress: progress bars.
        save_model: write the fine-tuned classifier (atomically).
        resume: continue the run stopped in this folder from its ``last.pt`` (which the run writes after
            every epoch and when a stop signal ends it after a step, and removes when it finishes), with
            the same checkpoint, data and recipe; the result equals that of a run that was never stopped.

    Under ``torchrun`` every rank trains (see :func:`finetune`); rank 0 alone writes and reports, the
    other ranks return ``{"rank": r}``. Rank 0 locks the run folder against a second writer while this runs.

    Returns:
        The dict written to ``results.json``: top-1/top-5, per-class accuracy, confusion, per-epoch
        history, the recipe and where the files went.

    Raises:
        ValueError: bad data (unlabelled, mismatched classes) or ``partial_blocks`` out of range.
        FileNotFoundError: missing data, or ``resume`` without a ``last.pt`` to continue.
        CheckpointError: unreadable checkpoint.
        SettingsChanged: ``resume`` with another checkpoint, data or recipe than the stopped run's.
    """
    from mimkit.config import to_plain
    from mimkit.engine import distributed
    from mimkit.engine.logging import MetricsLogger, NullLogger
    from mimkit.engine.resumable import read_resume_file
    from mimkit.eval.data import (
        check_labelled_folder,
        data_source,
        load_eval_model,
        load_labelled_split,
        load_training_crops,
    )
    from mimkit.eval.report import classification_metrics, save_confusion_matrix, write_results
    from mimkit.files import atomic_write

    config = (config or FinetuneConfig()).validate()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    where, device = distributed.setup(device)
    dataset, folder = data_source(data)
    if folder is not None:
        check_labelled_folder(folder)
    model = load_eval_model(checkpoint, random_init=random_init, seed=config.seed, dataset=dataset)
    encoder = cast(VisionTransformer | ConvViT, model.encoder)
    if config.pool == "cls" and encoder.num_prefix_tokens == 0:
        raise ValueError(f"{type(encoder).__name__} has no class token: fine-tune it with pool=avg")
    depth = len(encoder.blocks)
    if partial_blocks is not None and not 0 <= partial_blocks <= depth:
        raise ValueError(f"--partial-blocks must lie in [0, {depth}] for this encoder, got {partial_blocks}")
    size, chans = model.img_size, model.in_chans
    train: LabelledSplit | CropDataset
    if folder is None:  # Fashion-MNIST: 28-pixel squares in memory, cropped per batch
        train = load_labelled_split(
            dataset, folder, "train", img_size=size, in_chans=chans, limit=config.train_limit, progress=progress
        )
    else:  # photos: crops of the original images, as in pretraining
        train = load_training_crops(
            folder,
            img_size=size,
            in_chans=chans,
            scale=config.crop_scale,
            hflip=config.hflip,
            seed=config.seed,
            limit=config.train_limit,
            num_workers=config.num_workers,
            progress=progress,
        )
    test = load_labelled_split(
        dataset,
        folder,
        "test",
        img_size=size,
        in_chans=chans,
        limit=config.test_limit,
        progress=progress,
        crop_ratio=model.eval_crop_ratio,
    )
    classes = list(train.classes)
    if test.classes != classes:
        raise ValueError(f"test classes {test.classes} differ from train classes {classes}")
    train_labels = torch.as_tensor(train.labels).long()
    protocol = "full" if partial_blocks is None else f"partial{partial_blocks}"
    which = "random_init" if random_init else "pretrained"
    run_dir = finetune_run_dir(out_dir, partial_blocks, random_init)
    state_path = run_dir / "last.pt"
    resume_state = read_resume_file(state_path) if resume else None
    with torch.random.fork_rng(devices=[]):  # the head's initialisation is part of the seeded recipe
        torch.manual_seed(config.seed)
        classifier = Classifier(encoder, len(classes), pool=config.pool, trainable_blocks=partial_blocks)
    resume_step = None if resume_state is None else int(resume_state["step"])
    metrics = MetricsLogger(run_dir, tensorboard=True, resume_step=resume_step) if where.is_main else NullLogger()
    try:
        result = finetune(
            classifier,
            train.images if isinstance(train, LabelledSplit) else train,
            train_labels,
            test.images,
            test.labels,
            config=config,
            mean=model.mean,
            std=model.std,
            device=device,
            metrics=metrics,
            progress=progress,
            state_path=state_path,
            resume_state=resume_state,
            settings={
                "checkpoint": str(checkpoint),
                "data": str(data),
                "partial_blocks": partial_blocks,
                "random_init": random_init,
            },
        )
        if not where.is_main:
            return {"rank": where.rank}
        reported = result.ema_logits if result.ema_logits is not None else result.logits
        scores = classification_metrics(reported, test.labels, len(classes))
        metrics.log(result.steps, {"finetune/final_top1": scores.top1})
    finally:
        metrics.close()
    label = "full fine-tuning" if partial_blocks is None else f"partial fine-tuning (last {partial_blocks} blocks)"
    png = save_confusion_matrix(
        scores.confusion,
        classes,
        run_dir / "confusion.png",
        title=f"{label}, {which.replace('_', ' ')} {Path(checkpoint).name}: top-1 {100 * scores.top1:.1f}%",
    )
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    results: dict[str, Any] = {
        "protocol": protocol,
        "partial_blocks": partial_blocks,
        "checkpoint": str(checkpoint),
        "model": model.config.get("name"),
        "random_init": random_init,
        "data": dataset if folder is None else str(folder),
        "classes": classes,
        "train_images": len(train_labels),
        "test_images": len(test.labels),
        "trainable_parameters": trainable,
        "steps": result.steps,
        "lr": result.lr,
        "config": to_plain(config),
        "normalization": {"mean": list(model.mean), "std": list(model.std)},
        "top1": scores.top1,
        "top5": scores.top5,
        "per_class_accuracy": {
            name: (None if math.isnan(value) else round(value, 6))
            for name, value in zip(classes, scores.per_class_accuracy.tolist(), strict=True)
        },
        "confusion": scores.confusion,
        "confusion_png": str(png),
        "history": result.history,
    }
    if result.ema_logits is not None:
        results["top1_without_ema"] = classification_metrics(result.logits, test.labels, len(classes)).top1
    if save_model:
        state = {
            "model": classifier.state_dict(),
            "model_config": model.config,
            "classes": classes,
            "pool": config.pool,
            "partial_blocks": partial_blocks,
            "normalization": results["normalization"],
        }
        path = run_dir / "classifier.pt"
        atomic_write(path, lambda handle: torch.save(state, handle))
        results["classifier"] = str(path)
    results["results_json"] = str(write_results(run_dir / "results.json", results))
    state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    return results


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """A fine-tuned :class:`Classifier` (eval mode) from the ``classifier.pt`` :func:`run_finetune` wrote,
    and the saved dict (``classes``, ``normalization``, ``model_config``, ``pool``, ``partial_blocks``).

    Raises:
        CheckpointError: missing, truncated or foreign file.
    """
    from mimkit.build import create_model
    from mimkit.files import CheckpointError, load_checkpoint_file

    state = load_checkpoint_file(path, map_location)
    missing = {"model", "model_config", "classes", "pool", "partial_blocks"} - set(state)
    if missing:
        raise CheckpointError(f"{path} is not a mimkit fine-tuned classifier (no {', '.join(sorted(missing))})")
    args = dict(state["model_config"])
    encoder = cast(VisionTransformer | ConvViT, create_model(args.pop("name"), **args).encoder)
    classifier = Classifier(
        encoder, len(state["classes"]), pool=state["pool"], trainable_blocks=state["partial_blocks"]
    )
    classifier.load_state_dict(state["model"])
    return classifier.eval(), state


def format_finetune(results: dict[str, Any]) -> str:
    """The short report ``mimkit finetune`` prints."""
    which = "random init" if results["random_init"] else "pretrained"
    top5 = "-" if results["top5"] is None else f"{100 * results['top5']:.2f}%"
    curve = ", ".join(f"{100 * r['test_top1']:.1f}" for r in results["history"])
    return "\n".join(
        [
            f"{results['protocol']} fine-tuning of {results['checkpoint']} ({which}) on {results['data']}: "
            f"{results['train_images']} train / {results['test_images']} test images, {len(results['classes'])} "
            f"classes, {results['trainable_parameters']:,} trainable parameters, {results['steps']} steps",
            f"  top-1 {100 * results['top1']:.2f}%  top-5 {top5}",
            f"  test top-1 per epoch: {curve}",
            f"results in {results['results_json']}",
        ]
    )
