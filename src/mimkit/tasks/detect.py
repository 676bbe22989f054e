"""Detection fine-tuning and evaluation: ``mimkit detect-train`` and ``mimkit detect-eval``.

A run loads a pretrained encoder (mimkit, original MAE or HuggingFace checkpoint, through
:func:`mimkit.checkpoints.load.load_checkpoint`), wraps it in a multi-scale backbone
(:mod:`mimkit.dense.models.backbones`), assembles torchvision's Mask R-CNN on it
(:func:`~mimkit.dense.models.maskrcnn.build_detector`) and trains with AdamW, layer-wise lr decay on the
encoder, linear warmup then cosine. It writes ``last.pt``, ``config.yaml``, ``metrics.jsonl``,
``results.json`` (COCO box and mask AP on the validation folder) and ``predictions.png``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import torch
import yaml
from torch import Tensor, nn

from mimkit.config import ConfigError, ModelConfig
from mimkit.dense.data.coco import CocoDetection
from mimkit.dense.evaluation.coco_ap import coco_evaluate, predict, save_prediction_grid
from mimkit.dense.models.backbones import FILLS, P5_POOLS, STEMS, ConvMAEBackbone, FPNBackbone, MIMDetBackbone
from mimkit.dense.models.maskrcnn import build_detector
from mimkit.engine.run_guard import check_input_path, holding_run_lock
from mimkit.eval.finetune import layer_decay_groups
from mimkit.models.convvit import ConvViT
from mimkit.models.mae_decoder import MAEDecoder
from mimkit.models.mim import MaskedImageModel
from mimkit.models.vit import VisionTransformer

if TYPE_CHECKING:
    from mimkit.tasks.segment import SegConfig

log = logging.getLogger(__name__)
C = TypeVar("C")  # a command's config schema

BACKBONES = ("mimdet", "convmae")
STEM_CHANNELS_ONLY = "sets the side stem of model.stem=patch_embed; the ConvStem's widths follow the encoder"
# what a checkpoint's model section meant before it recorded these keys: the pretrained patch embedding
# with a side stem, and a max-pooled 1/32 level
LEGACY_MIMDET = {"stem": "patch_embed", "p5_pool": "max"}


def with_legacy_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A saved run config (plain dict) with :data:`LEGACY_MIMDET` filled in where its model section lacks
    ``stem``: checkpoints written before the ConvStem was the ViT's input load as they were trained."""
    model = config.get("model")
    if not isinstance(model, dict) or "stem" in model:
        return config
    return {**config, "model": {**LEGACY_MIMDET, **model}}


