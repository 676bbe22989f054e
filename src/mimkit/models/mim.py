"""The frame every masked-image-modeling variant plugs into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from mimkit.masking import Masker, MaskSpec, mae_num_visible
from mimkit.masking.exploitation import ExploitationRate, exploitation_rate
from mimkit.masking.saliency import patch_saliency
from mimkit.models.mae_decoder import DecoderOutput
from mimkit.models.protocols import Decoder, Encoder, GuidedMasker, Target, TeacherTarget, check_part
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


LOSS_ON = ("hidden", "all")


class MaskedImageModel(nn.Module):
    """``MaskedImageModel(encoder, decoder, masker, target)``: mask, encode, predict every patch, score hidden.

    The encoder sees the visible patches (MAE) or every patch with the hidden ones as its mask embedding
    (BEiT; the encoder's ``encoder_sees == "all"``); in the second case its output is already in raster order
    with nothing missing, so the decoder is handed the mask that hides nothing.

    Args:
        encoder: an :class:`~mimkit.models.protocols.Encoder` module.
        decoder: a :class:`~mimkit.models.protocols.Decoder` module.
        masker: a :class:`~mimkit.models.protocols.Masker` (guided and stateful maskers implement the
            capability protocols there).
        target: a :class:`~mimkit.models.protocols.Target` module.
        loss_on: ``"hidden"`` (MAE: the loss on hidden patches) or ``"all"`` (every patch, MAE's ablation).

    Raises:
        TypeError: a part does not implement its protocol (the message names what it lacks).
    """

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, masker: Masker, target: nn.Module, loss_on: str = "hidden"
    ) -> None:
        super().__init__()
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        for part, protocol, role in (
            (encoder, Encoder, "encoder"),
            (decoder, Decoder, "decoder"),
            (masker, Masker, "masker"),
            (target, Target, "target"),
        ):
            check_part(part, protocol, role)
        self.loss_on = loss_on
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

    def set_img_size(self, img_size: int) -> None:
        """Take ``img_size`` x ``img_size`` images from now on (transfer at another resolution): the
        encoder's patch grid and every MAE-style decoder's position table follow, and :attr:`config`
        records the size so that the model rebuilds as it is now."""
        from mimkit.models.mae_decoder import MAEDecoder

        self.encoder.set_img_size(img_size)  # type: ignore[operator]
        for module in self.decoder.modules():
            if isinstance(module, MAEDecoder):
                module.set_grid(self.grid)
        self.config["img_size"] = img_size

    def make_mask(
        self,
        batch: int,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        context: Any = None,
        images: Tensor | None = None,
    ) -> MaskSpec:
        """Mask for a batch: from ``noise`` (B, L) exactly as MAE/HF do, else from the masker.

        A :class:`~mimkit.models.protocols.GuidedMasker` names what it needs in its ``guidance`` attribute;
        given ``images`` (B, C, H, W), the model computes it without gradients into ``context``.
        """
        if noise is not None:
            num_patches = self.grid[0] * self.grid[1]
            if noise.shape != (batch, num_patches):
                raise ValueError(f"noise must have shape {(batch, num_patches)}, got {tuple(noise.shape)}")
            return MaskSpec.from_noise(noise, mae_num_visible(num_patches, self.masker.ratio))
        guidance = self.masker.guidance if isinstance(self.masker, GuidedMasker) else None
        if context is None and guidance is not None:
            if images is None:
                raise ValueError(f"{self.masker!r} is guided by the model: pass images= to make_mask")
            context = {guidance: self.guidance(images, guidance, generator=generator)}
        return self.masker(batch, self.grid, generator=generator, context=context)

    @torch.no_grad()
    def guidance(self, images: Tensor, kind: str, *, generator: torch.Generator | None = None) -> Tensor:
        """What a guided masker asks for, computed in eval mode without gradients.

        Args:
            images: (B, C, H, W) normalized images.
            kind: ``"cls_attention"``: (B, L) head-averaged attention of the class token over the patches
                in the last encoder block, all patches visible (the attention each patch receives for an
                encoder without a class token). ``"teacher_attention"``: (B, L) the frozen teacher's
                saliency of each patch (:meth:`~mimkit.targets.Teacher.saliency`).
                ``"encoder_features"``: (B, L, D) patch tokens of encoder block ``masker.layer`` (None: the
                middle one; a masker that is no :class:`~mimkit.models.protocols.GuidedMasker`: the middle
                one) on all patches (the ideal setting).
                ``"decoder_features"``: (B, L, Dd) patch tokens of decoder block ``masker.layer`` after a
                forward pass with a random mask of the masker's ratio (the practical setting: visible
                tokens and contextualized mask tokens).
            generator: source of the random mask of ``"decoder_features"``.
        """
        from mimkit.masking import RandomMasker

        was_training = self.training
        self.eval()
        try:
            if kind == "cls_attention":
                enc = self.encoder(images, return_attn=True)
                return patch_saliency(enc.attentions[-1].mean(dim=1), enc.num_prefix_tokens)  # (B, L)
            if kind == "teacher_attention":
                if not isinstance(self.target, TeacherTarget):
                    raise ValueError("teacher attention needs a teacher target (maskdistill or milan)")
                return self.target.teacher.saliency(images, self.grid)  # type: ignore[operator]  # (B, L)
            layer = self.masker.layer if isinstance(self.masker, GuidedMasker) else None
            if layer is None:  # the middle block of the module whose features are clustered
                blocks = self.decoder.blocks if kind == "decoder_features" else self.encoder.blocks
                layer = len(blocks) // 2 - 1  # type: ignore[arg-type]
            if kind == "encoder_features":
                enc = self.encoder(images, return_hidden=True)
                return enc.hidden_states[layer][:, enc.num_prefix_tokens :]  # (B, L, D)
            if kind == "decoder_features":
                mask = RandomMasker(self.masker.ratio)(images.shape[0], self.grid, generator=generator)
                mask = mask.to(images.device)
                dec = self.decoder(self.encoder(images, mask), mask, return_hidden=True)
                return dec.hidden_states[layer][:, self.decoder.num_prefix_tokens :]  # (B, L, Dd)
        finally:
            self.train(was_training)
        raise ValueError(f"unknown masker guidance {kind!r}")

    @torch.no_grad()
    def exploitation(self, images: Tensor, mask: MaskSpec) -> ExploitationRate:
        """Exploitation rate of visible and mask tokens by the decoder on a batch and its mask (eval mode,
        no gradients); see :func:`~mimkit.masking.exploitation.exploitation_rate`."""
        was_training = self.training
        self.eval()
        try:
            mask = mask.to(images.device)
            dec = self.decoder(self.encoder(images, mask), mask, return_attn=True)
        finally:
            self.train(was_training)
        prefix = cast(int, self.decoder.num_prefix_tokens)
        return exploitation_rate(dec.attentions, mask.mask, num_prefix_tokens=prefix)

    def decoder_mask(self, mask: MaskSpec) -> MaskSpec:
        """The mask the decoder is handed: ``mask``, or the one hiding nothing after a BEiT-style encoder (its
        output holds every patch in raster order, the hidden ones already encoded from the mask embedding)."""
        if self.encoder.encoder_sees == "all":
            return MaskSpec.unmasked(mask.mask.shape[0], mask.num_patches, mask.mask.device)
        return mask

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
            mask = self.make_mask(images.shape[0], noise=noise, generator=generator, images=images)
        mask = mask.to(images.device)
        # e.g. BEiT v2's class-token head reads an intermediate block's output
        enc: EncoderOutput = self.encoder(images, mask, return_hidden=self.decoder.needs_hidden_states)
        dec: DecoderOutput = self.decoder(enc, self.decoder_mask(mask))
        scored = mask if self.loss_on == "hidden" else mask.scoring_all_patches()
        loss = self.target(images, dec.pred, scored)
        extras: dict[str, Any] = {}
        if dec.aux_pred is not None:
            extras["main_loss"] = loss.detach()
            extras["aux_loss"] = self.target(images, dec.aux_pred, scored)
            loss = loss + extras["aux_loss"]
        return MIMOutput(loss=loss, pred=dec.pred, mask=mask.mask, spec=mask, extras=extras)
