"""The pretraining loop. It never branches on which MIM variant it runs."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from mimkit.build import build_model
from mimkit.config import Config, config_from_dict
from mimkit.engine import distributed
from mimkit.engine.logging import MetricsLogger, NullLogger
from mimkit.engine.loop import TrainLoop
from mimkit.engine.optim import build_optimizer
from mimkit.engine.previews import ReconstructionPreviews, preview_every
from mimkit.engine.rng import rng_state, set_rng_state
from mimkit.engine.run_guard import (
    RunLock,
    TrainingInterrupted,
    check_input_path,
    check_output_dir,
    naming_key,
)
from mimkit.engine.schedule import effective_lr, warmup_cosine
from mimkit.files import (
    SHARDS_DIR,
    CheckpointError,
    atomic_write,
    check_free_space,
    load_checkpoint_file,
    merged_sharded_state,
    remove_stale_temporaries,
    remove_unreferenced_shards,
    save_checkpoint,
    shard_path,
    state_bytes,
)
from mimkit.models import MaskedImageModel
from mimkit.models.probe_head import LinearProbe
from mimkit.models.protocols import GuidedMasker, StatefulMasker

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CONFIG_NAME = "config.yaml"
__all__ = ["PretrainResult", "Pretrainer", "TrainingInterrupted", "pretrain"]


@dataclass
class PretrainResult:
    """What a finished run reports."""

    output_dir: Path
    checkpoint: Path
    steps: int
    final_loss: float
    images_per_second: float
    seconds: float
    num_skipped_images: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# model.* keys that change how a model trains, not what it is: a run may resume with them changed
TRAINING_CHOICES = ("grad_checkpointing",)
RANK_STRIDE = 2**40  # seeds of rank r are those of rank 0 shifted by r * RANK_STRIDE


def step_generator(seed: int, step: int, stream: int, rank: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, stream, rank): masks and augmentation
    depend on nothing a resume could lose."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 16 + stream + rank * RANK_STRIDE)


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun restarted after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def check_paths(config: Config) -> None:
    """Fail with the key's name when a path the run reads does not exist (teacher weights, tokenizer)."""
    target = config.target
    if target.tokenizer:
        check_input_path(target.tokenizer, "target.tokenizer")
    teacher = target.teacher.spec
    if teacher and teacher != "efficientnet_lite0":
        kind, _, rest = teacher.partition(":") if ":" in teacher else ("", "", teacher)
        if kind == "timm":
            check_input_path(rest.partition("@")[2], "target.teacher.spec (timm:NAME@FILE)")
        elif kind == "hf_clip":
            check_input_path(rest, "target.teacher.spec (hf_clip:DIR)", "folder")
        elif not kind:
            check_input_path(rest, "target.teacher.spec")


