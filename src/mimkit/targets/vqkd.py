"""BEiT v2's visual tokenizer: vector-quantized knowledge distillation (VQ-KD).

Peng et al. 2022, "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers". A ViT encoder
sees the whole image; per patch, ``encode_task_layer`` (Linear, Tanh, Linear) maps its token to a
``code_dim`` vector that is l2-normalized and replaced by the nearest code of an l2-normalized codebook
(nearest by cosine). A shallow transformer decoder reads the codes and ``decode_task_layer`` (Linear, Tanh,
Linear) predicts a frozen teacher's features of that patch; the loss is ``1 - cosine`` between prediction
and teacher features, averaged over patches, plus the quantizer's commitment loss. Once trained, the
codes of :meth:`VQKDTokenizer.tokenize` are the classification targets of masked image modeling
(predict each hidden patch's code with cross-entropy).

Choices, with BEiT v2's own values where they differ:

==========================  ==================================  ===========================================
setting                     here (defaults)                     BEiT v2 (ViT-B/16 on ImageNet-1k)
==========================  ==================================  ===========================================
codebook                    512 codes x 32 dims                 8192 x 32
EMA decay                   0.9 (:class:`VectorQuantizer`:     0.99
                            0.99), see below
dead codes                  restarted at batch inputs when      none
                            their EMA count < 1 per batch
commitment loss             ``beta * mean((z - sg(q))**2)``,    same (``beta * F.mse_loss(sg(q), z)``,
                            beta 1.0, mean over elements        beta 1.0)
codebook initialization     spherical k-means on the first      k-means on the first batch
                            training batch (10 iterations)
decoder                     2 blocks, sin-cos positions         3 blocks, learned positions
teacher                     EfficientNet-Lite0 stage 4          CLIP ViT-B/16 (or DINO) last layer
==========================  ==================================  ===========================================

Short runs: a decay of 0.99 averages over ~100 steps. On Fashion-MNIST with a 64-d, 2-block encoder (lr
1e-3, 20 warmup steps, 256 codes, batch 32) the encoder's outputs moved faster than that and after 100
steps only 15 codes were in use (perplexity 9); with decay 0.9 and dead-code restarts, 238 (perplexity
142) and a lower loss. :class:`TokenizerConfig` therefore defaults to 0.9; the quantizer keeps BEiT v2's
0.99 for long runs.

Codebook health: a code histogram's *usage* is the fraction of codes hit, its *perplexity*
``exp(entropy)`` the effective number of codes. :func:`check_codebook` calls a histogram collapsed, and
warns with :class:`CodebookCollapseWarning`, when fewer than ``min_usage`` (10 %) of the codes it could
fill are used or its perplexity is below ``min_perplexity`` (5 %) of them; "could fill" is
``min(num_codes, num_tokens)``, so a small batch is not mistaken for a collapse.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from mimkit.config import ConfigError, to_plain
from mimkit.engine.run_guard import holding_run_lock
from mimkit.files import CheckpointError, atomic_write, load_checkpoint_file, save_checkpoint
from mimkit.layers import Block, init_vit_weights, sincos_2d
from mimkit.layers.quantizer import QuantizerOutput, VectorQuantizer
from mimkit.targets.teacher import Teacher, build_teacher, keep_teacher_out_of_state_dict

if TYPE_CHECKING:
    from mimkit.models.vit import VisionTransformer

TOKENIZER_FORMAT = "mimkit.vqkd_tokenizer"
TOKENIZER_NAME = "tokenizer.pt"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.yaml"
COLLAPSE_MIN_USAGE = 0.1
COLLAPSE_MIN_PERPLEXITY = 0.05


class CodebookCollapseWarning(UserWarning):
    """Few codes of a VQ codebook are in use (see :func:`check_codebook`)."""


@dataclass
class CodebookStats:
    """Usage of a codebook over a histogram of assignments.

    Attributes:
        num_codes: K.
        num_tokens: assignments counted.
        used_codes: codes hit at least once.
        usage: ``used_codes / K``.
        perplexity: ``exp(entropy)`` of the histogram (natural log); K for a uniform one, 1 for one code.
    """

    num_codes: int
    num_tokens: int
    used_codes: int
    usage: float
    perplexity: float

    def collapsed(self, min_usage: float = COLLAPSE_MIN_USAGE, min_perplexity: float = COLLAPSE_MIN_PERPLEXITY) -> bool:
        """True when fewer than ``min_usage`` of the codes the histogram could fill
        (``min(num_codes, num_tokens)``) are used, or the perplexity is below ``min_perplexity`` of them."""
        capacity = min(self.num_codes, self.num_tokens)
        return self.used_codes < min_usage * capacity or self.perplexity < min_perplexity * capacity


def codebook_stats(counts: Tensor) -> CodebookStats:
    """Usage and perplexity of a code histogram.

    Args:
        counts: (K,) assignments per code (any numeric dtype).
    """
    counts = counts.detach().double().flatten()  # (K,)
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total <= 0:
        return CodebookStats(counts.numel(), 0, 0, 0.0, 0.0)
    probs = counts[counts > 0] / total
    entropy = float(-(probs * probs.log()).sum())
    return CodebookStats(counts.numel(), round(total), used, used / counts.numel(), math.exp(entropy))


def check_codebook(
    counts: Tensor,
    *,
    min_usage: float = COLLAPSE_MIN_USAGE,
    min_perplexity: float = COLLAPSE_MIN_PERPLEXITY,
    where: str = "",
) -> CodebookStats:
    """:func:`codebook_stats`, warning with :class:`CodebookCollapseWarning` when the histogram has collapsed
    (see :meth:`CodebookStats.collapsed`).

    Args:
        counts: (K,) assignments per code.
        min_usage, min_perplexity: the collapse thresholds, as fractions of ``min(K, tokens)``.
        where: context for the message (e.g. ``"step 200"``).
    """
    stats = codebook_stats(counts)
    if stats.num_tokens and stats.collapsed(min_usage, min_perplexity):
        context = f" at {where}" if where else ""
        warnings.warn(
            CodebookCollapseWarning(
                f"VQ codebook collapse{context}: {stats.used_codes} of {stats.num_codes} codes used "
                f"({stats.usage:.1%}), perplexity {stats.perplexity:.1f} over {stats.num_tokens} tokens; "
                "lower model.decay or optim.lr, or raise model.dead_code_threshold"
            ),
            stacklevel=2,
        )
    return stats


@dataclass
class VQKDOutput:
    """What :meth:`VQKDTokenizer.forward` returns.

    Attributes:
        loss: scalar ``rec_loss + quant_loss``.
        rec_loss: scalar mean over patches of ``1 - cosine(decoded, teacher features)``.
        quant_loss: scalar commitment loss.
        codes: (B, L) int64 code per patch.
        decoded: (B, L, teacher_dim) predicted teacher features.
    """

    loss: Tensor
    rec_loss: Tensor
    quant_loss: Tensor
    codes: Tensor
    decoded: Tensor


def _task_layer(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.Tanh(), nn.Linear(in_dim, out_dim))


class VQKDTokenizer(nn.Module):
    """BEiT v2's VQ-KD tokenizer: ViT encoder, quantizer, shallow decoder predicting a teacher's features.

    The teacher (optional: only training needs it) is rebuilt from its spec, so its weights are left out
    of :meth:`state_dict` and not expected by :meth:`load_state_dict`.

    Args:
        img_size, patch_size, in_chans: the student's images and patch grid (the codes are per patch).
        encoder: a ViT preset of :data:`~mimkit.models.registry.ENCODERS`.
        embed_dim, depth, num_heads, mlp_ratio: encoder size (None: the preset's).
        num_codes, code_dim, decay, beta, kmeans_init, dead_code_threshold: the :class:`VectorQuantizer`.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder (width divisible by 4 for its
            sin-cos positions).
        teacher_dim: width of the teacher's features (the decoder's output); taken from ``teacher`` when
            None.
        teacher: the frozen :class:`~mimkit.targets.Teacher` whose features are reconstructed.
        mean, std: the normalization of the images the tokenizer expects (recorded in :attr:`config` so a
            user of the codes can normalize the same way).

    Attributes:
        config: the constructor's arguments except ``teacher`` (enough to rebuild the module).
        grid: (grid_h, grid_w) patch grid; codes come in its raster order.
        num_codes: K.
    """

    def __init__(
        self,
        *,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 1,
        encoder: str = "vit_tiny",
        embed_dim: int | None = 128,
        depth: int | None = 4,
        num_heads: int | None = 4,
        mlp_ratio: float = 4.0,
        num_codes: int = 512,
        code_dim: int = 32,
        decay: float = 0.99,
        beta: float = 1.0,
        kmeans_init: bool = True,
        dead_code_threshold: float = 1.0,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        teacher_dim: int | None = None,
        teacher: Teacher | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        from mimkit.models.registry import ENCODERS, create_encoder  # mimkit.models imports mimkit.targets

        if encoder not in ENCODERS:
            raise ValueError(f"unknown tokenizer encoder {encoder!r}; choose a ViT of {sorted(ENCODERS)}")
        if teacher_dim is None:
            if teacher is None:
                raise ValueError("VQKDTokenizer needs teacher_dim or a teacher")
            teacher_dim = teacher.dim
        if teacher is not None and teacher.dim != teacher_dim:
            raise ValueError(f"teacher gives {teacher.dim} features per patch, teacher_dim says {teacher_dim}")
        if decoder_embed_dim % 4 or decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {decoder_embed_dim} must be divisible by 4 (sin-cos positions) and by "
                f"decoder_num_heads {decoder_num_heads}"
            )
        self.config: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            encoder=encoder,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_codes=num_codes,
            code_dim=code_dim,
            decay=decay,
            beta=beta,
            kmeans_init=kmeans_init,
            dead_code_threshold=dead_code_threshold,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            teacher_dim=int(teacher_dim),
            mean=None if mean is None else [float(value) for value in mean],
            std=None if std is None else [float(value) for value in std],
        )
        sizes = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        self.encoder: VisionTransformer = create_encoder(  # type: ignore[assignment]
            encoder,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            mlp_ratio=mlp_ratio,
            **{key: value for key, value in sizes.items() if value is not None},
        )
        self.grid: tuple[int, int] = tuple(self.encoder.grid)  # type: ignore[assignment]
        width = int(self.encoder.embed_dim)
        self.encode_task_layer = _task_layer(width, code_dim)
        self.quantizer = VectorQuantizer(
            num_codes,
            code_dim,
            decay=decay,
            beta=beta,
            kmeans_init=kmeans_init,
            dead_code_threshold=dead_code_threshold,
        )
        self.decoder_embed = nn.Linear(code_dim, decoder_embed_dim)
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(decoder_embed_dim, self.grid)[None], requires_grad=False
        )  # (1, L, decoder_embed_dim), fixed
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decode_task_layer = _task_layer(decoder_embed_dim, int(teacher_dim))
        for module in (self.encode_task_layer, self.decoder_embed, self.decoder_blocks, self.decoder_norm):
            module.apply(init_vit_weights)
        self.decode_task_layer.apply(init_vit_weights)
        self.teacher: Teacher | None = teacher
        keep_teacher_out_of_state_dict(self)

    @property
    def num_codes(self) -> int:
        """Codebook size K: codes lie in ``[0, K)``."""
        return self.quantizer.num_codes

    @property
    def num_patches(self) -> int:
        """L = grid_h * grid_w."""
        return self.grid[0] * self.grid[1]

    def encode(self, images: Tensor) -> QuantizerOutput:
        """Quantize each patch of the images (training mode updates the codebook).

        Args:
            images: (B, C, H, W) normalized like the student's images.

        Returns:
            :class:`QuantizerOutput` with ``quantized`` (B, L, code_dim) and ``codes`` (B, L).
        """
        tokens = self.encoder(images).patch_tokens  # (B, L, D)
        z = F.normalize(self.encode_task_layer(tokens), dim=-1)  # (B, L, code_dim), unit norm
        return self.quantizer(z)  # type: ignore[no-any-return]

    def decode(self, quantized: Tensor) -> Tensor:
        """Predict the teacher's features from the codes: (B, L, code_dim) -> (B, L, teacher_dim)."""
        x = self.decoder_embed(quantized) + self.decoder_pos_embed  # (B, L, decoder_embed_dim)
        for block in self.decoder_blocks:
            x, _ = block(x)
        return self.decode_task_layer(self.decoder_norm(x))  # type: ignore[no-any-return]

    def forward(self, images: Tensor, targets: Tensor | None = None) -> VQKDOutput:
        """The VQ-KD losses of a batch.

        Args:
            images: (B, C, H, W) normalized like the student's images.
            targets: (B, L, teacher_dim) teacher features of ``images``, computed by :attr:`teacher` when
                None (pass them to reuse features computed once).

        Returns:
            A :class:`VQKDOutput`.
        """
        if targets is None:
            if self.teacher is None:
                raise ValueError("this tokenizer has no teacher; pass the teacher features as targets")
            targets = self.teacher(images, self.grid)  # (B, L, teacher_dim), no grad
        quant = self.encode(images)
        decoded = self.decode(quant.quantized)  # (B, L, teacher_dim)
        if decoded.shape != targets.shape:
            raise ValueError(f"decoded {tuple(decoded.shape)} and teacher features {tuple(targets.shape)} differ")
        rec_loss = (1 - F.cosine_similarity(decoded, targets.to(decoded.dtype), dim=-1)).mean()
        return VQKDOutput(rec_loss + quant.loss, rec_loss, quant.loss, quant.codes, decoded)

    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        """The code of each patch, as masked image modeling's classification target.

        Runs in eval mode (whatever the module's mode) without gradients and never updates the codebook.

        Args:
            images: (B, C, H, W) normalized like the student's images (see ``config["mean"]``/``["std"]``).

        Returns:
            (B, L) int64 codes in ``[0, num_codes)``, patches in raster order of :attr:`grid`.
        """
        was_training = self.training
        self.eval()
        try:
            tokens = self.encoder(images).patch_tokens  # (B, L, D)
            z = F.normalize(self.encode_task_layer(tokens), dim=-1)  # (B, L, code_dim)
            return self.quantizer.nearest(z)
        finally:
            self.train(was_training)


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
class TokenizerTeacherConfig:
    """The frozen teacher of :func:`~mimkit.targets.build_teacher`: ``spec``, its ``stage`` and input side
    (None: the teacher's defaults)."""

    spec: str = "efficientnet_lite0"
    stage: int | None = None
    input_size: int | None = None

    def options(self) -> dict[str, Any]:
        """Keyword options of :func:`~mimkit.targets.build_teacher` that are set."""
        options = {"stage": self.stage, "input_size": self.input_size}
        return {key: value for key, value in options.items() if value is not None}


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
        from mimkit.data.transforms import default_normalization

        mean, std = default_normalization(self.model.in_chans, self.data.dataset)
        return tuple(self.data.mean or mean), tuple(self.data.std or std)

    def validate(self) -> TokenizerConfig:
        """Raise :class:`~mimkit.config.ConfigError` naming the first bad key."""
        from mimkit.layers import check_patch_grid
        from mimkit.models.registry import ENCODERS

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
        teacher = build_teacher(config.teacher.spec, student_mean=mean, student_std=std, **config.teacher.options())
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


