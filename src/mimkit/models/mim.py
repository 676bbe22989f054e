"""The frame every masked-image-modeling variant plugs into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from mimkit.masking import Masker, MaskSpec, mae_num_visible
from mimkit.models.mae_decoder import DecoderOutput
from mimkit.models.vit import EncoderOutput

if TYPE_CHECKING:
    from mimkit.config import Config


@dataclass
class MIMOutput:
    """Result of a pretraining forward pass.

    Attributes:
        loss: scalar loss on hidden patches.
        pred: (B, L, D_out) decoder predictions for every patch.
        mask: (B, L) bool, True = hidden.
        spec: the full :class:`MaskSpec` used.
        extras: optional tensors for analysis (encoder/decoder outputs).
    """

    loss: Tensor
    pred: Tensor
    mask: Tensor
    spec: MaskSpec
    extras: dict[str, Any] = field(default_factory=dict)


class MaskedImageModel(nn.Module):
    """``MaskedImageModel(encoder, decoder, masker, target)``: mask, encode visible, decode all, score hidden.

    Args:
        encoder: module ``(images, mask) -> EncoderOutput``.
        decoder: module ``(EncoderOutput, MaskSpec) -> DecoderOutput``.
        masker: callable making a :class:`MaskSpec`.
        target: module ``(images, pred, MaskSpec) -> loss``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, masker: Masker, target: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.masker = masker
        self.target = target
        self.name = type(encoder).__name__
        self.config: dict[str, Any] = {}  # constructor arguments, filled by the registry (enough to rebuild)
        self.run_config: Config | None = None  # the run's config when loaded from a training checkpoint

    @property
    def grid(self) -> tuple[int, int]:
        return cast(tuple[int, int], self.encoder.grid)

    def make_mask(
        self,
        batch: int,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        context: Any = None,
    ) -> MaskSpec:
        """Mask for a batch: from ``noise`` (B, L) exactly as MAE/HF do, else from the masker."""
        if noise is not None:
            num_patches = self.grid[0] * self.grid[1]
            if noise.shape != (batch, num_patches):
                raise ValueError(f"noise must have shape {(batch, num_patches)}, got {tuple(noise.shape)}")
            ratio = getattr(self.masker, "ratio", 0.75)
            return MaskSpec.from_noise(noise, mae_num_visible(num_patches, ratio))
        return self.masker(batch, self.grid, generator=generator, context=context)

    def forward(
        self,
        images: Tensor,
        noise: Tensor | None = None,
        *,
        mask: MaskSpec | None = None,
        generator: torch.Generator | None = None,
    ) -> MIMOutput:
        """Pretraining step's forward pass.

        Args:
            images: (B, C, H, W).
            noise: optional (B, L) noise deciding the random mask (ascending argsort, first
                ``num_visible`` kept), as in MAE and HuggingFace.
            mask: an explicit mask; overrides ``noise`` and the masker.
            generator: random generator for the masker (reproducible masks).
        """
        if mask is None:
            mask = self.make_mask(images.shape[0], noise=noise, generator=generator)
        mask = mask.to(images.device)
        enc: EncoderOutput = self.encoder(images, mask)
        dec: DecoderOutput = self.decoder(enc, mask)
        loss = self.target(images, dec.pred, mask)
        return MIMOutput(loss=loss, pred=dec.pred, mask=mask.mask, spec=mask)
