"""Pretraining's config schema (``mimkit pretrain``): the model, masking, target, data, optimizer, run, logging
and end-of-run checks of a run, their cross-field validation, and the keyword arguments they give
``create_model``."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mimkit.config.loader import ConfigError, from_dict, to_plain
from mimkit.config.loader import load_config as load_schema

SchemaT = typing.TypeVar("SchemaT")


@dataclass
class ModelConfig:
    """Architecture. ``None`` fields take the preset of ``name`` / ``decoder``."""

    name: str = "vit_tiny"
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    decoder: str = "tiny"
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    # recompute each block in the backward pass instead of keeping its activations (less memory, ~25% slower
    # steps); a training choice, not part of the architecture: a run may resume with it switched
    grad_checkpointing: bool = False
    # ConvMAE (convmae_*): per-stage widths, depths and downsampling (patch_size is then their product's
    # business, not a key), depthwise kernel of the conv blocks, multi-scale fusion into the decoder
    embed_dims: tuple[int, ...] | None = None
    depths: tuple[int, ...] | None = None
    patch_sizes: tuple[int, ...] | None = None
    kernel_size: int | None = None
    fuse: bool | None = None
    # MaskDistill's unified view: what the encoder sees when masked ("visible": MAE; "all": BEiT, every patch with
    # the hidden ones as a learned mask embedding) and the head that predicts the target ("mae": MAE's decoder,
    # "prompting": MILAN's, "linear": BEiT's FC layer). null: the target's recipe (resolved_design)
    encoder_sees: str | None = None
    head: str | None = None


@dataclass
class BlockMaskConfig:
    """``mask.block``: BEiT's rectangles (:class:`~mimkit.masking.BlockMasker`)."""

    min_num_patches: int = 4  # smallest rectangle, in patches
    min_aspect: float = 0.3
    max_aspect: float | None = None  # null: 1 / min_aspect


@dataclass
class GridMaskConfig:
    """``mask.grid``: one kept patch per 2x2 cell (:class:`~mimkit.masking.GridMasker`)."""

    random_offset: bool = False  # a random kept position per image instead of the top-left one


@dataclass
class AttentionMaskConfig:
    """``mask.attention``: AttMask / MILAN (:class:`~mimkit.masking.AttentionMasker`)."""

    mode: str = "hide"  # hide (AttMask) or keep (MILAN) the most-attended patches
    temperature: float = 1.0  # of the sampling; 0: deterministic
    source: str = "encoder"  # whose attention: the encoder being trained, or the teacher's saliency


@dataclass
class SelfGuidedMaskConfig:
    """``mask.self_guided``: Self-Guided MAE (:class:`~mimkit.masking.SelfGuidedMasker`)."""

    # hints revealed from the hidden cluster, decaying linearly to the end
    hint_ratio: float = 0.1
    hint_ratio_end: float = 0.0
    # switch to informed masks when the decoder's exploitation rate of mask tokens rises above that of visible
    # tokens (after having been below, for trigger_patience consecutive checks), or at an epoch
    trigger: str = "exploitation"
    trigger_patience: int = 1
    start_epoch: float | None = None
    # which layer's features are clustered: encoder on all patches (ideal) or decoder after a random-masked
    # pass (practical; on Fashion-MNIST its cut splits visible from mask tokens, not object from background)
    layer: int | None = None
    setting: str = "ideal"
    # Ncut graph (weighted cosine similarities, or TokenCut's binarised at tau), object side, hint choice
    graph: str = "weighted"
    foreground: str = "border"
    tau: float = 0.2
    hint_choice: str = "random"
    # check the trigger every N steps (null: every epoch)
    trigger_every_steps: int | None = None


# mask.type -> its section of MaskConfig, whose fields are that masker's constructor arguments besides the ratio
# (random and fine_random have none: fine_random's cell factor comes from the model)
MASK_SECTIONS: dict[str, type] = {
    "block": BlockMaskConfig,
    "grid": GridMaskConfig,
    "attention": AttentionMaskConfig,
    "self_guided": SelfGuidedMaskConfig,
}


