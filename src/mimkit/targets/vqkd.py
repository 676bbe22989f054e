"""BEiT v2's visual tokenizer: vector-quantized knowledge distillation (VQ-KD).

Peng et al. 2022, "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers". A ViT encoder
sees the whole image; per patch, ``encode_task_layer`` (Linear, Tanh, Linear) maps its token to a
``code_dim`` vector that is l2-normalized and replaced by the nearest code of an l2-normalized codebook
(nearest by cosine). A shallow transformer decoder reads the codes and ``decode_task_layer`` (Linear, Tanh,
Linear) predicts a frozen teacher's features of that patch; the loss is ``1 - cosine`` between prediction
and teacher features, averaged over patches, plus the quantizer's commitment loss. Once trained, the
codes of :meth:`VQKDTokenizer.tokenize` are the classification targets of masked image modeling
(predict each hidden patch's code with cross-entropy). ``mimkit tokenizer-train`` trains it
(:mod:`mimkit.tasks.tokenizer`).

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
142) and a lower loss. :class:`~mimkit.tasks.tokenizer.TokenizerConfig` therefore defaults to 0.9; the
quantizer keeps BEiT v2's 0.99 for long runs.

Codebook health: a code histogram's *usage* is the fraction of codes hit, its *perplexity*
``exp(entropy)`` the effective number of codes. :func:`check_codebook` calls a histogram collapsed, and
warns with :class:`CodebookCollapseWarning`, when fewer than ``min_usage`` (10 %) of the codes it could
fill are used or its perplexity is below ``min_perplexity`` (5 %) of them; "could fill" is
``min(num_codes, num_tokens)``, so a small batch is not mistaken for a collapse.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.files import CheckpointError, load_checkpoint_file, save_checkpoint
from mimkit.layers import Block, init_vit_weights, sincos_2d
from mimkit.layers.quantizer import QuantizerOutput, VectorQuantizer
from mimkit.models.registry import ENCODERS, create_encoder
from mimkit.targets.teachers import Teacher, build_teacher, keep_teacher_out_of_state_dict

if TYPE_CHECKING:
    from mimkit.models.vit import VisionTransformer

TOKENIZER_FORMAT = "mimkit.vqkd_tokenizer"
TOKENIZER_NAME = "tokenizer.pt"
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


def save_tokenizer(
    path: str | Path,
    tokenizer: VQKDTokenizer,
    *,
    teacher: str,
    teacher_options: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write a tokenizer file atomically: its weights (no teacher), constructor arguments, the ``teacher``
    spec and ``teacher_options`` of :func:`build_teacher` that rebuild its teacher, its image normalization
    (``tokenizer.config``'s mean and std), the run ``config`` as plain values, plus ``extra`` plain values
    (e.g. ``step``, ``summary``)."""
    path = Path(path)
    state = {
        "format": TOKENIZER_FORMAT,
        "version": 1,
        "model": tokenizer.state_dict(),
        "model_args": dict(tokenizer.config),
        "teacher": {"spec": teacher, "options": dict(teacher_options or {})},
        "normalization": {"mean": tokenizer.config["mean"], "std": tokenizer.config["std"]},
        "config": dict(config or {}),
        **extra,
    }
    save_checkpoint(path, state)
    return path


def load_tokenizer(
    path: str | Path, *, map_location: str | torch.device = "cpu", with_teacher: bool = False
) -> VQKDTokenizer:
    """Load a tokenizer written by :func:`save_tokenizer` (``mimkit tokenizer-train``), in eval mode.

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
