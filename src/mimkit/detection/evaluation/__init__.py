"""Dense-transfer evaluation: COCO box and mask AP and prediction pictures. Imports
:mod:`mimkit.detection.data` and :mod:`mimkit.detection.models` at most."""
