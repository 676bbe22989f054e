"""What the decoder must predict, and the loss on hidden patches."""

from mimkit.targets.hog import HOGFeatures
from mimkit.targets.pixel import LOSSES, PixelTarget, elementwise_loss, masked_mean
from mimkit.targets.teacher import Teacher, build_teacher

__all__ = ["LOSSES", "HOGFeatures", "PixelTarget", "Teacher", "build_teacher", "elementwise_loss", "masked_mean"]