@dataclass
class MaskConfig:
    """Which patches are hidden: what every masker shares, and one section per masker type with that masker's own
    options (``mask.block.min_num_patches``). Only the section of ``type`` is used; the others are kept as set."""

    type: str = "random"  # on the encoder's patch grid (ConvMAE: stage 3, upsampled: its block-wise masking)
    ratio: float = 0.75
    # measure the decoder's exploitation rate on one batch every N steps (self_guided's trigger, log.exploitation)
    exploitation_every_steps: int = 10
    block: BlockMaskConfig = field(default_factory=BlockMaskConfig)
    grid: GridMaskConfig = field(default_factory=GridMaskConfig)
    attention: AttentionMaskConfig = field(default_factory=AttentionMaskConfig)
    self_guided: SelfGuidedMaskConfig = field(default_factory=SelfGuidedMaskConfig)

    # the flat keys of configs written before the sections -> where they live now (see nest_mask_keys)
    MOVED_KEYS: typing.ClassVar[dict[str, str]] = {
        name: f"{section}.{name}"
        for section, options in MASK_SECTIONS.items()
        for name in (f.name for f in fields(options))
    }

    def section(self) -> Any | None:
        """The options section of ``type``, or None for a masker without options (random, fine_random)."""
        return getattr(self, self.type) if self.type in MASK_SECTIONS else None


@dataclass
class TeacherConfig:
    """``target.teacher``: the frozen teacher of ``maskdistill`` and ``milan``. ``spec``, ``stage`` and
    ``input_size`` are the arguments of :func:`~mimkit.targets.build_teacher`; ``cache`` is the folder of the
    target's :class:`~mimkit.targets.FeatureCache`. ``mimkit tokenizer-train``'s ``teacher`` section is this one
    with a default spec (:class:`~mimkit.tasks.tokenizer.TokenizerTeacherConfig`)."""

    # efficientnet_lite0, a mimkit checkpoint path, timm:NAME@FILE or hf_clip:DIR; null: no teacher
    spec: str | None = None
    stage: int | None = None  # EfficientNet-Lite0 / timm stage whose map is the target; null: the teacher's
    input_size: int | None = None  # side images are resized to for the teacher; null: the teacher's
    cache: str | None = None  # keep the teacher's features on disk (small data, no augmentation)

    def options(self) -> dict[str, int] | None:
        """The set ``stage`` and ``input_size`` as :func:`~mimkit.targets.build_teacher` options, or None
        without a teacher."""
        if self.spec is None:
            return None
        options = {"stage": self.stage, "input_size": self.input_size}
        return {key: value for key, value in options.items() if value is not None}


@dataclass
class ClassTokenConfig:
    """``target.cls``: BEiT v2's class-token head (ViT encoders,
    :class:`~mimkit.models.cls_pretraining.ClassTokenPretraining`)."""

    enabled: bool = False
    layer: int | None = None  # the early encoder block whose patch tokens it reads; null: the one at 3/4 depth
    depth: int = 2  # its transformer blocks


@dataclass
class TargetConfig:
    """What the decoder predicts and the loss on hidden patches (see :mod:`mimkit.targets`).

    ``type``: ``pixel`` (MAE), ``hog`` (MaskFeat), ``maskdistill`` or ``milan`` (a frozen teacher's
    features, the teacher of section ``teacher``; milan also swaps in the prompting decoder) or ``vqkd`` (the
    codes of the VQ-KD ``tokenizer``, BEiT v2). ``loss`` defaults to the target's usual one
    (:data:`~mimkit.targets.DEFAULT_LOSSES`). Section ``cls`` adds BEiT v2's class-token head.
    """

    type: str = "pixel"
    norm_pix: bool = True
    loss: str | None = None
    loss_on: str = "hidden"  # "all": the loss on every patch, visible ones too (MAE's ablation)
    # teacher targets: LayerNorm (no affine) over each patch's features; null: maskdistill on, milan off
    norm_features: bool | None = None
    tokenizer: str | None = None  # vqkd: the tokenizer.pt of mimkit tokenizer-train
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cls: ClassTokenConfig = field(default_factory=ClassTokenConfig)

    # the flat keys of configs written before the sections -> where they live now (see nest_target_keys); a
    # ``teacher`` that is not a section is the teacher's spec
    MOVED_KEYS: typing.ClassVar[dict[str, str]] = {
        "teacher": "teacher.spec",
        "teacher_stage": "teacher.stage",
        "teacher_input_size": "teacher.input_size",
        "teacher_cache": "teacher.cache",
        "cls_pretraining": "cls.enabled",
        "cls_layer": "cls.layer",
        "cls_depth": "cls.depth",
    }

    def resolved_loss(self) -> str:
        """``loss``, or the target's usual loss when unset."""
        from mimkit.targets import DEFAULT_LOSSES

        return self.loss or DEFAULT_LOSSES.get(self.type, "mse")


