"""Weighted k-nearest-neighbour evaluation of frozen features (DINO's kNN classifier)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: Tensor,
    *,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    pool: str = "cls",
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str | None = None,
    gather: bool = True,
) -> Tensor:
    """Pooled features of a whole image tensor, batch by batch, in eval mode and without gradients.

    Args:
        encoder: module with ``forward_features(images, pool)`` returning (B, D), e.g. a
            :class:`~mimkit.models.VisionTransformer`. Its training flag is restored afterwards.
        images: (N, C, H, W) uint8 images (or anything ``transform`` accepts), kept on the CPU.
        transform: maps one batch (B, C, H, W) on ``device`` to the normalized float batch the
            encoder expects.
        batch_size: images per forward pass.
        pool: ``"cls"`` or ``"avg"`` (see ``forward_features``).
        device: where to run; defaults to the encoder's device.
        progress: show a tqdm bar.
        desc: the bar's label; defaults to ``extract features (<pool>)``.
        gather: under torchrun, split the images over the ranks (False: encode the given images here).

    Under ``torchrun`` each rank encodes a contiguous ``1/world_size`` of the images and every rank gets
    all features back (gathered in order).

    Returns:
        (N, D) float32 features on the CPU, in the order of ``images``.
    """
    from mimkit.engine import distributed

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = next(encoder.parameters()).device
    where = distributed.place()
    if gather and where.distributed:
        count, world = images.shape[0], where.world_size
        if count < world:
            raise ValueError(f"{count} images cannot be shared by {world} ranks; run with fewer processes")
        mine = extract_features(
            encoder,
            images[where.rank * count // world : (where.rank + 1) * count // world],
            transform=transform,
            batch_size=batch_size,
            pool=pool,
            device=device,
            progress=progress and where.is_main,
            desc=desc,
            gather=False,
        )
        return distributed.all_gather_rows(mine, device)
    was_training = encoder.training
    encoder.eval()
    features: list[Tensor] = []
    try:
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc=desc or f"extract features ({pool})", unit="batch", disable=not progress):
            batch = transform(images[start : start + batch_size].to(device, non_blocking=True))  # (B, C, H, W)
            features.append(encoder.forward_features(batch, pool=pool).float().cpu())  # type: ignore[operator]
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features)  # (N, D)


def _check_inputs(train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dims, test features {test_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must be ({train_features.shape[0]},), got {tuple(train_labels.shape)}")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be in [1, {train_features.shape[0]}] (the number of training features), got {k}")


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Class scores of DINO's weighted kNN: each of the k most cosine-similar training features votes
    for its label with weight ``exp(similarity / temperature)``.

    Args:
        train_features: (N, D).
        train_labels: (N,) integer labels.
        test_features: (M, D).
        k: neighbours per test feature.
        temperature: softness of the vote weights (DINO: 0.07).
        num_classes: number of classes; defaults to ``max(train_labels) + 1``.
        chunk: test features per similarity block, bounding memory to ``chunk * N``.

    Returns:
        (M, num_classes) summed vote weights.
    """
    _check_inputs(train_features, train_labels, test_features, k)
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    train = F.normalize(train_features.float(), dim=1)  # (N, D)
    test = F.normalize(test_features.float().to(train.device), dim=1)  # (M, D)
    labels = train_labels.to(train.device).long()
    scores = []
    for start in range(0, test.shape[0], chunk):
        similarity = test[start : start + chunk] @ train.T  # (m, N)
        top_sim, top_index = similarity.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()  # (m, k)
        votes = torch.zeros(top_index.shape[0], num_classes, device=train.device)  # (m, num_classes)
        votes.scatter_add_(1, labels[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)  # (M, num_classes)


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Predicted labels (M,) of DINO's weighted kNN; arguments as in :func:`knn_scores`."""
    return knn_scores(train_features, train_labels, test_features, k, temperature, num_classes, chunk).argmax(dim=1)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Top-1 (and, with at least 5 classes, top-5) accuracy in [0, 1] of the weighted kNN.

    Args:
        test_labels: (M,) integer labels; other arguments as in :func:`knn_scores`.
        num_classes: defaults to the largest label in train or test labels + 1.

    Returns:
        ``{"top1": ..., "top5": ...}`` (``top5`` only when there are at least 5 classes).
    """
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels must be ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, test_features, k, temperature, num_classes, chunk)
    labels = test_labels.to(scores.device).long().unsqueeze(1)  # (M, 1)
    result = {"top1": (scores.argmax(dim=1, keepdim=True) == labels).float().mean().item()}
    if num_classes >= 5:
        result["top5"] = (scores.topk(5, dim=1).indices == labels).any(dim=1).float().mean().item()
    return result
