"""Dense-transfer models: MIMDet and ConvMAE backbones, ViTDet's simple feature pyramid, FPN, the Mask
R-CNN assembled on them and the UperNet segmenter. Imports :mod:`mimkit.dense.data` at most."""