@dataclass
class DataConfig:
    """Training data and augmentation."""

    dataset: str = "fashion_mnist"
    root: str | None = None
    in_memory: bool | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_workers: int = 2
    limit: int | None = None
    # folders and shards: shorter side of images cached in memory (None: img_size / sqrt(crop_scale[0]), 501 px
    # at 224, so the smallest crops keep full resolution; smaller originals are kept as they are)
    cache_size: int | None = None
    # evaluation view (kNN, probes, pictures): shorter side resized to img_size / eval_crop_ratio, center crop
    eval_crop_ratio: float = 0.875


@dataclass
class OptimConfig:
    """AdamW with MAE's parameter groups; lr = blr * effective_batch / 256."""

    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 1.0
    accum_steps: int = 1
    clip_grad: float | None = None


@dataclass
class TrainConfig:
    """Run length, batch, outputs, checkpoints."""

    epochs: int = 1
    batch_size: int = 256
    output_dir: str = "runs/mae"
    seed: int = 0
    device: str = "auto"
    save_every_epochs: int = 1
    save_every_steps: int | None = None
    keep_every_epochs: int | None = None
    max_steps: int | None = None
    num_threads: int | None = None
    progress: bool = True
    parallel: str = "ddp"  # under torchrun: ddp (replicated model) or fsdp (sharded weights and optimizer state)
    compile: bool = False  # torch.compile the training forward (see docs/performance.md)
    precision: str = "fp32"  # fp32, or bf16 autocast of the forward pass (fast on GPUs; fp32 weights and optimizer)


@dataclass
class LogConfig:
    """Where metrics go."""

    every_steps: int = 20
    tensorboard: bool = True
    # reconstructions of held-aside images (PNG + TensorBoard) every N steps; null: about ten per run, 0: none
    images_every_steps: int | None = None
    # measure the decoder's exploitation rate of visible and mask tokens (mask.exploitation_every_steps) with
    # any masker; self_guided measures it anyway until its trigger fires
    exploitation: bool = False


