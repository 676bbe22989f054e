"""Maskers: each returns a :class:`MaskSpec`; the training loop does not know which one runs."""

from mimkit.masking.block import BlockMasker
from mimkit.masking.grid import GridMasker
from mimkit.masking.guided import AttentionMasker, SelfGuidedMasker, informed_mask
from mimkit.masking.ncut import choose_foreground, ncut_bipartition, ncut_eigenvector, patch_affinity
from mimkit.masking.random import FineRandomMasker, RandomMasker
from mimkit.masking.spec import Masker, MaskSpec, OptionError, mae_num_visible, num_hidden_patches

MASKERS = {
    "random": RandomMasker,
    "fine_random": FineRandomMasker,
    "block": BlockMasker,
    "grid": GridMasker,
    "attention": AttentionMasker,
    "self_guided": SelfGuidedMasker,
}


def create_masker(kind: str, ratio: float, **kwargs: object) -> Masker:
    """Build a masker by its ``mask.type`` name, e.g. ``create_masker("block", 0.4, min_num_patches=16)``."""
    if kind not in MASKERS:
        raise ValueError(f"unknown mask.type {kind!r}; choose one of {sorted(MASKERS)}")
    return MASKERS[kind](ratio=ratio, **kwargs)  # type: ignore[arg-type]


__all__ = [
    "MASKERS",
    "AttentionMasker",
    "BlockMasker",
    "FineRandomMasker",
    "GridMasker",
    "MaskSpec",
    "Masker",
    "OptionError",
    "RandomMasker",
    "SelfGuidedMasker",
    "choose_foreground",
    "create_masker",
    "informed_mask",
    "mae_num_visible",
    "ncut_bipartition",
    "ncut_eigenvector",
    "num_hidden_patches",
    "patch_affinity",
]
