"""Normalized-cut bipartition of patch features, as used by Self-Guided MAE to make informed masks.

Self-Guided MAE (Shin et al., NeurIPS 2024) observes that MAE learns to cluster patches early in
pretraining; it then bipartitions the model's own patch similarities with a normalized cut
(Shi & Malik, 2000) and hides the object side. The graph is the article's fully connected one: cosine
similarities of L2-normalized patch features as edge weights, negatives clamped to a small ``eps``.
TokenCut's (Wang et al., 2022) graph, the similarities binarized at ``tau``, is an option.

Everything is batched (``torch.linalg.eigh`` on a (B, L, L) stack), free of Python loops over the
batch and of host synchronisation, so it runs unchanged on CPU and CUDA.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FOREGROUND_RULES",
    "border_patches",
    "choose_foreground",
    "ncut_bipartition",
    "ncut_eigenvector",
    "ncut_split",
    "patch_affinity",
    "similarity_to_mean",
]

FOREGROUND_RULES = ("border", "mean", "eigenvector")


def _check_features(features: Tensor) -> None:
    if features.ndim != 3:
        raise ValueError(
            f"features must be (B, L, D), got shape {tuple(features.shape)}; add a batch dimension with "
            "features.unsqueeze(0) for a single image"
        )
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}; call .float() first")


def _check_affinity(affinity: Tensor) -> None:
    if affinity.ndim != 3 or affinity.shape[1] != affinity.shape[2]:
        raise ValueError(f"affinity must be (B, L, L), got shape {tuple(affinity.shape)}")
    if not affinity.is_floating_point():
        raise TypeError(f"affinity must be a floating-point tensor, got {affinity.dtype}; call .float() first")
    if affinity.shape[1] < 2:
        raise ValueError(f"a bipartition needs at least 2 patches, got L={affinity.shape[1]}")


def patch_affinity(features: Tensor, *, tau: float = 0.2, eps: float = 1e-5, binarize: bool = False) -> Tensor:
    """Patch-to-patch affinity graph of a batch of images.

    With ``binarize=False`` (the default, Self-Guided MAE's fully connected graph) the edge weights are
    the cosine similarities of L2-normalized features, clamped to ``>= eps`` (negative similarities
    would break the degree matrix). With ``binarize=True`` (TokenCut) they are thresholded: entries
    above ``tau`` become 1 and all others ``eps``, so the cut depends on *which* patches are alike
    rather than on how alike. ``eps > 0`` keeps the graph connected, so every degree is positive and
    the eigenproblem well posed.

    Args:
        features: (B, L, D) patch features (e.g. decoder tokens without prefix tokens).
        tau: similarity threshold of the binary graph (ignored when ``binarize=False``).
        eps: weight of the "no edge" entries; must be positive.
        binarize: threshold at ``tau`` (True) or keep clamped similarities (False).

    Returns:
        (B, L, L) symmetric non-negative affinity ``W``, in the dtype of ``features``.
    """
    _check_features(features)
    if eps <= 0:
        raise ValueError(f"eps must be positive to keep the graph connected, got {eps}")
    unit = F.normalize(features, dim=-1)  # (B, L, D)
    similarity = unit @ unit.transpose(1, 2)  # (B, L, L), in [-1, 1]
    similarity = 0.5 * (similarity + similarity.transpose(1, 2))  # exactly symmetric despite rounding
    if binarize:
        return torch.where(similarity > tau, torch.ones_like(similarity), torch.full_like(similarity, eps))
    return similarity.clamp(min=eps)


def ncut_eigenvector(affinity: Tensor, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Second-smallest generalized eigenpair of the normalized cut, ``(D - W) y = lambda D y``.

    Solved through the symmetric normalized Laplacian
    ``D^{-1/2} (D - W) D^{-1/2} z = lambda z`` with batched ``torch.linalg.eigh`` and mapped back as
    ``y = D^{-1/2} z``. The sign, arbitrary for an eigenvector, is fixed so that the entry of largest
    ``|y|`` is positive: the same input always gives the same ``y``.

    Args:
        affinity: (B, L, L) symmetric non-negative affinity with positive row sums
            (e.g. from :func:`patch_affinity`).
        dtype: dtype of the eigensolver; float64 (default) is cheap at ViT patch counts and keeps
            near-degenerate eigenvalues apart. The outputs are returned in this dtype.

    Returns:
        ``(eigenvalue, y)``: (B,) second-smallest eigenvalue and (B, L) its generalized eigenvector.
    """
    _check_affinity(affinity)
    weights = affinity.to(dtype)  # (B, L, L)
    degree = weights.sum(-1)  # (B, L)
    inv_sqrt_degree = degree.clamp(min=torch.finfo(dtype).tiny).rsqrt()  # (B, L)
    normalized = weights * inv_sqrt_degree[:, :, None] * inv_sqrt_degree[:, None, :]  # D^-1/2 W D^-1/2
    identity = torch.eye(weights.shape[-1], dtype=dtype, device=weights.device)
    laplacian = identity - normalized  # (B, L, L), D^-1/2 (D - W) D^-1/2
    eigenvalues, eigenvectors = torch.linalg.eigh(laplacian)  # ascending; (B, L), (B, L, L)
    y = eigenvectors[:, :, 1] * inv_sqrt_degree  # (B, L)
    anchor = y.abs().argmax(-1, keepdim=True)  # (B, 1)
    y = y * torch.where(y.gather(-1, anchor) < 0, -1.0, 1.0).to(dtype)  # largest |y| entry positive
    return eigenvalues[:, 1], y


def ncut_bipartition(
    features: Tensor | None = None,
    *,
    affinity: Tensor | None = None,
    tau: float = 0.2,
    eps: float = 1e-5,
    binarize: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Split each image's patches in two with a normalized cut.

    The second-smallest generalized eigenvector ``y`` of ``(D - W) y = lambda D y`` is thresholded
    at its mean, as in TokenCut. ``True`` marks ``y > mean(y)``, with the sign of ``y`` fixed so that
    the patch of largest ``|y|`` is positive: the ``True`` side always holds the patch the cut
    separates most strongly, and the same input always gives the same partition. Which side is the
    object is a separate decision, see :func:`choose_foreground`.

    Args:
        features: (B, L, D) patch features; the affinity is built with :func:`patch_affinity`.
        affinity: (B, L, L) precomputed affinity instead of ``features`` (give exactly one).
        tau: threshold of :func:`patch_affinity` (features only).
        eps: weight of absent edges of :func:`patch_affinity` (features only).
        binarize: binarize the affinity at ``tau``, TokenCut's graph (features only).
        dtype: eigensolver dtype, see :func:`ncut_eigenvector`.

    Returns:
        (B, L) bool partition (:func:`ncut_split` also returns the eigenvector).
    """
    if features is not None and affinity is None:
        affinity = patch_affinity(features, tau=tau, eps=eps, binarize=binarize)
    elif features is not None or affinity is None:
        raise ValueError("give exactly one of features (B, L, D) or affinity= (B, L, L)")
    return ncut_split(affinity, dtype=dtype)[0]


def ncut_split(affinity: Tensor, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """:func:`ncut_bipartition` of a precomputed (B, L, L) affinity, returning ``(partition, y)``: the
    (B, L) bool partition ``y > mean(y)`` and the (B, L) eigenvector ``y`` it was cut from."""
    _, y = ncut_eigenvector(affinity, dtype=dtype)  # (B, L)
    return y > y.mean(-1, keepdim=True), y


def border_patches(grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """(L,) bool, True for the patches on the image border of a (grid_h, grid_w) raster grid."""
    grid_h, grid_w = grid
    rows = torch.arange(grid_h, device=device)[:, None]  # (h, 1)
    cols = torch.arange(grid_w, device=device)[None, :]  # (1, w)
    border = (rows == 0) | (rows == grid_h - 1) | (cols == 0) | (cols == grid_w - 1)  # (h, w)
    return border.reshape(-1)


def similarity_to_mean(features: Tensor) -> Tensor:
    """(B, L) cosine similarity of every patch feature to the image's mean patch feature (the article's
    Fig. 2b: background patches are the majority and lie near the mean, object patches far from it).

    Args:
        features: (B, L, D) patch features.
    """
    _check_features(features)
    unit = F.normalize(features.float(), dim=-1)  # (B, L, D)
    mean = F.normalize(unit.mean(dim=1, keepdim=True), dim=-1)  # (B, 1, D)
    return (unit * mean).sum(-1)  # (B, L)


def choose_foreground(
    partition: Tensor,
    grid: tuple[int, int],
    how: Literal["border", "mean", "eigenvector"] = "border",
    *,
    features: Tensor | None = None,
    eigenvector: Tensor | None = None,
) -> Tensor:
    """Pick the object side of each bipartition (the article does not say how; three rules).

    - ``"border"`` (object-centric): the side touching fewer border patches of the grid is the object,
      since backgrounds surround objects; ties go to the smaller side.
    - ``"mean"``: the side whose patches are on average less similar to the mean patch (needs
      ``features``): the background is the majority and lies near the mean.
    - ``"eigenvector"`` (TokenCut): the side holding the entry of largest ``|y|`` of the Ncut
      eigenvector (needs ``eigenvector``; :func:`ncut_bipartition` puts it on the ``True`` side).

    Remaining ties keep the ``True`` side of ``partition``.

    Args:
        partition: (B, L) bool, e.g. from :func:`ncut_bipartition`, patches in raster order.
        grid: (grid_h, grid_w) patch grid with ``grid_h * grid_w == L``.
        how: ``"border"``, ``"mean"`` or ``"eigenvector"``.
        features: (B, L, D) the features that were cut, for ``"mean"``.
        eigenvector: (B, L) the Ncut eigenvector, for ``"eigenvector"``.

    Returns:
        (B, L) bool, True = object (foreground) patch.
    """
    if partition.ndim != 2 or partition.dtype != torch.bool:
        raise ValueError(f"partition must be a (B, L) bool tensor, got {partition.dtype} {tuple(partition.shape)}")
    if grid[0] * grid[1] != partition.shape[1]:
        raise ValueError(f"grid {grid} holds {grid[0] * grid[1]} patches but partition has L={partition.shape[1]}")
    if how not in FOREGROUND_RULES:
        raise ValueError(f"unknown how={how!r}; choose one of {FOREGROUND_RULES}")
    size_true = partition.sum(-1)  # (B,)
    size_false = partition.shape[1] - size_true
    if how == "border":
        border = border_patches(grid, partition.device)  # (L,)
        border_true = (partition & border).sum(-1)  # (B,)
        border_false = (~partition & border).sum(-1)
        flip = torch.where(border_true == border_false, size_false < size_true, border_false < border_true)
    elif how == "mean":
        if features is None or features.shape[:2] != partition.shape:
            raise ValueError("how='mean' needs the (B, L, D) features that were cut")
        similarity = similarity_to_mean(features)  # (B, L)
        mean_true = (similarity * partition).sum(-1) / size_true.clamp_min(1)  # (B,)
        mean_false = (similarity * ~partition).sum(-1) / size_false.clamp_min(1)
        flip = mean_false < mean_true  # the False side lies farther from the mean patch
    else:
        if eigenvector is None or eigenvector.shape != partition.shape:
            raise ValueError("how='eigenvector' needs the (B, L) Ncut eigenvector")
        anchor = eigenvector.abs().argmax(-1, keepdim=True)  # (B, 1)
        flip = ~partition.gather(-1, anchor)[:, 0]  # (B,) the largest |y| entry lies on the False side
    return partition ^ flip[:, None]