@dataclass
class EvalConfig:
    """Checks run at the end of pretraining, and the optional online linear probe that runs during it."""

    reconstruct: bool = True
    num_images: int = 8
    knn: bool = False
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_pool: str = "avg"
    knn_train_limit: int | None = 10000
    knn_test_limit: int | None = 2000
    knn_baseline: bool = True
    online_probe: bool = False
    online_probe_lr: float = 1e-3


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)  # type: ignore[no-any-return]

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) the images are normalized with: ``data.mean``/``data.std`` when set,
        else the data set's defaults (:func:`~mimkit.data.transforms.default_normalization`)."""
        from mimkit.data.transforms import default_normalization

        mean, std = default_normalization(self.model.in_chans, self.data.dataset)
        return tuple(self.data.mean or mean), tuple(self.data.std or std)

    def encoder_stride(self) -> int:
        """Pixels per side of one patch of the encoder's output grid (the masker's grid)."""
        import math

        from mimkit.models.registry import CONV_ENCODERS

        if self.model.name in CONV_ENCODERS:
            return math.prod(self.model.patch_sizes or CONV_ENCODERS[self.model.name]["patch_sizes"])
        return self.model.patch_size

    def resolved_design(self) -> tuple[str, str]:
        """``(model.encoder_sees, model.head)``, the unset ones from the target's recipe: BEiT's encoder and FC head
        for ``maskdistill`` and ``vqkd`` (MaskDistill, BEiT v2) on a ViT, MILAN's prompting decoder for
        ``milan``, MAE's visible-only encoder and decoder otherwise."""
        from mimkit.models.registry import CONV_ENCODERS

        sees, head = self.model.encoder_sees, self.model.head
        if head is None:
            beit = self.target.type in ("maskdistill", "vqkd") and self.model.name not in CONV_ENCODERS
            if beit and sees != "visible":
                head = "linear"
            elif self.target.type == "milan" and sees != "all":
                head = "prompting"
            else:
                head = "mae"
        sees = sees or ("all" if head == "linear" else "visible")
        return sees, head

    def validate(self) -> Config:
        """Cross-field checks that would otherwise fail hours into a run."""
        from mimkit.layers import check_patch_grid
        from mimkit.masking import MASKERS, OptionError, create_masker, num_hidden_patches
        from mimkit.models.mim import LOSS_ON
        from mimkit.models.protocols import GridCheckedMasker
        from mimkit.models.registry import CONV_ENCODERS, DECODERS, ENCODERS, HEADS
        from mimkit.models.vit import ENCODER_SEES
        from mimkit.targets import LOSSES, TARGETS, TEACHER_TARGETS

        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {message}")

        names = sorted(ENCODERS) + sorted(CONV_ENCODERS)
        check(self.model.name in names, "model.name", f"unknown model {self.model.name!r}; one of {names}")
        conv = self.model.name in CONV_ENCODERS
        for key in ("embed_dim", "depth") if conv else ("embed_dims", "depths", "patch_sizes", "kernel_size", "fuse"):
            which = "ConvMAE models take embed_dims, depths, patch_sizes" if conv else "only ConvMAE models take it"
            check(getattr(self.model, key) is None, f"model.{key}", f"not for {self.model.name}: {which}")
        for key in ("embed_dims", "depths", "patch_sizes"):
            value = getattr(self.model, key)
            check(value is None or len(value) == 3, f"model.{key}", "ConvMAE has 3 stages: give 3 values")
        kernel = self.model.kernel_size
        check(kernel is None or (kernel > 0 and kernel % 2 == 1), "model.kernel_size", "must be a positive odd number")
        check(self.model.decoder in DECODERS, "model.decoder", f"unknown preset; one of {sorted(DECODERS)}")
        check(self.model.encoder_sees in (None, *ENCODER_SEES), "model.encoder_sees", f"one of {list(ENCODER_SEES)}")
        check(self.model.head in (None, *HEADS), "model.head", f"unknown head; one of {list(HEADS)}")
        check(self.target.loss_on in LOSS_ON, "target.loss_on", f"one of {list(LOSS_ON)}")
        self.model.encoder_sees, self.model.head = self.resolved_design()  # saved explicitly with the run
        sees, head = self.model.encoder_sees, self.model.head
        check(
            sees == "visible" or not conv,
            "model.encoder_sees",
            "'all' (BEiT's mask embedding) is for ViT encoders; ConvMAE masks its convolutions",
        )
        check(
            head != "linear" or sees == "all",
            "model.head",
            "linear predicts each patch from the encoder's output there: it needs model.encoder_sees=all",
        )
        check(head != "prompting" or sees == "visible", "model.head", "prompting needs model.encoder_sees=visible")
        decoder_tokens = sees == "visible" and head == "mae"  # visible tokens + the decoder's mask tokens
        check(
            decoder_tokens or (self.mask.type != "self_guided" and not self.log.exploitation),
            "mask.type" if self.mask.type == "self_guided" else "log.exploitation",
            "measures how the decoder uses its mask tokens: it needs model.encoder_sees=visible and model.head=mae",
        )
        try:
            check_patch_grid(self.model.img_size, self.encoder_stride())
        except ValueError as err:
            raise ConfigError(f"model.img_size: {err}") from None
        check(self.model.in_chans in (1, 3), "model.in_chans", f"must be 1 or 3, got {self.model.in_chans}")
        check(self.mask.type in MASKERS, "mask.type", f"unknown {self.mask.type!r}; one of {sorted(MASKERS)}")
        # the masker checks its own options (and may restrict the ratio, grid: 0.75, or the patch grid, grid: even
        # sides): built here without weights, its refusal is reported under the key of the option it names
        try:
            masker = create_masker(self.mask.type, self.mask.ratio, **mask_options(self.mask))
        except OptionError as err:
            raise ConfigError(f"{masker_option_key(self.mask, err.option)}: {err}") from None
        except ValueError as err:  # a refusal that names no single option
            raise ConfigError(f"mask.type: {err}") from None
        if isinstance(masker, GridCheckedMasker):
            try:
                masker.check_grid(check_patch_grid(self.model.img_size, self.encoder_stride()))
            except ValueError as err:
                raise ConfigError(f"mask.type: {err}") from None
        grid_h, grid_w = check_patch_grid(self.model.img_size, self.encoder_stride())
        num_hidden = num_hidden_patches(grid_h * grid_w, self.mask.ratio)
        check(
            num_hidden >= 1,
            "mask.ratio",
            f"{self.mask.ratio} hides no patch of the {grid_h}x{grid_w} patch grid, so there is no loss; raise "
            "mask.ratio or model.img_size",
        )
        values_per_patch = self.encoder_stride() ** 2 * self.model.in_chans
        check(
            not self.target.norm_pix or self.target.type != "pixel" or values_per_patch > 1,
            "target.norm_pix",
            "a patch of a single pixel value has no variance to normalize by; set target.norm_pix=false or use "
            "a larger model.patch_size",
        )
        check(self.mask.exploitation_every_steps >= 1, "mask.exploitation_every_steps", "must be >= 1")
        check(
            self.mask.type != "attention"
            or self.mask.attention.source == "encoder"
            or self.target.teacher.spec is not None,
            "mask.attention.source",
            "mask.attention.source=teacher needs a teacher target (target.type=maskdistill or milan with "
            "target.teacher.spec)",
        )
        check(self.target.type in TARGETS, "target.type", f"unknown {self.target.type!r}; one of {list(TARGETS)}")
        loss = self.target.resolved_loss()
        if self.target.type == "vqkd":
            check(loss == "cross_entropy", "target.loss", "vqkd predicts codes: its loss is cross_entropy")
        else:
            check(loss in LOSSES, "target.loss", f"unknown {loss!r}; one of {list(LOSSES)}")
        check(
            (self.target.tokenizer is not None) == (self.target.type == "vqkd"),
            "target.tokenizer",
            "target.type=vqkd needs target.tokenizer (a tokenizer.pt of mimkit tokenizer-train)"
            if self.target.type == "vqkd"
            else "only target.type=vqkd takes a tokenizer",
        )
        check(
            not self.target.cls.enabled or self.model.name not in CONV_ENCODERS,
            "target.cls.enabled",
            "needs an encoder with a class token (ViT), not ConvMAE",
        )
        check(self.target.cls.depth >= 1, "target.cls.depth", "must be >= 1")
        if self.mask.type == "fine_random":  # hides parts of patches: only a pixel loss can score them
            check(conv, "mask.type", "fine_random masks ConvMAE's stage-1 grid: use a convmae_* model.name")
            check(self.target.type == "pixel", "mask.type", "fine_random scores hidden pixels: use target.type=pixel")
            check(loss != "cosine", "target.loss", "fine_random scores single pixels: use mse, l1 or smooth_l1")
        check(
            self.target.norm_features is None or self.target.type in TEACHER_TARGETS,
            "target.norm_features",
            "normalizes a teacher's features: only for target.type maskdistill or milan",
        )
        check(
            self.target.teacher.cache is None or self.target.teacher.spec is not None,
            "target.teacher.cache",
            "caches a teacher's features: set target.teacher.spec (maskdistill or milan)",
        )
        teacher = self.target.type in TEACHER_TARGETS
        check(
            (self.target.teacher.spec is not None) == teacher,
            "target.teacher.spec",
            f"target.type={self.target.type} needs a teacher (efficientnet_lite0, a checkpoint path, "
            "timm:NAME@FILE, hf_clip:DIR)"
            if teacher
            else f"only target.type {' or '.join(TEACHER_TARGETS)} takes a teacher, not {self.target.type}",
        )
        check(
            self.data.dataset in ("fashion_mnist", "folder", "shards"),
            "data.dataset",
            "must be 'fashion_mnist', 'folder' or 'shards'",
        )
        check(
            self.data.dataset == "fashion_mnist" or bool(self.data.root),
            "data.root",
            f"data.dataset={self.data.dataset} needs data.root",
        )
        for key in ("crop_scale", "crop_ratio"):
            low, high = getattr(self.data, key)
            check(0 < low <= high, f"data.{key}", f"must be [low, high] with 0 < low <= high, got [{low}, {high}]")
        check(0 < self.data.eval_crop_ratio <= 1, "data.eval_crop_ratio", "must lie in (0, 1] (MAE: 0.875)")
        check(self.data.cache_size is None or self.data.cache_size > 0, "data.cache_size", "must be positive")
        for key in ("mean", "std"):
            stats = getattr(self.data, key)
            check(
                stats is None or len(stats) in (1, self.model.in_chans),
                f"data.{key}",
                f"give 1 or model.in_chans={self.model.in_chans} values (one per channel), got {stats}",
            )
        check(all(s > 0 for s in self.data.std or ()), "data.std", f"must be positive, got {self.data.std}")
        check(self.eval.knn_pool in ("cls", "avg"), "eval.knn_pool", "must be 'cls' or 'avg'")
        check(self.eval.online_probe_lr > 0, "eval.online_probe_lr", f"must be > 0, got {self.eval.online_probe_lr}")
        every = self.log.images_every_steps
        check(every is None or every >= 0, "log.images_every_steps", "must be >= 0 (0: no pictures) or null")
        check(self.train.epochs >= 1, "train.epochs", "must be >= 1")
        check(self.train.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.train.parallel in ("ddp", "fsdp"), "train.parallel", "must be 'ddp' or 'fsdp'")
        check(self.train.precision in ("fp32", "bf16"), "train.precision", "must be 'fp32' or 'bf16'")
        check(self.train.save_every_epochs >= 1, "train.save_every_epochs", "must be >= 1")
        for key in ("save_every_steps", "keep_every_epochs", "max_steps"):
            value = getattr(self.train, key)
            check(value is None or value >= 1, f"train.{key}", "must be >= 1 (or null)")
        check(self.optim.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
        check(self.train.batch_size % self.optim.accum_steps == 0, "optim.accum_steps", "must divide train.batch_size")
        check(self.optim.blr > 0 or (self.optim.lr or 0) > 0, "optim.blr", "must be positive")
        self._check_architecture()
        return self

    def _check_architecture(self) -> None:
        """Build the encoder and its head on the ``meta`` device (no memory, no weights): the sizes they
        refuse (heads that do not divide the width, a negative MLP width) are refused now, by the parts
        themselves, rather than when the run builds them."""
        import torch

        from mimkit.models.registry import create_decoder, create_encoder, model_args

        overrides = model_overrides(self)
        try:
            with torch.device("meta"):
                encoder = create_encoder(self.model.name, **overrides)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"model: the encoder {self.model.name} cannot be built: {err}") from None
        try:
            with torch.device("meta"):
                create_decoder(model_args(self.model.name, **overrides), encoder, out_dim=1)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"model.decoder: the {self.model.head} head cannot be built: {err}") from None


