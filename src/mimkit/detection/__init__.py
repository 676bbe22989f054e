"""Dense transfer: detection (Mask R-CNN) and semantic segmentation (UperNet) on pretrained encoders.

Four packages, each importing only the ones before it:

* :mod:`~mimkit.detection.data`: COCO-format folders through pycocotools, bad annotations reported and
  skipped (``coco``); Pascal-VOC XML to COCO JSON (``voc``); a generated shapes set with exact masks
  (``shapes``); real sample data from package wheels and tiling of large images (``sample_data``);
  class-mask folders (``segmentation``).
* :mod:`~mimkit.detection.models`: MIMDet (ConvStem into a token-sampled ViT), ConvMAE stages, ViTDet's
  simple feature pyramid, FPN (``backbones``); torchvision's Mask R-CNN assembled on them (``maskrcnn``);
  UperNet and the segmenter (``upernet``).
* :mod:`~mimkit.detection.evaluation`: COCO box and mask AP, prediction pictures (``coco_ap``); mIoU
  (``miou``).
* :mod:`~mimkit.detection.tasks`: ``mimkit detect-train`` / ``detect-eval`` (``detect``), ``mimkit
  seg-train`` / ``seg-eval`` (``segment``).
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
