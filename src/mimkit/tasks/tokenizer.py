"""``mimkit tokenizer-train``: BEiT v2's VQ-KD tokenizer (:mod:`mimkit.targets.vqkd`) trained on images.

The run's schema (:class:`TokenizerConfig`), the tokenizer it describes (:func:`build_tokenizer`) and the
training loop (:func:`train_tokenizer`): AdamW with warmup and cosine, the VQ-KD loss, codebook usage and
perplexity logged every ``log.every_steps`` steps and checked for collapse, the tokenizer file written once
at the end. A stopped run continues with ``--resume`` (:data:`STATE_NAME`, see :func:`train_tokenizer`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from mimkit.config import ConfigError, TeacherConfig, to_plain
from mimkit.data import EvalTransform, FashionMNIST, build_loader, build_training_dataset, training_transform
from mimkit.data.transforms import default_normalization
from mimkit.engine.logging import MetricsLogger
from mimkit.engine.loop import TrainLoop
from mimkit.engine.optim import build_optimizer
from mimkit.engine.pretrain import resolve_device, step_generator
from mimkit.engine.resumable import ResumableState, read_resume_file
from mimkit.engine.run_guard import holding_run_lock
from mimkit.engine.schedule import warmup_cosine
from mimkit.files import atomic_write
from mimkit.layers import check_patch_grid
from mimkit.models.registry import ENCODERS
from mimkit.targets.teachers import Teacher, build_teacher
from mimkit.targets.vqkd import (
    COLLAPSE_MIN_PERPLEXITY,
    COLLAPSE_MIN_USAGE,
    TOKENIZER_NAME,
    VQKDTokenizer,
    check_codebook,
    codebook_stats,
    save_tokenizer,
)

SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.yaml"
LOSS_NAMES = ("loss", "rec_loss", "quant_loss")  # the loss and its terms, logged as train/<name>
STATE_NAME = "last.pt"  # the state of a run in progress: written at each log and on a stop, removed at the end


@dataclass
class TokenizerModelConfig:
    """The tokenizer's architecture (see :class:`VQKDTokenizer`); the patch grid is the student's."""

    encoder: str = "vit_tiny"
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int | None = 128
    depth: int | None = 4
    num_heads: int | None = 4
    mlp_ratio: float = 4.0
    num_codes: int = 512
    code_dim: int = 32
    # BEiT v2's 0.99 remembers ~100 steps, fine for its 250k-step runs; in runs of a few hundred steps the
    # codes then lag the moving encoder and the codebook collapses (< 20 of 256 codes used after 100 steps)
    decay: float = 0.9
    beta: float = 1.0
    kmeans_init: bool = True
    dead_code_threshold: float = 1.0
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4


@dataclass
class TokenizerTeacherConfig(TeacherConfig):
    """``teacher``: the pretraining target's teacher section (``spec``, ``stage``, ``input_size``) with a teacher
    by default; its ``cache`` is refused (the teacher sees a freshly augmented crop at every step)."""

    spec: str = "efficientnet_lite0"


@dataclass
class TokenizerDataConfig:
    """Training images and their augmentation (random resized crop and flip, as BEiT v2's tokenizer)."""

    dataset: str = "fashion_mnist"
    root: str | None = None
    limit: int | None = None
    in_memory: bool | None = None
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_workers: int = 2
    cache_size: int | None = None  # folders and shards: shorter side of cached images (see DataConfig)


@dataclass
class TokenizerOptimConfig:
    """AdamW (no decay on biases and norms), linear warmup then cosine to ``min_lr``."""

    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 20
    clip_grad: float | None = 3.0


@dataclass
class TokenizerTrainConfig:
    """Run length and outputs. ``overwrite``: replace a finished run's ``tokenizer.pt`` in ``output_dir``
    (refused otherwise). ``eval_images``: un-augmented training images tokenized after training for the
    summary's codebook usage."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    output_dir: str = "runs/vqkd"
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    overwrite: bool = False
    eval_images: int = 2048


@dataclass
class TokenizerLogConfig:
    """Metrics every ``every_steps`` (and at the end), TensorBoard, and the collapse thresholds of
    :func:`check_codebook`."""

    every_steps: int = 20
    tensorboard: bool = False
    collapse_usage: float = COLLAPSE_MIN_USAGE
    collapse_perplexity: float = COLLAPSE_MIN_PERPLEXITY


@dataclass
class TokenizerConfig:
    """A VQ-KD tokenizer training run (``mimkit tokenizer-train``)."""

    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    teacher: TokenizerTeacherConfig = field(default_factory=TokenizerTeacherConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    log: TokenizerLogConfig = field(default_factory=TokenizerLogConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)  # type: ignore[no-any-return]

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the images: ``data.mean``/``data.std`` or the data set's defaults."""
        mean, std = default_normalization(self.model.in_chans, self.data.dataset)
        return tuple(self.data.mean or mean), tuple(self.data.std or std)

    def validate(self) -> TokenizerConfig:
        """Raise :class:`~mimkit.config.ConfigError` naming the first bad key."""
        m, d, o, t, lg = self.model, self.data, self.optim, self.train, self.log
        checks = [
            (m.encoder in ENCODERS, "model.encoder", f"unknown ViT {m.encoder!r}; one of {sorted(ENCODERS)}"),
            (m.in_chans in (1, 3), "model.in_chans", f"must be 1 or 3, got {m.in_chans}"),
            (m.num_codes >= 2, "model.num_codes", "must be >= 2"),
            (m.code_dim >= 1, "model.code_dim", "must be >= 1"),
            (0 < m.decay < 1, "model.decay", "must lie in (0, 1)"),
            (m.beta >= 0, "model.beta", "must be >= 0"),
            (m.dead_code_threshold >= 0, "model.dead_code_threshold", "must be >= 0 (0: no restarts)"),
            (m.decoder_depth >= 1, "model.decoder_depth", "must be >= 1"),
            (
                m.decoder_embed_dim % 4 == 0 and m.decoder_embed_dim % m.decoder_num_heads == 0,
                "model.decoder_embed_dim",
                "must be divisible by 4 and by model.decoder_num_heads",
            ),
            (bool(self.teacher.spec), "teacher.spec", "must name a teacher (e.g. efficientnet_lite0)"),
            (
                self.teacher.cache is None,
                "teacher.cache",
                "the tokenizer keeps no feature cache (its teacher sees a new augmented crop each step); remove it",
            ),
            (d.dataset in ("fashion_mnist", "folder"), "data.dataset", "must be 'fashion_mnist' or 'folder'"),
            (d.dataset != "folder" or bool(d.root), "data.root", "data.dataset=folder needs data.root"),
            (d.limit is None or d.limit >= 1, "data.limit", "must be >= 1 (or null)"),
            (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", "must be (low, high) in (0, 1]"),
            (o.lr > 0, "optim.lr", "must be positive"),
            (o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
            (o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", "must be positive (or null)"),
            (t.epochs >= 1, "train.epochs", "must be >= 1"),
            (t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 (or null)"),
            (t.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (t.eval_images >= 0, "train.eval_images", "must be >= 0"),
            (lg.every_steps >= 1, "log.every_steps", "must be >= 1"),
            (0 <= lg.collapse_usage <= 1, "log.collapse_usage", "must lie in [0, 1]"),
            (0 <= lg.collapse_perplexity <= 1, "log.collapse_perplexity", "must lie in [0, 1]"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")
        try:
            check_patch_grid(m.img_size, m.patch_size)
        except ValueError as err:
            raise ConfigError(f"model.img_size: {err}") from None
        return self


def build_tokenizer(config: TokenizerConfig, teacher: Teacher | None = None) -> VQKDTokenizer:
    """The tokenizer a config describes, with ``teacher`` (built from ``config.teacher`` when None)."""
    mean, std = config.normalization()
    if teacher is None:
        options = config.teacher.options() or {}
        teacher = build_teacher(config.teacher.spec, student_mean=mean, student_std=std, **options)
    m = config.model
    return VQKDTokenizer(
        img_size=m.img_size,
        patch_size=m.patch_size,
        in_chans=m.in_chans,
        encoder=m.encoder,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        num_codes=m.num_codes,
        code_dim=m.code_dim,
        decay=m.decay,
        beta=m.beta,
        kmeans_init=m.kmeans_init,
        dead_code_threshold=m.dead_code_threshold,
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
        teacher=teacher,
        mean=mean,
        std=std,
    )


@holding_run_lock(lambda config, **_: config.train.output_dir, "train.output_dir")
def train_tokenizer(config: TokenizerConfig, *, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train a VQ-KD tokenizer; writes ``tokenizer.pt``, ``config.yaml``, ``metrics.jsonl`` and
    ``summary.json`` to ``config.train.output_dir``.

    Every ``log.every_steps`` steps the mean losses and the codebook usage and perplexity of that window's
    assignments are logged (and checked by :func:`check_codebook`); at each epoch's end those of the
    epoch. After training, ``train.eval_images`` un-augmented training images are tokenized (eval mode)
    for the summary's usage and perplexity (Fashion-MNIST, held as one tensor; on folders and shards the
    last window's usage stands).

    The run directory is locked against a second writer while this runs. Its ``last.pt``
    (:data:`STATE_NAME`: the tokenizer with its codebook, EMA buffers and cluster sizes, the optimizer, the
    global RNG states the k-means start and dead-code restarts draw from, the step, the logging windows'
    sums and code counts) is written at every log and when SIGTERM or SIGINT stop the run after the step
    in flight (:class:`~mimkit.engine.run_guard.TrainingInterrupted`), and removed when the run finishes.

    Args:
        config: a validated config.
        progress: show a tqdm progress bar.
        resume: continue the run stopped in ``train.output_dir`` from its ``last.pt``, with the same
            config; the tokenizer and the summary (but its timings) equal those of a run never stopped.

    Returns:
        The summary: ``final_loss`` (mean of the last logging window), ``final_rec_loss``,
        ``final_quant_loss``, ``codebook_usage``, ``used_codes``, ``perplexity``, ``num_codes``,
        ``collapsed``, ``steps``, ``seconds`` (summed over the parts of a resumed run), ``tokenizer`` (the
        file's path).

    Raises:
        FileExistsError: ``output_dir`` holds a finished run and ``train.overwrite`` is false.
        FileNotFoundError: ``resume`` without a ``last.pt`` to continue.
        SettingsChanged: ``resume`` with another config than the stopped run's (each key named).
        ValueError: fewer images than a batch; unknown teacher.
        FileNotFoundError: missing data or teacher weights.
    """
    cfg = config
    out_dir = Path(cfg.train.output_dir)
    tokenizer_path = out_dir / TOKENIZER_NAME
    if tokenizer_path.exists() and not cfg.train.overwrite:
        raise FileExistsError(
            f"{tokenizer_path} already exists (a finished run); set train.overwrite=true to replace it or choose "
            "another train.output_dir"
        )
    state_path = out_dir / STATE_NAME
    resume_state = read_resume_file(state_path) if resume else None
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    batch_size = cfg.train.batch_size
    dataset = build_training_dataset(cfg.data, cfg.model.img_size, cfg.model.in_chans, batch_size, seed=cfg.train.seed)
    mean, std = cfg.normalization()
    tokenizer = build_tokenizer(cfg).to(device)
    augment = training_transform(cfg.data, cfg.model.img_size, dataset, mean, std)
    loader = build_loader(
        dataset, batch_size=batch_size, seed=cfg.train.seed, drop_last=True, num_workers=cfg.data.num_workers
    )
    steps_per_epoch = len(dataset) // batch_size
    schedule_steps = cfg.train.epochs * steps_per_epoch
    total_steps = min(schedule_steps, cfg.train.max_steps or schedule_steps)
    optimizer = build_optimizer(tokenizer, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    collapse = dict(min_usage=cfg.log.collapse_usage, min_perplexity=cfg.log.collapse_perplexity)

    num_codes = tokenizer.num_codes
    window_counts = torch.zeros(num_codes, dtype=torch.long, device=device)  # the codes since the last log
    last_counts = window_counts.clone()  # the last logging window's histogram
    epoch_counts = torch.zeros(num_codes, dtype=torch.long, device=device)
    step, seconds_before = 0, 0.0
    loop_state: dict[str, Any] = {}
    # the k-means start and the dead-code restarts draw from the global RNG, which the state holds
    state = ResumableState({"tokenizer": tokenizer, "optimizer": optimizer}, settings=cfg.to_dict())
    if resume_state is not None:
        step, saved = state.load_state_dict(resume_state, source=state_path)
        window_counts.copy_(saved["window_counts"])
        last_counts.copy_(saved["last_counts"])
        epoch_counts.copy_(saved["epoch_counts"])
        seconds_before = saved["seconds"]
        loop_state = saved.get("loop") or {  # a state written before the loop kept the window
            "window": dict(zip(LOSS_NAMES, saved["window"].tolist(), strict=True)),
            "window_steps": step - saved["last_log_step"],
            "last": saved["last"],
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(out_dir / CONFIG_NAME, lambda handle: handle.write(text.encode()))

    def save() -> Path:
        """Write the state after the step just taken (the counts on the CPU: the state loads on the CPU)."""
        counters = {
            "window_counts": window_counts.cpu(),
            "last_counts": last_counts.cpu(),
            "epoch_counts": epoch_counts.cpu(),
            "loop": loop.state_dict(),
            "seconds": seconds_before + time.perf_counter() - started,
        }
        return state.save(state_path, loop.step, counters)

    def batch_loss(images_uint8: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        images = augment(images_uint8.to(device), generator=step_generator(cfg.train.seed, loop.step, 0))
        out = tokenizer(images)
        counts = torch.bincount(out.codes.flatten(), minlength=num_codes)  # (K,)
        window_counts.add_(counts)
        epoch_counts.add_(counts)
        return out.loss, {"rec_loss": out.rec_loss, "quant_loss": out.quant_loss}

    def codebook_metrics(at: int, means: dict[str, float]) -> dict[str, Any]:
        """The codebook's usage and perplexity over the window (checked for collapse), and over the epoch at
        its end."""
        stats = check_codebook(window_counts, where=f"step {at}", **collapse)
        metrics: dict[str, Any] = {
            "codebook/usage": stats.usage,
            "codebook/used_codes": stats.used_codes,
            "codebook/perplexity": stats.perplexity,
            "epoch": at / steps_per_epoch,
        }
        if at % steps_per_epoch == 0 or at >= total_steps:
            epoch_stats = codebook_stats(epoch_counts)
            metrics["codebook/epoch_usage"] = epoch_stats.usage
            metrics["codebook/epoch_perplexity"] = epoch_stats.perplexity
            epoch_counts.zero_()
        loop.bar.set_postfix(loss=f"{means['loss']:.4f}", usage=f"{stats.usage:.0%}", ppl=f"{stats.perplexity:.0f}")
        last_counts.copy_(window_counts)
        window_counts.zero_()
        return metrics

    logger = MetricsLogger(out_dir, tensorboard=cfg.log.tensorboard, resume_step=None if resume_state is None else step)
    schedule = partial(
        warmup_cosine,
        base_lr=cfg.optim.lr,
        total_steps=schedule_steps,
        warmup_steps=cfg.optim.warmup_steps,
        min_lr=cfg.optim.min_lr,
    )
    loop = TrainLoop(
        optimizer,
        schedule,
        total_steps=total_steps,
        task="tokenizer",
        lower="optim.lr",
        params=tokenizer.parameters(),
        clip_grad=cfg.optim.clip_grad,
        step=step,
        progress=progress,
        metrics=logger,
        log_at=lambda at: at % cfg.log.every_steps == 0 or at % steps_per_epoch == 0 or at >= total_steps,
        on_log=codebook_metrics,
        save=save,
        save_on_log=True,
        device=device,
    )
    loop.load_state_dict(loop_state)
    started = time.perf_counter()
    tokenizer.train()
    try:
        with loop:
            while not loop.done:
                epoch = loop.step // steps_per_epoch
                loader.set_epoch(epoch)
                # a DataLoader draws its base seed from the global RNG, which the restarts must not see
                with torch.random.fork_rng(devices=[]):
                    batches = iter(loader.iter_from(loop.step - epoch * steps_per_epoch))
                for images_uint8, _ in batches:
                    loop.run_step(partial(batch_loss, images_uint8))
                    if loop.done:
                        break
    finally:
        logger.close()
    seconds = seconds_before + time.perf_counter() - started
    step, last = loop.step, {name: loop.last.get(name, math.nan) for name in LOSS_NAMES}

    tokenizer.eval()
    eval_counts = torch.zeros(num_codes, dtype=torch.long, device=device)
    if cfg.train.eval_images and isinstance(dataset, FashionMNIST):  # the whole set is one tensor
        transform = EvalTransform(cfg.model.img_size, mean=mean, std=std)
        chunk = dataset.images[: cfg.train.eval_images]  # (N, C, S, S) uint8
        for start in range(0, chunk.shape[0], 256):
            codes = tokenizer.tokenize(transform(chunk[start : start + 256].to(device)))  # (b, L)
            eval_counts += torch.bincount(codes.flatten(), minlength=num_codes)
    final_counts = eval_counts if int(eval_counts.sum()) else last_counts
    stats = check_codebook(final_counts, where="the end of training", **collapse)
    summary: dict[str, Any] = {
        "final_loss": last["loss"],
        "final_rec_loss": last["rec_loss"],
        "final_quant_loss": last["quant_loss"],
        "codebook_usage": stats.usage,
        "used_codes": stats.used_codes,
        "perplexity": stats.perplexity,
        "num_codes": num_codes,
        "usage_tokens": stats.num_tokens,
        "collapsed": stats.collapsed(**collapse),
        "steps": step,
        "seconds": seconds,
        "images_per_second": step * batch_size / max(seconds, 1e-9),
        "tokenizer": str(tokenizer_path),
    }
    save_tokenizer(
        tokenizer_path,
        tokenizer,
        teacher=cfg.teacher.spec,
        teacher_options=cfg.teacher.options(),
        config=cfg.to_dict(),
        step=step,
        summary=summary,
    )
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out_dir / SUMMARY_NAME, lambda handle: handle.write(text.encode()))
    state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    return summary


def format_tokenizer_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    return "\n".join(
        [
            f"trained {summary['steps']} steps in {summary['seconds']:.0f} s",
            f"final loss {summary['final_loss']:.4f} (1 - cosine {summary['final_rec_loss']:.4f}, "
            f"commitment {summary['final_quant_loss']:.4f})",
            f"codebook usage {summary['codebook_usage']:.1%} "
            f"({summary['used_codes']} of {summary['num_codes']} codes), "
            f"perplexity {summary['perplexity']:.1f}" + ("  [COLLAPSED]" if summary["collapsed"] else ""),
            f"wrote {summary['tokenizer']}",
        ]
    )