@typing.overload
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config: ...


@typing.overload
def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, schema: type[SchemaT]
) -> SchemaT: ...


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, schema: type[Any] = Config
) -> Any:
    """:func:`mimkit.config.loader.load_config`, with pretraining's :class:`Config` as the default ``schema``."""
    return load_schema(path, overrides, schema=schema)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated :class:`Config` from :meth:`Config.to_dict` output (e.g. from a checkpoint).

    A run saved before ``model.head`` existed was built with MAE's visible-only encoder and the head its target
    had then (:func:`~mimkit.models.registry.default_head`), and is rebuilt so; one saved before the masker's
    sections holds their keys flat in ``mask`` and is read as :func:`nest_mask_keys` moves them, and one saved
    before the target's ``teacher`` and ``cls`` sections as :func:`nest_target_keys` moves its flat ``target``
    keys.
    """
    from mimkit.models.registry import default_head

    data = nest_target_keys(nest_mask_keys(data))
    model = data.get("model")
    if isinstance(model, dict) and "head" not in model:
        target = data.get("target")
        kind = target.get("type", "pixel") if isinstance(target, dict) else "pixel"
        data = {**data, "model": {**model, "head": default_head(str(kind)), "encoder_sees": "visible"}}
    return from_dict(Config, data).validate()  # type: ignore[no-any-return]


def masker_option_key(mask: MaskConfig, option: str) -> str:
    """The config key of the masker's constructor argument ``option`` (:class:`~mimkit.masking.OptionError`):
    ``mask.ratio``, ``mask.<type>.<option>``, or ``mask.type`` for one the config does not set (fine_random's
    cell factor, which comes from the model)."""
    if option == "ratio":
        return "mask.ratio"
    section = mask.section()
    return f"mask.{mask.type}.{option}" if section is not None and option in asdict(section) else "mask.type"


def nest_mask_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A stored config (:meth:`Config.to_dict` output) with the flat ``mask`` keys of configs written before the
    masker's sections (``mask.hint_ratio``) moved into their sections (``mask.self_guided.hint_ratio``); a config
    without them is returned as it is. Every reader of a stored config goes through :func:`config_from_dict`, which
    calls it; a recipe or override with a flat key is refused, naming the new key."""
    return _nest_moved_keys(data, "mask", MaskConfig.MOVED_KEYS)


