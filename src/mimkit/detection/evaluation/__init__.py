"""Dense-transfer evaluation: COCO box and mask AP, prediction pictures, and segmentation's mIoU. Imports
:mod:`mimkit.detection.data` and :mod:`mimkit.detection.models` at most."""
