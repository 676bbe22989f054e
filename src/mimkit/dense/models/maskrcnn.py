"""torchvision's Mask R-CNN (or Faster R-CNN for box-only data) on a mimkit backbone, heads sized for it.

torchvision's defaults are sized for 800-pixel COCO images and a 256-wide FPN (a 12.8 M-parameter box
head); here the FPN width, box-head width, anchor sizes and proposal counts are arguments, so the same
assembly serves a CPU test on 64-pixel images and a GPU run at COCO scale. No weights are downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from mimkit.dense.models.backbones import FPNBackbone


def build_detector(
    backbone: FPNBackbone,
    num_classes: int,
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    masks: bool = True,
    anchor_sizes: Sequence[int] = (8, 16, 32, 64),
    box_head_dim: int = 256,
    rpn_pre_nms_top_n: int = 600,
    rpn_post_nms_top_n: int = 300,
    box_batch_size_per_image: int = 128,
    detections_per_image: int = 50,
    score_threshold: float = 0.05,
) -> MaskRCNN | FasterRCNN:
    """Mask R-CNN (``masks``) or Faster R-CNN with an FPN backbone of four levels.

    Args:
        backbone: an :class:`~mimkit.dense.models.backbones.FPNBackbone`.
        num_classes: object classes, background not counted.
        img_size: side of the (square) input images; torchvision's transform keeps it (min = max size,
            no padding), so a ViT backbone sees exactly its pretraining grid.
        mean, std: per-channel normalization of [0, 1] images, the encoder's pretraining one.
        masks: add the mask branch (Mask R-CNN).
        anchor_sizes: one anchor size in pixels per pyramid level (aspect ratios 0.5, 1, 2).
        box_head_dim: width of the two-layer box head.
        rpn_pre_nms_top_n, rpn_post_nms_top_n: proposals kept per image before and after NMS (train and test).
        box_batch_size_per_image: RoIs sampled per image to train the box head.
        detections_per_image: at most this many detections per image.
        score_threshold: detections below this score are dropped.
    """
    levels = [str(index) for index in range(len(backbone.strides))]
    if len(anchor_sizes) != len(levels):
        raise ValueError(f"anchor_sizes needs one size per pyramid level ({len(levels)}), got {tuple(anchor_sizes)}")
    channels = backbone.out_channels
    anchors = AnchorGenerator(tuple((int(size),) for size in anchor_sizes), ((0.5, 1.0, 2.0),) * len(levels))
    kwargs: dict[str, Any] = dict(
        min_size=img_size,
        max_size=img_size,
        image_mean=list(mean),
        image_std=list(std),
        size_divisible=1,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=detections_per_image,
        box_score_thresh=score_threshold,
    )
    if not masks:
        return FasterRCNN(backbone, num_classes=None, **kwargs)
    return MaskRCNN(
        backbone,
        num_classes=None,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, (channels,) * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes + 1),
        **kwargs,
    )