def nest_target_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A stored config (:meth:`Config.to_dict` output) with the flat ``target`` keys of configs written before the
    teacher's and the class-token head's sections (``target.teacher: efficientnet_lite0``,
    ``target.teacher_stage``, ``target.cls_pretraining``) moved into them (``target.teacher.spec``,
    ``target.teacher.stage``, ``target.cls.enabled``, see :attr:`TargetConfig.MOVED_KEYS`); a config without them
    is returned as it is. Called by :func:`config_from_dict`, as :func:`nest_mask_keys`."""
    return _nest_moved_keys(data, "target", TargetConfig.MOVED_KEYS)


def _nest_moved_keys(data: dict[str, Any], section: str, moved: dict[str, str]) -> dict[str, Any]:
    """``data`` with the keys of its ``section`` that ``moved`` lists (old name -> ``part.name``) moved into their
    parts. A key that names a part itself (``teacher``) is old only when it does not hold a mapping."""
    stored = data.get(section)
    if not isinstance(stored, dict):
        return data

    def flat(key: str, value: Any) -> bool:
        return key in moved and not (moved[key].split(".")[0] == key and isinstance(value, dict))

    if not any(flat(key, value) for key, value in stored.items()):
        return data
    nested = {key: value for key, value in stored.items() if not flat(key, value)}
    for key, value in stored.items():
        if flat(key, value):
            part, name = moved[key].split(".")
            kept = nested.get(part)
            nested[part] = {**(kept if isinstance(kept, dict) else {}), name: value}
    return {**data, section: nested}


def mask_options(mask: MaskConfig) -> dict[str, Any]:
    """The keyword arguments of ``mask``'s masker besides ``ratio``: its active section as it stands."""
    section = mask.section()
    return asdict(section) if section is not None else {}


