"""What the decoder must predict, and the loss on hidden patches."""

from mimkit.targets.pixel import LOSSES, PixelTarget, elementwise_loss, masked_mean

__all__ = ["LOSSES", "PixelTarget", "elementwise_loss", "masked_mean"]
