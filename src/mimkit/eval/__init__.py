"""Evaluation protocols for pretrained encoders (kNN; probes and fine-tuning build on it)."""