def save_tokenizer(path: str | Path, tokenizer: VQKDTokenizer, config: TokenizerConfig, **extra: Any) -> Path:
    """Write a tokenizer file atomically: its weights (no teacher), constructor arguments, teacher spec,
    image normalization and run config, plus ``extra`` plain values (e.g. ``step``, ``summary``)."""
    path = Path(path)
    mean, std = config.normalization()
    state = {
        "format": TOKENIZER_FORMAT,
        "version": 1,
        "model": tokenizer.state_dict(),
        "model_args": dict(tokenizer.config),
        "teacher": {"spec": config.teacher.spec, "options": config.teacher.options()},
        "normalization": {"mean": list(mean), "std": list(std)},
        "config": config.to_dict(),
        **extra,
    }
    save_checkpoint(path, state)
    return path


def load_tokenizer(
    path: str | Path, *, map_location: str | torch.device = "cpu", with_teacher: bool = False
) -> VQKDTokenizer:
    """Load a tokenizer written by :func:`train_tokenizer`, in eval mode.

    Args:
        path: the ``tokenizer.pt`` file (or the run directory holding it).
        map_location: where the weights go.
        with_teacher: also rebuild the teacher from its saved spec (only needed to compute the VQ-KD loss).

    Raises:
        CheckpointError: missing, truncated or unreadable file, or not a VQ-KD tokenizer.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    state = load_checkpoint_file(path, map_location=map_location)
    if state.get("format") != TOKENIZER_FORMAT or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path} is not a mimkit VQ-KD tokenizer file (train one with mimkit tokenizer-train)")
    args = dict(state["model_args"])
    teacher = None
    if with_teacher:
        spec = state["teacher"]
        teacher = build_teacher(
            spec["spec"], student_mean=args["mean"], student_std=args["std"], **dict(spec.get("options") or {})
        )
    tokenizer = VQKDTokenizer(**args, teacher=teacher)
    try:
        tokenizer.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the saved arguments: {err}") from None
    return tokenizer.to(map_location).eval()


@holding_run_lock(lambda config, **_: config.train.output_dir, "train.output_dir")
def train_tokenizer(config: TokenizerConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train a VQ-KD tokenizer; writes ``tokenizer.pt``, ``config.yaml``, ``metrics.jsonl`` and
    ``summary.json`` to ``config.train.output_dir``.

    Every ``log.every_steps`` steps the mean losses and the codebook usage and perplexity of that window's
    assignments are logged (and checked by :func:`check_codebook`); at each epoch's end those of the
    epoch. After training, ``train.eval_images`` un-augmented training images are tokenized (eval mode)
    for the summary's usage and perplexity.

    The run directory is locked against a second writer while this runs. SIGTERM or SIGINT stop after the
    step in flight with :class:`~mimkit.engine.run_guard.TrainingInterrupted`; the tokenizer is written
    only at the end (this command does not resume).

    Args:
        config: a validated config.
        progress: show a tqdm progress bar.

    Returns:
        The summary: ``final_loss`` (mean of the last logging window), ``final_rec_loss``,
        ``final_quant_loss``, ``codebook_usage``, ``used_codes``, ``perplexity``, ``num_codes``,
        ``collapsed``, ``steps``, ``seconds``, ``tokenizer`` (the file's path).

    Raises:
        FileExistsError: ``output_dir`` holds a finished run and ``train.overwrite`` is false.
        ValueError: fewer images than a batch; unknown teacher.
        FileNotFoundError: missing data or teacher weights.
    """
    from tqdm.auto import tqdm

    from mimkit.data import EvalTransform, build_loader, build_training_dataset, training_transform
    from mimkit.engine.logging import MetricsLogger
    from mimkit.engine.optim import build_optimizer
    from mimkit.engine.pretrain import NonFiniteLossError, resolve_device, step_generator
    from mimkit.engine.run_guard import StopSignals
    from mimkit.engine.schedule import warmup_cosine

    cfg = config
    out_dir = Path(cfg.train.output_dir)
    tokenizer_path = out_dir / TOKENIZER_NAME
    if tokenizer_path.exists() and not cfg.train.overwrite:
        raise FileExistsError(
            f"{tokenizer_path} already exists (a finished run); set train.overwrite=true to replace it or choose "
            "another train.output_dir"
        )
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
    out_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(out_dir / CONFIG_NAME, lambda handle: handle.write(text.encode()))
    logger = MetricsLogger(out_dir, tensorboard=cfg.log.tensorboard)
    collapse = dict(min_usage=cfg.log.collapse_usage, min_perplexity=cfg.log.collapse_perplexity)

    num_codes = tokenizer.num_codes
    window = torch.zeros(3, device=device)  # summed (loss, rec_loss, quant_loss) since the last log
    window_counts = torch.zeros(num_codes, dtype=torch.long, device=device)
    last_counts = window_counts.clone()  # the last logging window's histogram
    epoch_counts = torch.zeros(num_codes, dtype=torch.long, device=device)
    last = {"loss": math.nan, "rec_loss": math.nan, "quant_loss": math.nan}
    step, last_log_step = 0, 0
    bar = tqdm(total=total_steps, desc="tokenizer", unit="step", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    tokenizer.train()
    signals = StopSignals().install()
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            loader.set_epoch(epoch)
            for images_uint8, _ in loader.iter_from(step - epoch * steps_per_epoch):
                lr = warmup_cosine(
                    step,
                    base_lr=cfg.optim.lr,
                    total_steps=schedule_steps,
                    warmup_steps=cfg.optim.warmup_steps,
                    min_lr=cfg.optim.min_lr,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = augment(images_uint8.to(device), generator=step_generator(cfg.train.seed, step, 0))
                out = tokenizer(images)
                out.loss.backward()
                if cfg.optim.clip_grad is not None:
                    nn.utils.clip_grad_norm_(tokenizer.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window += torch.stack([out.loss.detach(), out.rec_loss.detach(), out.quant_loss.detach()])
                counts = torch.bincount(out.codes.flatten(), minlength=num_codes)  # (K,)
                window_counts += counts
                epoch_counts += counts
                bar.update(1)
                at_epoch_end = step % steps_per_epoch == 0
                done = step >= total_steps
                if step % cfg.log.every_steps == 0 or at_epoch_end or done:
                    sums = (window / (step - last_log_step)).tolist()
                    if not all(math.isfinite(value) for value in sums):
                        raise NonFiniteLossError(
                            f"tokenizer loss became NaN/inf between steps {last_log_step} and {step}; lower optim.lr"
                        )
                    last = dict(zip(("loss", "rec_loss", "quant_loss"), sums, strict=True))
                    stats = check_codebook(window_counts, where=f"step {step}", **collapse)
                    metrics: dict[str, Any] = {f"train/{key}": value for key, value in last.items()}
                    metrics.update(
                        {
                            "train/lr": lr,
                            "codebook/usage": stats.usage,
                            "codebook/used_codes": stats.used_codes,
                            "codebook/perplexity": stats.perplexity,
                            "epoch": step / steps_per_epoch,
                        }
                    )
                    if at_epoch_end or done:
                        epoch_stats = codebook_stats(epoch_counts)
                        metrics.update(
                            {
                                "codebook/epoch_usage": epoch_stats.usage,
                                "codebook/epoch_perplexity": epoch_stats.perplexity,
                            }
                        )
                        epoch_counts.zero_()
                    logger.log(step, metrics)
                    bar.set_postfix(
                        loss=f"{last['loss']:.4f}", usage=f"{stats.usage:.0%}", ppl=f"{stats.perplexity:.0f}"
                    )
                    window.zero_()
                    last_counts.copy_(window_counts)
                    window_counts.zero_()
                    last_log_step = step
                if done:
                    break
                if signals.agreed():
                    raise signals.interrupted(step, None)
    finally:
        signals.restore()
        bar.close()
        logger.close()
    seconds = time.perf_counter() - started

    tokenizer.eval()
    eval_counts = torch.zeros(num_codes, dtype=torch.long, device=device)
    images_all = getattr(dataset, "images", None)
    if cfg.train.eval_images and images_all is not None:
        transform = EvalTransform(cfg.model.img_size, mean=mean, std=std)
        chunk = images_all[: cfg.train.eval_images]  # (N, C, S, S) uint8
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
    save_tokenizer(tokenizer_path, tokenizer, cfg, step=step, summary=summary)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out_dir / SUMMARY_NAME, lambda handle: handle.write(text.encode()))
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
