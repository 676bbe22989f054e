"""Dense transfer: detection (Mask R-CNN) and semantic segmentation (UperNet) on pretrained encoders.

Three packages, each importing only the ones before it:

* :mod:`~mimkit.dense.data`: COCO-format folders through pycocotools, bad annotations reported and
  skipped (``coco``); Pascal-VOC XML to COCO JSON (``voc``); a generated shapes set with exact masks
  (``shapes``); real sample data from package wheels and tiling of large images (``sample_data``);
  class-mask folders (``segmentation``).
* :mod:`~mimkit.dense.models`: MIMDet (ConvStem into a token-sampled ViT), ConvMAE stages, ViTDet's
  simple feature pyramid, FPN (``backbones``); torchvision's Mask R-CNN assembled on them (``maskrcnn``);
  UperNet and the segmenter (``upernet``).
* :mod:`~mimkit.dense.evaluation`: COCO box and mask AP, prediction pictures (``coco_ap``); mIoU
  (``miou``).

The commands that train and evaluate on them are tasks: :mod:`mimkit.tasks.detect` (``mimkit detect-train``
/ ``detect-eval``) and :mod:`mimkit.tasks.segment` (``mimkit seg-train`` / ``seg-eval``).
"""

from mimkit.dense.data.coco import AnnotationReport, CocoDetection
from mimkit.dense.data.shapes import generate_shapes
from mimkit.dense.data.voc import voc_to_coco
from mimkit.dense.evaluation.coco_ap import coco_evaluate
from mimkit.dense.models.backbones import (
    ConvMAEBackbone,
    ConvStem,
    FPNBackbone,
    MIMDetBackbone,
    SideStem,
    ViTPyramid,
    sample_tokens,
)
from mimkit.dense.models.maskrcnn import build_detector

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
