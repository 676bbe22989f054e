"""Dense-transfer evaluation: COCO box and mask AP, prediction pictures, and segmentation's mIoU. Imports
:mod:`mimkit.dense.data` and :mod:`mimkit.dense.models` at most."""
