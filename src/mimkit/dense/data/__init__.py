"""Dense-transfer data: COCO-format folders, Pascal-VOC conversion, the generated shapes set, sample data
from package wheels and class-mask segmentation folders. Imports nothing else of :mod:`mimkit.dense`."""
