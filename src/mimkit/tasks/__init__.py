"""The commands' work on top of the engine: each task reads its config schema and runs. A whole pretraining
job with its end-of-run checks (:mod:`mimkit.tasks.pretrain`), the VQ-KD tokenizer's training
(:mod:`mimkit.tasks.tokenizer`), detection (:mod:`mimkit.tasks.detect`) and segmentation
(:mod:`mimkit.tasks.segment`) on the dense-transfer parts of :mod:`mimkit.dense`."""