@dataclass
class BackboneConfig:
    """The ``model`` keys detection and segmentation share: the backbone, where its encoder comes from, MIMDet's
    options, the input side and normalization. A task's model section derives from it, adds its head's keys
    and sets its own defaults and :attr:`BACKBONES`; :meth:`checks` holds the rules of these keys for both."""

    BACKBONES: ClassVar[tuple[str, ...]] = BACKBONES  # the values model.backbone takes

    backbone: str = "mimdet"  # mimdet (a ViT checkpoint) or convmae (a ConvMAE checkpoint)
    checkpoint: str | None = None  # pretrained encoder; None: the `encoder` section, randomly initialized
    random_init: bool = False  # the checkpoint's architecture untrained (the baseline)
    sample_ratio: float = 0.5  # MIMDet: fraction of patch tokens the ViT sees in training (1.0: all)
    fill: str = "decoder"  # MIMDet: unsampled positions of the 1/16 map from the MAE decoder or a mask_token
    stem: str = "conv"  # MIMDet's ConvStem as the ViT's input; patch_embed: pretrained patch embedding + side stem
    stem_channels: tuple[int, int] | None = None  # stem=patch_embed: side stem (C4, C8); None: the ConvStem's
    p5_pool: str = "avg"  # MIMDet: 1/32 level by parameter-free 2x2 average (or max) pooling of the 1/16 one
    drop_path: float = 0.0
    img_size: int | None = None  # input side; None: the encoder's pretraining img_size (position tables follow)
    mean: tuple[float, ...] | None = None  # normalization; None: the pretraining run's (or the folder default)
    std: tuple[float, ...] | None = None

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, key, message) of every rule on these keys, for the detection and segmentation configs."""
        m = self
        return [
            (m.backbone in m.BACKBONES, "model.backbone", f"must be one of {m.BACKBONES}"),
            (0 < m.sample_ratio <= 1, "model.sample_ratio", "must lie in (0, 1] (MIMDet samples 0.25 to 0.5)"),
            (m.fill in FILLS, "model.fill", f"must be one of {FILLS}"),
            (m.stem in STEMS, "model.stem", f"must be one of {STEMS}"),
            (m.stem == "patch_embed" or m.stem_channels is None, "model.stem_channels", STEM_CHANNELS_ONLY),
            (m.p5_pool in P5_POOLS, "model.p5_pool", f"must be one of {P5_POOLS}"),
            (0 <= m.drop_path < 1, "model.drop_path", "must lie in [0, 1)"),
            (m.img_size is None or m.img_size > 0, "model.img_size", "must be positive"),
            (not m.random_init or m.checkpoint is not None, "model.random_init", "needs model.checkpoint"),
        ]


@dataclass
class DetectModelConfig(BackboneConfig):
    """The detector: the backbone and its encoder (:class:`BackboneConfig`), FPN and head sizes."""

    fpn_channels: int = 64
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64)
    box_head_dim: int = 256
    masks: bool = True  # Mask R-CNN; false: Faster R-CNN for box-only data (e.g. imported VOC)
    score_threshold: float = 0.05


@dataclass
class DetectDataConfig:
    """COCO-format folders (see :class:`~mimkit.dense.data.coco.CocoDetection`)."""

    train: str = "runs/detection/shapes_train"
    train_annotations: str | None = None
    val: str | None = None
    val_annotations: str | None = None
    hflip: bool = True
    train_limit: int | None = None
    val_limit: int | None = None


@dataclass
class DetectTrainConfig:
    """Optimization and outputs."""

    epochs: int = 12
    max_steps: int | None = None  # stop after this many steps (the schedule is laid out over them)
    batch_size: int = 8
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: int = 50
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    clip_grad: float | None = 5.0
    output_dir: str = "runs/detect"
    seed: int = 0
    num_threads: int | None = None
    progress: bool = True
    log_every_steps: int = 10
    tensorboard: bool = True
    save_every_steps: int | None = 100  # rewrite last.pt this often, so a killed run resumes (--resume)

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, key, message) of every rule on this section, for the detection and segmentation configs."""
        t = self
        return [
            (t.epochs >= 1, "train.epochs", "must be >= 1"),
            (t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1"),
            (t.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (t.lr > 0, "train.lr", "must be positive"),
            (0 < t.layer_decay <= 1, "train.layer_decay", "must lie in (0, 1]"),
            (t.clip_grad is None or t.clip_grad > 0, "train.clip_grad", "must be positive (or null)"),
            (t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1"),
        ]


@dataclass
class DetectEvalConfig:
    """The evaluation at the end of training."""

    batch_size: int = 8
    num_pictures: int = 8
    picture_score_threshold: float = 0.5


@dataclass
class DetectConfig:
    """A detection run; ``mimkit detect-train`` takes dotted overrides of these keys."""

    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    encoder: ModelConfig = field(default_factory=ModelConfig)  # used only without model.checkpoint
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)
    eval: DetectEvalConfig = field(default_factory=DetectEvalConfig)

    def validate(self) -> DetectConfig:
        """Raise :class:`~mimkit.config.ConfigError` naming the first bad key."""
        m = self.model
        checks = [
            *m.checks(),
            (len(m.anchor_sizes) == 4, "model.anchor_sizes", "needs one size per pyramid level (4)"),
            *self.train.checks(),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")
        return self


@dataclass
class Pretrained:
    """The pretraining model the detector starts from, and how its images were normalized."""

    model: MaskedImageModel
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # the checkpoint path, "random init of <path>" or "random init"


def load_pretrained(
    checkpoint: str | None,
    *,
    random_init: bool = False,
    encoder: ModelConfig | None = None,
    seed: int = 0,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    img_size: int | None = None,
) -> Pretrained:
    """The encoder (and MAE decoder) a dense model starts from.

    Args:
        checkpoint: a checkpoint of any layout :func:`~mimkit.checkpoints.load.load_checkpoint` reads, or None
            for ``encoder`` untrained.
        random_init: the checkpoint's architecture untrained (the baseline), seeded by ``seed``.
        encoder: the architecture without a checkpoint (the pretraining config's ``model`` section).
        seed: seed of random initializations.
        mean, std: normalization; None: the pretraining run's, else the image-folder default.
        img_size: the input side, when it is not the pretraining one: a multiple of the patch size (the
            total stride for ConvMAE); the fixed sin-cos position tables are recomputed for the new grid.
    """
    from mimkit.build import load_checkpoint
    from mimkit.config import Config, model_overrides
    from mimkit.data.transforms import default_normalization
    from mimkit.eval.data import untrained_model

    if checkpoint is not None:
        model = load_checkpoint(checkpoint)
        run_config = model.run_config
        if run_config is not None:
            default_mean, default_std = run_config.normalization()
        else:
            default_mean, default_std = default_normalization(int(model.config["in_chans"]), "folder")
        source = checkpoint
        if random_init:
            model = untrained_model(model.config, seed)
            source = f"random init of {checkpoint}"
    else:
        encoder = encoder or ModelConfig()
        args = {"name": encoder.name, **model_overrides(Config(model=encoder))}
        model = untrained_model(args, seed)
        default_mean, default_std = default_normalization(encoder.in_chans, "folder")
        source = "random init"
    if img_size is not None and img_size != int(model.config["img_size"]):
        try:
            model.set_img_size(img_size)
        except ValueError as err:
            raise ConfigError(f"model.img_size: {err}") from None
    return Pretrained(model, tuple(mean or default_mean), tuple(std or default_std), source)


def check_data_paths(config: DetectConfig | SegConfig) -> None:
    """Fail before any data loads, naming the key, when a data path of the run does not exist."""
    paths = {"data.train": config.data.train, "data.val": config.data.val}
    if isinstance(config, DetectConfig):
        paths |= {"data.train_annotations": config.data.train_annotations}
        paths |= {"data.val_annotations": config.data.val_annotations}
    for key, path in paths.items():
        if path is not None:
            check_input_path(path, key, "any")


def pretrained_for(config: DetectConfig | SegConfig) -> Pretrained:
    """:func:`load_pretrained` with a detection or segmentation config's settings."""
    m = config.model
    if m.checkpoint is not None:
        check_input_path(m.checkpoint, "model.checkpoint", "any")
    return load_pretrained(
        m.checkpoint,
        random_init=m.random_init,
        encoder=config.encoder,
        seed=config.train.seed,
        mean=m.mean,
        std=m.std,
        img_size=m.img_size,
    )


def mimdet_body(encoder: VisionTransformer, decoder: MAEDecoder | None, m: BackboneConfig) -> MIMDetBackbone:
    """:class:`MIMDetBackbone` with a detection or segmentation config's ``model`` keys; a bad stem for this
    encoder is a :class:`~mimkit.config.ConfigError` naming ``model.stem``."""
    try:
        return MIMDetBackbone(
            encoder,
            decoder,
            sample_ratio=m.sample_ratio,
            fill=m.fill,
            stem=m.stem,
            stem_channels=m.stem_channels,
            p5_pool=m.p5_pool,
        )
    except ValueError as err:
        if "model.stem" in str(err):
            raise ConfigError(str(err)) from None
        raise


def build_detection_model(pretrained: Pretrained, config: DetectConfig, num_classes: int) -> nn.Module:
    """Mask R-CNN (or Faster R-CNN) on the backbone ``model.backbone`` around the pretrained encoder."""
    m = config.model
    encoder = cast(VisionTransformer | ConvViT, pretrained.model.encoder)
    body: MIMDetBackbone | ConvMAEBackbone
    if m.backbone == "convmae":
        if not isinstance(encoder, ConvViT):
            raise ValueError(f"model.backbone=convmae needs a ConvMAE checkpoint, got a {type(encoder).__name__}")
        body = ConvMAEBackbone(encoder)
    else:
        if isinstance(encoder, ConvViT):
            raise ValueError("this checkpoint is a ConvMAE encoder; set model.backbone=convmae")
        decoder = pretrained.model.decoder if isinstance(pretrained.model.decoder, MAEDecoder) else None
        if m.fill == "decoder" and decoder is None:
            raise ValueError("model.fill=decoder needs an MAE decoder in the checkpoint; set model.fill=mask_token")
        body = mimdet_body(encoder, decoder, m)
    if m.drop_path > 0:
        encoder.set_drop_path_rate(m.drop_path)
    height, width = body.img_size
    if height != width:
        raise ValueError(f"the encoder takes {height}x{width} images; detection needs a square img_size")
    return build_detector(
        FPNBackbone(body, m.fpn_channels),
        num_classes,
        img_size=height,
        mean=pretrained.mean,
        std=pretrained.std,
        masks=m.masks,
        anchor_sizes=m.anchor_sizes,
        box_head_dim=m.box_head_dim,
        score_threshold=m.score_threshold,
    )


def detector_encoder(detector: nn.Module) -> nn.Module:
    """The pretrained encoder inside a detector built by :func:`build_detection_model`."""
    return detector.backbone.body.encoder  # type: ignore[union-attr, return-value]


def _hflip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def open_dataset(
    root: str, annotations: str | None, *, img_size: int, in_chans: int, masks: bool, limit: int | None
) -> CocoDetection:
    """A :class:`CocoDetection` at the detector's resolution, the first ``limit`` images only when given."""
    dataset = CocoDetection(root, annotations, img_size=img_size, in_chans=in_chans, masks=masks)
    if limit is not None:
        dataset.records = dataset.records[:limit]
        dataset.report.num_images = len(dataset.records)
        dataset.report.num_annotations = sum(len(record.annotations) for record in dataset.records)
    return dataset


BatchLoss = Callable[[list[int], torch.Generator], tuple[Tensor, dict[str, Tensor]]]


def fit(
    model: nn.Module,
    encoder: nn.Module,
    num_samples: int,
    batch_loss: BatchLoss,
    t: DetectTrainConfig,
    *,
    out_dir: Path,
    desc: str,
    progress: bool = True,
    checkpoint_extra: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training loop of detection and segmentation, resumable, saving ``out_dir/last.pt``.

    Every step takes ``batch_size`` sample indices in a seeded order (a shorter last batch is kept) and
    ``batch_loss(indices, generator)`` gives the loss to minimize and its named terms (the generator is
    the data's random source, e.g. for flips). AdamW with layer-wise lr decay on ``encoder``; the lr of each
    group is ``lr_scale * warmup_cosine(step)``.

    ``last.pt`` is rewritten atomically every ``train.save_every_steps`` steps and at the end, with
    everything a resume needs (weights, optimizer, step, the epoch's order and position, the data and global
    RNG states) plus ``checkpoint_extra``; ``resume`` (such a checkpoint) continues exactly where it was
    written, ending with the weights of a run never interrupted. SIGTERM or SIGINT finish the step, write
    ``last.pt`` and raise :class:`~mimkit.engine.run_guard.TrainingInterrupted`.

    Returns:
        ``steps``, ``seconds``, ``img_per_s``, ``resumed_at``, ``final_loss`` (mean of the last logging
        window) and ``losses`` (the mean of each loss term over that window).
    """
    from mimkit.engine.logging import MetricsLogger
    from mimkit.engine.loop import TrainLoop
    from mimkit.engine.rng import rng_state, set_rng_state
    from mimkit.engine.schedule import warmup_cosine
    from mimkit.files import save_checkpoint

    generator = torch.Generator().manual_seed(t.seed)
    total_steps = t.max_steps or t.epochs * math.ceil(num_samples / t.batch_size)
    groups = layer_decay_groups(model, t.weight_decay, t.layer_decay, encoder=encoder)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999))
    step, seen = 0, 0
    order: list[int] = []  # the current epoch's sample order and how far into it training is
    position = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step, order, position = int(resume["step"]), resume["order"].tolist(), int(resume["position"])
        generator.set_state(resume["generator"])
        set_rng_state(resume["rng"])
    metrics = MetricsLogger(out_dir, tensorboard=t.tensorboard, resume_step=step if resume is not None else None)
    model.train()
    first_step = step
    start = time.perf_counter()

    def save() -> Path:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": loop.step,
            "order": torch.tensor(order, dtype=torch.int64),
            "position": position,
            "generator": generator.get_state(),
            "rng": rng_state(),
            "losses": loop.last,
            "loop": loop.state_dict(),
            **(checkpoint_extra or {}),
        }
        save_checkpoint(out_dir / "last.pt", state)
        return out_dir / "last.pt"

    def count(loss: Tensor) -> None:
        nonlocal seen
        seen += len(indices)

    loop = TrainLoop(
        optimizer,
        partial(warmup_cosine, base_lr=t.lr, total_steps=total_steps, warmup_steps=t.warmup_steps, min_lr=t.min_lr),
        total_steps=total_steps,
        task=desc,
        lower="train.lr or set train.clip_grad",
        params=model.parameters(),
        clip_grad=t.clip_grad,
        step=step,
        progress=progress,
        metrics=metrics,
        log_every_steps=t.log_every_steps,
        on_update=count,
        on_log=lambda _, __: {"train/img_per_s": seen / (time.perf_counter() - start)},
        save=save,
        save_every_steps=t.save_every_steps,
    )
    if resume is not None:
        loop.load_state_dict(resume.get("loop", {"last": resume.get("losses", {})}))
    try:
        with loop:
            while not loop.done:
                if position >= len(order):  # a new epoch
                    order, position = torch.randperm(num_samples, generator=generator).tolist(), 0
                indices = order[position : position + t.batch_size]
                position += t.batch_size
                loop.run_step(partial(batch_loss, indices, generator))
    finally:
        metrics.close()
    seconds = time.perf_counter() - start
    save()
    return {
        "steps": loop.step,
        "seconds": seconds,
        "img_per_s": seen / max(seconds, 1e-9),
        "resumed_at": first_step if resume is not None else None,
        "final_loss": loop.last.get("loss", math.nan),
        "losses": loop.last,
    }


def train_detector(
    detector: nn.Module,
    dataset: CocoDetection,
    config: DetectConfig,
    *,
    out_dir: Path,
    progress: bool = True,
    checkpoint_extra: dict[str, Any] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``detector`` on ``dataset`` through :func:`fit`: each image is flipped with probability 0.5
    (``data.hflip``) and the loss is the sum of torchvision's terms (RPN objectness and box, box
    classification and regression, mask)."""

    def batch_loss(indices: list[int], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        images, targets = [], []
        for index in indices:
            image, target = dataset[index]
            if config.data.hflip and torch.rand((), generator=generator) < 0.5:
                image, target = _hflip(image, target)
            images.append(image.float() / 255)
            targets.append(target)
        losses = detector(images, targets)
        return sum(losses.values()), losses  # type: ignore[return-value]

    return fit(
        detector,
        detector_encoder(detector),
        len(dataset),
        batch_loss,
        config.train,
        out_dir=out_dir,
        desc="detection",
        progress=progress,
        checkpoint_extra=checkpoint_extra,
        resume=resume,
    )


def evaluate_detector(
    detector: nn.Module, dataset: CocoDetection, out_dir: Path, config: DetectEvalConfig, *, progress: bool = True
) -> dict[str, Any]:
    """COCO AP on ``dataset`` (see :func:`~mimkit.dense.evaluation.coco_ap.coco_evaluate`), ``predictions.png``
    in ``out_dir``, and the eval throughput."""
    start = time.perf_counter()
    outputs = predict(detector, dataset, batch_size=config.batch_size, progress=progress)
    seconds = time.perf_counter() - start
    results = coco_evaluate(dataset, outputs)
    picture = save_prediction_grid(
        dataset,
        outputs,
        out_dir / "predictions.png",
        num_images=config.num_pictures,
        score_threshold=config.picture_score_threshold,
    )
    return {
        **results,
        "eval_img_per_s": len(dataset) / seconds,
        "num_images": len(dataset),
        "predictions_png": str(picture),
    }


def open_run(out_dir: Path, recipe: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (``resume``), or None for a new run; a run is never overwritten.

    Raises:
        FileExistsError: ``out_dir`` holds a run and ``resume`` is off.
        CheckpointError: nothing (or nothing resumable) to resume.
        ValueError: the checkpoint was trained with another ``recipe`` (the keys are named).
    """
    from mimkit.files import CheckpointError, load_checkpoint_file

    path = out_dir / "last.pt"
    if not resume:
        if path.exists():
            raise FileExistsError(
                f"{path} exists; pass --resume to continue that run or choose a new train.output_dir "
                "(a run is never overwritten)"
            )
        return None
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    state = load_checkpoint_file(path)
    if "order" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a resumable checkpoint of this command")
    differ = _recipe_changes(with_legacy_defaults(state["config"]), recipe)
    if differ:
        raise ValueError(
            f"{path} was trained with another recipe ({differ}); resume with the run's own "
            f"{out_dir}/config.yaml or choose a new train.output_dir"
        )
    return state


@holding_run_lock(lambda config, **_: config.train.output_dir, "train.output_dir")
def run_detect_train(config: DetectConfig, *, progress: bool | None = None, resume: bool = False) -> dict[str, Any]:
    """``mimkit detect-train``: load, build, train, evaluate on ``data.val``; write everything to ``train.output_dir``.

    ``resume`` continues the run in ``train.output_dir`` from its ``last.pt`` (same recipe; the keys that
    only change how it runs, such as ``train.progress``, may differ). The run directory is locked against
    a second writer while this runs (:class:`~mimkit.engine.run_guard.RunLock`).

    Returns:
        The results written to ``results.json``.
    """
    from mimkit.config import to_plain
    from mimkit.eval.report import write_results

    t = config.train
    out_dir = Path(t.output_dir)
    state = open_run(out_dir, to_plain(config), resume)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    progress = t.progress if progress is None else progress
    torch.manual_seed(t.seed)
    pretrained = pretrained_for(config)
    check_data_paths(config)
    model_config = dict(pretrained.model.config)
    img_size, in_chans = int(model_config["img_size"]), int(model_config["in_chans"])
    masks = config.model.masks
    train_set = open_dataset(
        config.data.train,
        config.data.train_annotations,
        img_size=img_size,
        in_chans=in_chans,
        masks=masks,
        limit=config.data.train_limit,
    )
    val_set = None
    if config.data.val is not None:
        val_set = open_dataset(
            config.data.val,
            config.data.val_annotations,
            img_size=img_size,
            in_chans=in_chans,
            masks=masks,
            limit=config.data.val_limit,
        )
        if val_set.classes != train_set.classes:
            raise ValueError(
                f"the validation classes {val_set.classes} differ from the training classes {train_set.classes}"
            )
    detector = build_detection_model(pretrained, config, len(train_set.classes))
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = to_plain(config)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    extra = {
        "config": plain,
        "encoder_config": model_config,
        "classes": list(train_set.classes),
        "mean": list(pretrained.mean),
        "std": list(pretrained.std),
    }
    summary = train_detector(
        detector, train_set, config, out_dir=out_dir, progress=progress, checkpoint_extra=extra, resume=state
    )
    results: dict[str, Any] = {
        "pretrained": pretrained.source,
        "backbone": config.model.backbone,
        "sample_ratio": config.model.sample_ratio if config.model.backbone == "mimdet" else None,
        "stem": config.model.stem if config.model.backbone == "mimdet" else None,
        "train": summary,
        "train_annotations": train_set.report.to_dict(),
        "parameters": sum(p.numel() for p in detector.parameters()),
    }
    if val_set is not None:
        results["val"] = evaluate_detector(detector, val_set, out_dir, config.eval, progress=progress)
        results["val_annotations"] = val_set.report.to_dict()
    write_results(out_dir / "results.json", results)
    return results


RUNTIME_KEYS = ("progress", "num_threads", "tensorboard", "log_every_steps", "save_every_steps")


def _recipe_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> str:
    """``key: saved -> current`` for every recipe key that differs, except :data:`RUNTIME_KEYS`."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _recipe_changes(a, b, f"{prefix}{key}.")
            changes += [inner] if inner else []
        elif a != b and key not in RUNTIME_KEYS:
            changes.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} here")
    return ", ".join(changes)


def read_trained_checkpoint(path: str | Path, schema: type[C], command: str) -> tuple[C, Pretrained, dict[str, Any]]:
    """What a ``detect-train`` or ``seg-train`` checkpoint holds: its config (as ``schema``), the encoder it
    was built on (untrained: the saved weights replace it) and the checkpoint dict (``model``, ``classes``,
    ``encoder_config``, ``mean``, ``std``, ...).

    Raises:
        CheckpointError: ``path`` is not a checkpoint of ``command`` (the missing entries are named).
    """
    from mimkit.config import from_dict
    from mimkit.eval.data import untrained_model
    from mimkit.files import CheckpointError, load_checkpoint_file

    state = load_checkpoint_file(path)
    missing = [key for key in ("model", "config", "encoder_config", "classes", "mean", "std") if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a {command} checkpoint (no {', '.join(missing)})")
    config = from_dict(schema, with_legacy_defaults(state["config"])).validate()
    pretrained = Pretrained(
        untrained_model(state["encoder_config"], 0), tuple(state["mean"]), tuple(state["std"]), str(path)
    )
    return config, pretrained, state


def load_detector(path: str | Path) -> tuple[nn.Module, DetectConfig, dict[str, Any]]:
    """A detector saved by ``detect-train`` (``last.pt``, eval mode), its config, and the checkpoint dict
    (``classes``, ``encoder_config``, ``mean``, ``std``, ...)."""
    config, pretrained, state = read_trained_checkpoint(path, DetectConfig, "detect-train")
    detector = build_detection_model(pretrained, config, len(state["classes"]))
    detector.load_state_dict(state["model"])
    return detector.eval(), config, state


def run_detect_eval(
    checkpoint: str | Path,
    data: str | Path,
    *,
    annotations: str | Path | None = None,
    out_dir: str | Path,
    limit: int | None = None,
    picture_score_threshold: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``mimkit detect-eval``: COCO box/mask AP of a trained detector on a COCO folder, ``results.json`` and
    ``predictions.png`` (detections scoring at least ``picture_score_threshold``, default the run's) in
    ``out_dir``."""
    from mimkit.eval.report import write_results

    detector, config, state = load_detector(checkpoint)
    if picture_score_threshold is not None:
        config.eval.picture_score_threshold = picture_score_threshold
    model_config = state["encoder_config"]
    dataset = open_dataset(
        str(data),
        None if annotations is None else str(annotations),
        img_size=int(model_config["img_size"]),
        in_chans=int(model_config["in_chans"]),
        masks=config.model.masks,
        limit=limit,
    )
    if dataset.classes != list(state["classes"]):
        raise ValueError(f"{data} has classes {dataset.classes}, the detector was trained on {state['classes']}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        **evaluate_detector(detector, dataset, out_dir, config.eval, progress=progress),
        "annotations": dataset.report.to_dict(),
    }
    write_results(out_dir / "results.json", results)
    return results


def training_lines(results: dict[str, Any]) -> list[str]:
    """The terminal lines of a run's training part (none for an evaluation alone)."""
    if "train" not in results:
        return []
    train = results["train"]
    return [
        f"pretrained      {results['pretrained']} ({results['backbone']})",
        f"trained         {train['steps']} steps in {train['seconds']:.0f} s ({train['img_per_s']:.1f} img/s), "
        f"final loss {train['final_loss']:.3f}",
    ]


def format_detection(results: dict[str, Any]) -> str:
    """A few lines for the terminal: AP of boxes and masks, throughput."""
    lines = training_lines(results)
    val = results.get("val", results if "box" in results else None)
    if val is not None:
        for kind in ("box", "mask"):
            if kind in val:
                ap = val[kind]
                scores = f"{ap['AP']:.1f}  (AP50 {ap['AP50']:.1f}, AP75 {ap['AP75']:.1f})"
                lines.append(f"{kind + ' AP':<16}{scores} on {val['num_images']} images")
        lines.append(f"predictions     {val['predictions_png']}")
    return "\n".join(lines)