def model_overrides(config: Config) -> dict[str, Any]:
    """``create_model`` keyword arguments for this config."""
    from mimkit.models.registry import CONV_ENCODERS

    m = config.model
    if m.name in CONV_ENCODERS:
        encoder = dict(
            embed_dims=m.embed_dims, depths=m.depths, patch_sizes=m.patch_sizes, kernel_size=m.kernel_size, fuse=m.fuse
        )
    else:
        encoder = dict(patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth)
    return dict(
        img_size=m.img_size,
        in_chans=m.in_chans,
        **encoder,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        decoder=m.decoder,
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
        drop_path_rate=m.drop_path_rate,
        norm_eps=m.norm_eps,
        qkv_bias=m.qkv_bias,
        grad_checkpointing=m.grad_checkpointing,
        encoder_sees=m.encoder_sees,
        head=m.head,
        loss_on=config.target.loss_on,
        norm_features=config.target.norm_features,
        mask_type=config.mask.type,
        mask_ratio=config.mask.ratio,
        mask_options=mask_options(config.mask),
        norm_pix=config.target.norm_pix,
        loss=config.target.resolved_loss(),
        target=config.target.type,
        teacher=config.target.teacher.spec,
        teacher_options=config.target.teacher.options(),
        tokenizer=config.target.tokenizer,
        teacher_cache=config.target.teacher.cache,
        cls_enabled=config.target.cls.enabled,
        cls_layer=config.target.cls.layer,
        cls_depth=config.target.cls.depth,
        **(
            dict(zip(("data_mean", "data_std"), config.normalization(), strict=True))
            if config.target.teacher.spec or config.target.tokenizer
            else {}
        ),
    )
