"""Encoders, decoders, the :class:`MaskedImageModel` frame and the model registry."""

from mimkit.models.load import convert_checkpoint, load_checkpoint, save_checkpoint_as
from mimkit.models.mae_decoder import DecoderOutput, MAEDecoder
from mimkit.models.mim import MaskedImageModel, MIMOutput
from mimkit.models.prompting_decoder import PromptingDecoder
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
    "PromptingDecoder",
    "VisionTransformer",
    "convert_checkpoint",
    "create_encoder",
    "create_model",
    "load_checkpoint",
    "model_args",
    "save_checkpoint_as",
]
