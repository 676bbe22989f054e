"""Encoders, decoders, the :class:`MaskedImageModel` frame and the model registry."""

from mimkit.models.mae_decoder import DecoderOutput, MAEDecoder
from mimkit.models.mim import MaskedImageModel, MIMOutput
from mimkit.models.registry import DECODERS, ENCODERS, create_encoder, create_model, model_args
from mimkit.models.vit import EncoderOutput, VisionTransformer

__all__ = [
    "DECODERS",
    "ENCODERS",
    "DecoderOutput",
    "EncoderOutput",
    "MAEDecoder",
    "MIMOutput",
    "MaskedImageModel",
    "VisionTransformer",
    "create_encoder",
    "create_model",
    "model_args",
]
