"""torchvision's detection operators work in the installed environment (the Mask R-CNN needs them)."""

import torch
from torchvision.ops import box_iou, nms, roi_align


def test_nms_keeps_the_best_of_overlapping_boxes_and_the_separate_ones() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [3, 2]  # box 3 suppresses 0 (IoU 0.9) and 1; box 2 overlaps nothing
    assert box_iou(boxes[:1], boxes[1:2]).item() == torch.tensor(81 / 119).item()


def test_roi_align_samples_a_linear_ramp_exactly() -> None:
    # the feature at column j is j, so bilinear sampling at continuous x returns x
    width = 16
    features = torch.arange(width, dtype=torch.float32).expand(1, 1, 8, width).contiguous()  # (1, 1, 8, 16)
    rois = torch.tensor([[0, 2.0, 1.0, 10.0, 5.0]])  # batch index, x0, y0, x1, y1
    out = roi_align(features, rois, output_size=(2, 4), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    # four bins of width 2 from x = 2 (centers 3, 5, 7, 9), shifted by aligned=True's half pixel
    expected = torch.tensor([2.5, 4.5, 6.5, 8.5]).expand(2, 4)
    assert out.shape == (1, 1, 2, 4)
    torch.testing.assert_close(out[0, 0], expected)
