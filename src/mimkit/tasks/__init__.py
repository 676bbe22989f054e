"""The commands' work on top of the engine: each task reads its config schema and runs (so far a whole
pretraining job with its end-of-run checks, :mod:`mimkit.tasks.pretrain`, and the VQ-KD tokenizer's
training, :mod:`mimkit.tasks.tokenizer`)."""