def write_config(config: Config, out_dir: Path) -> None:
    """Save the resolved config next to the checkpoints (atomically)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(out_dir / CONFIG_NAME, lambda handle: handle.write(text.encode()))


class Pretrainer:
    """Runs MAE-style pretraining for a :class:`Config`.

    Under ``torchrun`` (see :mod:`mimkit.engine.distributed`) each rank trains on its share of every
    batch: ``train.batch_size`` is per rank, the effective batch is ``batch_size * world_size`` and the
    learning rate scales with it. Rank ``r`` takes rows ``r * B .. (r + 1) * B`` of the global batch one
    process would take, with the same augmentation and (for maskers that do not look at the images) the
    same masks, so N ranks train the same weights as one process with N times the batch. Only rank 0 writes
    checkpoints, logs and pictures; metrics are reduced over ranks. A worker that torchrun restarts after a
    failure resumes from ``output_dir/last.pt`` by itself.

    Rank 0 holds the run directory's :class:`~mimkit.engine.run_guard.RunLock` from construction to
    :meth:`close`: a second process writing the same ``train.output_dir`` is refused. SIGTERM and SIGINT
    during :meth:`fit` finish the step, save and raise :class:`~mimkit.engine.run_guard.TrainingInterrupted`
    (see :class:`~mimkit.engine.run_guard.StopSignals`).

    ``train.parallel``: ``ddp`` replicates the model on every rank (DistributedDataParallel); ``fsdp``
    shards weights, gradients and AdamW state over the ranks (``fully_shard``, one unit per transformer
    block), for models too big to replicate. An FSDP checkpoint is a folder of per-rank shard files named
    by a small ``last.pt``; :func:`~mimkit.files.load_checkpoint_file` joins them, so every
    command (and a resume with another number of ranks, or none) reads it like any other checkpoint.

    Args:
        config: the validated run config.
        resume: continue from ``output_dir/last.pt`` (or from this checkpoint path when a string).
    """

    def __init__(self, config: Config, resume: bool | str = False) -> None:
        self.config = config
        self.out_dir = check_output_dir(config.train.output_dir, "train.output_dir")
        check_paths(config)
        self.place, self.device = distributed.setup(resolve_device(config.train.device))
        self.lock = RunLock(self.out_dir, "train.output_dir")
        if self.place.is_main:  # one writer: rank 0
            self.lock.acquire()
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory for another process (rank 0 holds it from construction)."""
        self.lock.release()

    def _setup(self, resume: bool | str) -> None:
        from mimkit.data import build_loader, build_training_dataset, training_transform

        cfg = self.config
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        if not resume and restarted_by_torchrun() and (self.out_dir / CHECKPOINT_NAME).is_file():
            log.warning("restarted by torchrun: resuming from %s", self.out_dir / CHECKPOINT_NAME)
            resume = True
        resume_path = self._resume_path(resume)
        self._check_output_dir(resume_path)
        if self.place.is_main:
            remove_stale_temporaries(self.out_dir)
            remove_unreferenced_shards(self.out_dir)  # shards of a save a kill interrupted

        torch.manual_seed(cfg.train.seed)
        world = self.place.world_size
        with naming_key("data.root", cfg.data.root):
            self.dataset = build_training_dataset(
                cfg.data, cfg.model.img_size, cfg.model.in_chans, cfg.train.batch_size, world, seed=cfg.train.seed
            )
        self.mean, self.std = cfg.normalization()
        self.augment = training_transform(cfg.data, cfg.model.img_size, self.dataset, self.mean, self.std)
        self.loader = build_loader(
            self.dataset,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            rank=self.place.rank,
            world_size=world,
            pin_memory=self.device.type == "cuda",
        )
        self.steps_per_epoch = len(self.loader)
        # The schedules (lr, hint ratio) span train.epochs; train.max_steps only stops the run earlier, so a
        # run stopped there and resumed is the same run as one never stopped.
        self.schedule_steps = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = self.schedule_steps
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        self.model = build_model(cfg).to(self.device)
        self.sharded = cfg.train.parallel == "fsdp" and self.place.distributed
        if cfg.train.parallel == "fsdp" and not self.sharded:
            log.info("train.parallel=fsdp in a single process: nothing to shard, training the whole model here")
        if self.sharded:
            distributed.shard_model(self.model)
        self.base_lr = effective_lr(cfg.optim.blr, cfg.train.batch_size * world, cfg.optim.lr)
        self.optimizer = build_optimizer(self.model, self.base_lr, cfg.optim.weight_decay, cfg.optim.betas)
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.online_probe: LinearProbe | None = None
        self.probe_optimizer: torch.optim.Optimizer | None = None
        # (summed loss, correct, seen) of the online probe since the last logging step
        self.probe_running = torch.zeros(3, device=self.device)
        if cfg.eval.online_probe:
            self._build_online_probe()
        # exploitation rate measured since the last log: (visible, mask, count); a stateful masker keeps its own
        self.exploitation_log = torch.zeros(3)
        self.last_loss = math.nan  # mean loss over the last logging interval
        resumed = self._load(resume_path) if resume_path is not None else {}
        self.loop = self._train_loop(int(resumed.get("step", 0)))
        self.loop.load_state_dict(resumed.get("loop", {}))
        # The module that runs forward and backward: the model itself, or its DistributedDataParallel
        # wrapper (which all-reduces gradients); self.model stays the plain module for everything else.
        self.forward_model: torch.nn.Module = self.model
        self.probe_forward: torch.nn.Module | None = self.online_probe
        self.data_parallel: Any = None  # the DDP wrapper, for no_sync under gradient accumulation
        if self.place.distributed:
            if not self.sharded:  # a sharded model reduces its own gradients
                self.forward_model = self.data_parallel = self._data_parallel(self.model)
            if self.online_probe is not None:
                self.probe_forward = self._data_parallel(self.online_probe)
        if cfg.train.compile:
            self.forward_model = torch.compile(self.forward_model)  # type: ignore[assignment]
        self.autocast = (
            partial(torch.autocast, device_type=self.device.type, dtype=torch.bfloat16)
            if cfg.train.precision == "bf16"
            else contextlib.nullcontext
        )
        if cfg.train.precision == "bf16" and self.device.type == "cpu":
            log.warning("train.precision=bf16 on a CPU: correct, but slower than fp32 unless the CPU has bf16 units")
        self.logger: MetricsLogger | NullLogger = NullLogger()
        if self.place.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            check_free_space(self.out_dir, state_bytes(self.state_dict()) + 2 * trainable)  # + AdamW moments
            write_config(cfg, self.out_dir)
            self.logger = MetricsLogger(
                self.out_dir, tensorboard=cfg.log.tensorboard, resume_step=self.step if resume_path else None
            )
        self.loop.metrics = self.logger
        # reconstructions of held-aside images while training (pixel targets; a sharded model is not whole here)
        self.previews: ReconstructionPreviews | None = None
        self.preview_steps = preview_every(cfg, self.total_steps)
        shows = cfg.eval.reconstruct and cfg.target.type == "pixel" and not self.sharded
        if self.place.is_main and self.preview_steps and shows:
            self.previews = ReconstructionPreviews(cfg, self.out_dir, self.device, self.mean, self.std)
        self.preview_seconds = 0.0  # reconstruction pictures since the last log
        self.last_log_step, self.last_log_time = self.step, time.perf_counter()
        self.probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's images and labels

    @property
    def step(self) -> int:
        """The number of optimizer steps taken (the loop's counter)."""
        return self.loop.step

    def _train_loop(self, step: int) -> TrainLoop:
        """The engine loop around :meth:`_forward_backward`: lr schedule, clipping, the deferred NaN/inf check,
        logging, saves and stop signals."""
        cfg = self.config
        spe = self.steps_per_epoch
        return TrainLoop(
            self.optimizer,
            self.lr_at,
            total_steps=self.total_steps,
            task="pretrain",
            lower="optim.blr, set optim.clip_grad",
            params=list(self.model.parameters()),  # clipping's norm sums in the model's order
            clip_grad=cfg.optim.clip_grad,
            step=step,
            progress=cfg.train.progress and self.place.is_main,
            log_at=lambda at: at % cfg.log.every_steps == 0 or at % spe == 0 or at >= self.total_steps,
            on_update=self._after_update,
            on_step=self._after_step,
            on_log=self._log_extras,
            save=self._save_step,
            save_every_steps=cfg.train.save_every_steps,
            save_at=lambda at: (
                self._ends_epoch(at, cfg.train.save_every_epochs) or self._ends_epoch(at, cfg.train.keep_every_epochs)
            ),
            defer_check=True,  # no host sync per step; checked at log steps and before every save
            checkpoint_dir=self.out_dir,
            device=self.device,
        )

    def _ends_epoch(self, step: int, every: int | None) -> bool:
        """Whether ``step`` ends an epoch whose number ``every`` divides (never when ``every`` is unset)."""
        spe = self.steps_per_epoch
        return every is not None and every > 0 and step % spe == 0 and (step // spe) % every == 0

    def _data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel: rank 0's weights are broadcast, gradients averaged.

        ``find_unused_parameters``: some variants leave parameters out of some steps (e.g. hint tokens
        before informed masking starts). Buffers are not re-broadcast every step (frozen teachers).
        """
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False
        )

    def _build_online_probe(self) -> None:
        """The online linear probe and its AdamW; built under a private seed so the model's RNG is untouched."""
        labels, num_classes = self.dataset.labels, len(self.dataset.classes)
        if labels is None or num_classes < 2:
            source = self.config.data.root or self.config.data.dataset
            raise ValueError(
                f"eval.online_probe needs labelled training data (at least 2 classes), but {source} has none; "
                "put the images in class subfolders or set eval.online_probe=false"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            probe = LinearProbe(int(self.model.config["embed_dim"]), num_classes)
        self.online_probe = probe.to(self.device)
        self.probe_optimizer = torch.optim.AdamW(
            self.online_probe.parameters(), lr=self.config.eval.online_probe_lr, weight_decay=0.0
        )

    def _resume_path(self, resume: bool | str) -> Path | None:
        if not resume:
            return None
        path = Path(resume) if isinstance(resume, str) else self.out_dir / CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {path} does not exist")
        return path

    def _check_output_dir(self, resume_path: Path | None) -> None:
        existing = self.out_dir / CHECKPOINT_NAME
        if resume_path is None and existing.exists():
            raise FileExistsError(
                f"{existing} already exists; pass --resume to continue that run or choose another train.output_dir"
            )

    def _load(self, path: Path) -> dict[str, Any]:
        """Load the model, optimizer, probe, masker and RNG states of ``path``; returns the checkpoint (its
        ``step`` and ``loop`` window are the loop's to take)."""
        state = load_checkpoint_file(path, merge_shards=not self.sharded)
        for key in ("step",) if "sharded" in state else ("model", "optimizer", "step"):
            if key not in state:
                raise CheckpointError(f"{path} is not a mimkit training checkpoint (no {key!r})")
        saved = config_from_dict(state["config"]) if "config" in state else None
        differ = ", ".join(
            f"model.{key}: {value!r} in the checkpoint, {getattr(self.config.model, key)!r} here"
            for key, value in (vars(saved.model).items() if saved is not None else ())
            if value != getattr(self.config.model, key) and key not in TRAINING_CHOICES
        )
        if differ:
            raise CheckpointError(
                f"{path} was trained with another model ({differ}); resume with the run's own config "
                f"({path.parent / CONFIG_NAME}) or choose a new train.output_dir"
            )
        if self.sharded:
            state = {**state, **self._local_shards_of(path, state)}
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.last_loss = float(state.get("loss", math.nan))
        if self.online_probe is not None and self.probe_optimizer is not None:
            if "online_probe" in state:
                self.online_probe.load_state_dict(state["online_probe"]["model"])
                self.probe_optimizer.load_state_dict(state["online_probe"]["optimizer"])
            else:
                log.info("%s has no online probe; starting a fresh one at step %d", path, int(state["step"]))
        masker_state = state.get("masker")
        if masker_state is not None and isinstance(self.model.masker, StatefulMasker):
            inner = dict(masker_state["state"])
            if "exploitation_trigger" in masker_state:  # saved when the loop kept the trigger's window
                inner.setdefault("window", masker_state["exploitation_trigger"])
            self.model.masker.load_state_dict(inner)
        log_window = state.get("exploitation_log", (masker_state or {}).get("exploitation_log"))
        if log_window is not None:
            self.exploitation_log = torch.tensor(log_window, dtype=torch.float32)
        if "rng" in state:
            set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, int(state["step"]))
        return state

    def _local_shards_of(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's share of a checkpoint's model and optimizer, as DTensors placed like the sharded
        model's: straight from its shard file when the checkpoint was saved by as many ranks, else cut from
        the whole tensors."""
        info = state.get("sharded")
        if info is not None and info["world_size"] == self.place.world_size:
            pieces = load_checkpoint_file(shard_path(path.parent / info["dir"], self.place.rank))
        else:
            pieces = merged_sharded_state(path, state, "cpu") if info is not None else state
        model_like = self.model.state_dict()
        params = [param for group in self.optimizer.param_groups for param in group["params"]]
        optimizer = dict(pieces["optimizer"])
        optimizer["state"] = {
            index: {
                key: distributed.to_sharded_like(value, params[int(index)])
                if isinstance(value, torch.Tensor) and value.dim() > 0
                else value
                for key, value in per_param.items()
            }
            for index, per_param in pieces["optimizer"]["state"].items()
        }
        return {"model": distributed.to_sharded_like(pieces["model"], model_like), "optimizer": optimizer}

    def state_dict(self, window: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resume needs, as plain tensors and Python values; ``window``: the loop's logging window
        to save (default: this rank's own, :meth:`TrainLoop.state_dict`)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "name": "warmup_cosine",
                "base_lr": self.base_lr,
                "warmup_steps": self.warmup_steps,
                "total_steps": self.schedule_steps,
                "min_lr": self.config.optim.min_lr,
            },
            "step": self.step,
            "loss": self.last_loss,
            "epoch": self.step // self.steps_per_epoch,
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "model_args": dict(self.model.config),
            "loop": window if window is not None else self.loop.state_dict(),
        }
        if isinstance(self.model.masker, StatefulMasker):
            state["masker"] = {"state": self.model.masker.state_dict()}
        state["exploitation_log"] = self.exploitation_log.tolist()
        if self.online_probe is not None and self.probe_optimizer is not None:
            state["online_probe"] = {
                "model": self.online_probe.state_dict(),
                "optimizer": self.probe_optimizer.state_dict(),
            }
        return state

    def save(self, name: str = CHECKPOINT_NAME, window: dict[str, Any] | None = None) -> Path:
        """Write ``output_dir/name``; every rank calls it, rank 0 writes (with FSDP every rank writes its
        shards first, and ``last.pt`` naming them is replaced only once all are complete)."""
        path = self.out_dir / name
        if self.sharded:
            self._save_sharded(path, window)
        elif self.place.is_main:
            save_checkpoint(path, self.state_dict(window))
        return path

    def _save_step(self) -> Path:
        """What the loop saves after a step (every rank calls it): ``last.pt`` with the logging window every
        rank agrees on, and at the end of every ``train.keep_every_epochs``-th epoch a numbered copy."""
        window = self.loop.agreed_state_dict()
        path = self.save(window=window)
        if self._ends_epoch(self.step, self.config.train.keep_every_epochs):
            self.save(f"epoch_{self.step // self.steps_per_epoch:04d}.pt", window=window)
        return path

    def _save_sharded(self, path: Path, window: dict[str, Any] | None) -> None:
        folder = f"{SHARDS_DIR}/step_{self.step:08d}"
        state = self.state_dict(window)
        local, keys = distributed.local_shards({"model": state.pop("model"), "optimizer": state.pop("optimizer")})
        save_checkpoint(shard_path(self.out_dir / folder, self.place.rank), local)
        distributed.barrier()  # all shards complete before anything names them
        if self.place.is_main:
            state["sharded"] = {"dir": folder, "world_size": self.place.world_size, "keys": keys}
            save_checkpoint(path, state)
            remove_unreferenced_shards(self.out_dir)
        distributed.barrier()

    def evaluation_model(self) -> MaskedImageModel:
        """The trained model whole in this process, for pictures and probes on rank 0: the model itself,
        or for a sharded run a plain copy loaded from the last checkpoint."""
        if not self.sharded:
            return self.model
        model = build_model(self.config).to(self.device)
        model.load_state_dict(load_checkpoint_file(self.out_dir / CHECKPOINT_NAME)["model"])
        return model

    def lr_at(self, step: int) -> float:
        return warmup_cosine(
            step,
            base_lr=self.base_lr,
            total_steps=self.schedule_steps,
            warmup_steps=self.warmup_steps,
            min_lr=self.config.optim.min_lr,
        )

    def train_step(self, images_uint8: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step on a uint8 batch (B, C, H, W) through the loop (lr, clipping, logging, saves,
        stop signals); returns the detached mean loss.

        With the online probe on, ``labels`` (B,) also train the probe on the same augmented images after
        the update (see :meth:`probe_step`); the pretraining update does not depend on them.
        """
        return self.loop.run_update(partial(self._forward_backward, images_uint8, labels))

    def _forward_backward(self, images_uint8: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The step's augmentation, masks, exploitation measurement, and forward and backward passes (over
        ``optim.accum_steps`` micro-batches, DDP reducing once); returns the detached mean loss."""
        cfg = self.config
        seed, step, rank = cfg.train.seed, self.step, self.place.rank
        batch = images_uint8.shape[0]
        part = (rank * batch, self.place.world_size * batch)  # this rank's rows of the global batch
        # a custom augment that knows nothing of ranks still works in a single process
        share = {"part": part} if self.place.distributed else {}
        images = self.augment(
            images_uint8.to(self.device, non_blocking=True), generator=step_generator(seed, step, 0), **share
        )
        self._update_masker()
        with distributed.unsharded(self.model):
            mask = self._make_mask(images, part).to(self.device)
        if self._measures_exploitation() and step % cfg.mask.exploitation_every_steps == 0:
            with distributed.unsharded(self.model):
                rate = self.model.exploitation(images, mask)
            measured = distributed.all_reduce(torch.tensor([rate.visible, rate.mask, 1.0]))
            self.exploitation_log += measured
            if isinstance(self.model.masker, StatefulMasker) and self.model.masker.wants_exploitation:
                self.model.masker.observe_exploitation(*measured.tolist())
        torch.manual_seed(seed * 1_000_003 + step + rank * RANK_STRIDE)  # drop path and other global randomness
        accum = cfg.optim.accum_steps
        micro = batch // accum
        total = torch.zeros((), device=self.device)
        for index in range(accum):
            rows = slice(index * micro, (index + 1) * micro)
            last = index == accum - 1
            reduce_now = last or self.data_parallel is None  # DDP: all-reduce once, after the last
            with contextlib.nullcontext() if reduce_now else self.data_parallel.no_sync():
                with self.autocast():  # bf16 forward when configured; backward runs outside autocast
                    out = self.forward_model(images[rows], mask=mask.rows(rows))
                (out.loss.float() / accum).backward()
            total += out.loss.detach().float() / accum
        if self.online_probe is not None and labels is not None:
            self.probe_batch = (images, labels)
        return total

    def _after_update(self, loss: torch.Tensor) -> None:
        """After the optimizer step: the online probe's step on the updated encoder."""
        if self.probe_batch is not None:
            images, labels = self.probe_batch
            self.probe_batch = None
            self.probe_step(images, labels)

    def _after_step(self, step: int) -> None:
        """Reconstruction pictures of the held-aside images every ``preview_steps`` (rank 0)."""
        if self.previews is not None and step % self.preview_steps == 0:
            self.previews(self.model, step, self.logger)
            self.preview_seconds += self.previews.seconds[-1]
            self.last_log_time += self.previews.seconds[-1]  # img/s counts training time only

    def _log_extras(self, step: int, means: dict[str, float]) -> dict[str, Any]:
        """What a log step adds to the loop's loss and lr: throughput, epoch, picture time, the online
        probe's window and the exploitation rates measured since the last log."""
        now = time.perf_counter()
        world = self.place.world_size
        self.last_loss = means["loss"]
        steps = step - self.last_log_step
        metrics: dict[str, Any] = {
            "train/img_per_s": steps * self.config.train.batch_size * world / max(now - self.last_log_time, 1e-9),
            "epoch": step / self.steps_per_epoch,
        }
        self.last_log_step, self.last_log_time = step, now
        if self.preview_seconds:
            metrics["time/reconstruction_s"], self.preview_seconds = self.preview_seconds, 0.0
        if self.online_probe is not None:
            distributed.all_reduce(self.probe_running)
            probe_loss, probe_correct, probe_seen = self.probe_running.tolist()
            if probe_seen:
                metrics["probe/loss"] = probe_loss / probe_seen
                metrics["probe/acc"] = probe_correct / probe_seen
            self.probe_running.zero_()
        visible_sum, mask_sum, count = self.exploitation_log.tolist()
        if count:
            metrics["exploitation/visible"] = visible_sum / count
            metrics["exploitation/mask"] = mask_sum / count
            self.exploitation_log.zero_()
        return metrics

    def _make_mask(self, images: torch.Tensor, part: tuple[int, int]) -> Any:
        """This rank's masks. A masker that does not look at the images draws the masks of the whole
        global batch and this rank keeps its rows (so N ranks mask as one process); a guided masker masks
        this rank's images with a generator of the rank's own."""
        seed, step = self.config.train.seed, self.step
        offset, total = part
        batch = images.shape[0]
        masker = self.model.masker
        if not isinstance(masker, GuidedMasker) or masker.guidance is None:
            return self.model.make_mask(total, generator=step_generator(seed, step, 1)).rows(
                slice(offset, offset + batch)
            )
        return self.model.make_mask(batch, generator=step_generator(seed, step, 1, self.place.rank), images=images)

    def _measures_exploitation(self) -> bool:
        masker = self.model.masker
        return (isinstance(masker, StatefulMasker) and masker.wants_exploitation) or self.config.log.exploitation

    def _update_masker(self) -> None:
        """Tell a stateful masker (e.g. self-guided) where training stands; logs the step at which it switches
        to informed masks."""
        masker = self.model.masker
        if not isinstance(masker, StatefulMasker):
            return
        if masker.advance(step=self.step, total_steps=self.schedule_steps, steps_per_epoch=self.steps_per_epoch):
            epoch = self.step / self.steps_per_epoch
            log.info("informed masking starts at step %d (epoch %.2f)", self.step, epoch)
            self.logger.log(self.step, {"self_guided/switch_step": self.step, "self_guided/switch_epoch": epoch})

    def probe_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One step of the online linear probe on the class token of the (updated) encoder.

        Costs one extra unmasked encoder forward without gradients: it sees all L patches, four times the
        tokens of the masked forward at ratio 0.75 (+60% step time for ViT-Tiny with the micro decoder on
        CPU). It runs in eval mode (no drop path) on a forked RNG, and the probe has its own optimizer, so
        the pretraining weights and randomness are exactly what they are without it.

        Args:
            images: (B, C, H, W) the step's augmented, normalised images.
            labels: (B,) int64 class indices.
        """
        assert self.online_probe is not None and self.probe_optimizer is not None
        encoder = self.model.encoder
        was_training = encoder.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), distributed.unsharded(self.model):
            encoder.eval()
            try:
                features = encoder.forward_features(images, pool="cls")  # type: ignore[operator]  # (B, D)
            finally:
                encoder.train(was_training)
        labels = labels.to(self.device, non_blocking=True)
        assert self.probe_forward is not None
        logits = self.probe_forward(features)  # (B, num_classes)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        self.probe_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.probe_optimizer.step()
        correct = (logits.detach().argmax(dim=1) == labels).sum()
        self.probe_running += torch.stack(
            [loss.detach() * labels.numel(), correct.float(), logits.new_tensor(labels.numel())]
        )

    def fit(self) -> PretrainResult:
        """Train until ``total_steps``; checkpoints, logs and a progress bar along the way."""
        cfg = self.config
        start_step = self.step
        self.last_log_step, self.last_log_time = self.step, time.perf_counter()
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            stack.callback(self.logger.close)
            stack.enter_context(self.loop)
            while not self.loop.done:
                epoch = self.step // self.steps_per_epoch
                self.loader.set_epoch(epoch)
                start_batch = self.step - epoch * self.steps_per_epoch
                for images, labels in self.loader.iter_from(start_batch):
                    self.train_step(images, labels)
                    if self.loop.done:
                        break
            if self.step > start_step:
                self.loop.checkpoint()  # the last step's, after the NaN/inf check
        seconds = time.perf_counter() - started
        images_seen = (self.step - start_step) * cfg.train.batch_size * self.place.world_size
        return PretrainResult(
            output_dir=self.out_dir,
            checkpoint=self.out_dir / CHECKPOINT_NAME,
            steps=self.step,
            final_loss=self.last_loss,
            images_per_second=images_seen / max(seconds, 1e-9),
            seconds=seconds,
            num_skipped_images=self.dataset.num_skipped,
        )


def pretrain(config: Config, resume: bool | str = False) -> PretrainResult:
    """Build and run a :class:`Pretrainer`."""
    return Pretrainer(config, resume=resume).fit()
