"""Dense-transfer models: MIMDet and ConvMAE backbones, ViTDet's simple feature pyramid, FPN and the Mask
R-CNN assembled on them. Imports :mod:`mimkit.detection.data` at most."""
