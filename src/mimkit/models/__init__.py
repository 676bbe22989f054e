"""Encoders, decoders, the :class:`MaskedImageModel` frame and the registry of architectures.

:mod:`mimkit.build` assembles them with a masker and a target (``create_model``, ``build_model``,
``load_checkpoint``); :mod:`mimkit.checkpoints` reads, writes and converts their weights.
"""

from mimkit.models.mae_decoder import DecoderOutput, MAEDecoder
from mimkit.models.mim import MaskedImageModel, MIMOutput
from mimkit.models.prompting_decoder import PromptingDecoder
from mimkit.models.registry import DECODERS, ENCODERS, create_decoder, create_encoder, model_args
from mimkit.models.vit import EncoderOutput, VisionTransformer

__all__ = [
    "DECODERS",
    "ENCODERS",
    "DecoderOutput",
    "EncoderOutput",
    "MAEDecoder",
    "MIMOutput",
    "MaskedImageModel",
    "PromptingDecoder",
    "VisionTransformer",
    "create_decoder",
    "create_encoder",
    "model_args",
]
