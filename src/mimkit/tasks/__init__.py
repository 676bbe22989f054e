"""The commands' work on top of the engine: each task reads its config schema and runs (so far the VQ-KD
tokenizer's training, :mod:`mimkit.tasks.tokenizer`)."""
