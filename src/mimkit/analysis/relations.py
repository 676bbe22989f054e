"""Token relations of a masked image model, layer by layer, and the scalars that summarize them.

Self-Guided MAE (Shin et al., NeurIPS 2024) reads MAE's training through the relations among its
patch tokens: attention maps, cosine similarities of patch features, and how clearly those split into
clusters. This module extracts them for every encoder and decoder layer and condenses each layer to
a few numbers:

* :func:`feature_variance`: how much patch features differ from one another (collapse drives it to 0);
* :func:`similarity_variance`: how spread the pairwise similarities are (uniform relations give 0);
* :func:`cluster_gap`: mean similarity inside the two Ncut clusters minus across them;
* :func:`attention_nmi`: how much knowing the query tells about the attended key (0: every query
  attends alike, 1: each query attends to its own key);
* :func:`relation_kl`: how far two models' relations are apart on the same images (e.g. an early
  checkpoint against the final one, to see how early relations settle).

Everything is batched over images; the only Python loops run over layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.analysis.reconstruct import load_model_images
from mimkit.build import load_checkpoint
from mimkit.files import atomic_write
from mimkit.masking import MaskSpec, informed_mask, num_hidden_patches
from mimkit.masking.ncut import FOREGROUND_RULES, choose_foreground, ncut_bipartition, ncut_split, patch_affinity
from mimkit.masking.saliency import patch_saliency
from mimkit.models import MaskedImageModel

__all__ = [
    "LayerRelations",
    "analyze_files",
    "attention_nmi",
    "cluster_gap",
    "feature_variance",
    "format_relations",
    "relation_kl",
    "relation_summary",
    "similarity_variance",
    "token_relations",
]

Setting = Literal["practical", "ideal"]
SETTINGS = ("practical", "ideal")


@dataclass
class LayerRelations:
    """The relations among the patch tokens of one layer (prefix tokens dropped).

    Attributes:
        name: ``"encoder.{i}"`` or ``"decoder.{i}"``, ``i`` counting blocks from 0.
        features: (B, N, D) the block's output patch tokens (before the final norm).
        attention: (B, N, N) head-averaged attention of patch queries (rows) to patch keys (columns);
            rows sum to 1 minus the weight given to prefix tokens.
        similarity: (B, N, N) cosine similarity of ``features``.
        cls_attention: (B, N) head-averaged attention of the class token to each patch (without a class
            token, the attention each patch receives; see :func:`patch_saliency`).
        patch_index: (B, N) raster index of the patch each token stands for (``ids_keep`` for an encoder
            run on visible tokens, ``0..L-1`` otherwise).
        hidden: (B, N) bool, True where the token is a mask token (decoder layers in the practical
            setting); all False otherwise.
    """

    name: str
    features: Tensor
    attention: Tensor
    similarity: Tensor
    cls_attention: Tensor
    patch_index: Tensor
    hidden: Tensor

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


def _cosine_similarity(features: Tensor) -> Tensor:
    """(B, N, D) -> (B, N, N) cosine similarity."""
    unit = F.normalize(features.float(), dim=-1)  # (B, N, D)
    return unit @ unit.transpose(1, 2)  # (B, N, N)


def _layers(
    prefix: str,
    attentions: Sequence[Tensor],
    hidden_states: Sequence[Tensor],
    num_prefix_tokens: int,
    patch_index: Tensor,
    hidden: Tensor,
) -> list[LayerRelations]:
    layers = []
    for block, (attn, states) in enumerate(zip(attentions, hidden_states, strict=True)):
        averaged = attn.float().mean(dim=1)  # (B, P + N, P + N), head-averaged
        features = states[:, num_prefix_tokens:].float()  # (B, N, D)
        layers.append(
            LayerRelations(
                name=f"{prefix}.{block}",
                features=features,
                attention=averaged[:, num_prefix_tokens:, num_prefix_tokens:],  # (B, N, N)
                similarity=_cosine_similarity(features),
                cls_attention=patch_saliency(averaged, num_prefix_tokens),  # (B, N)
                patch_index=patch_index,
                hidden=hidden,
            )
        )
    return layers


@torch.no_grad()
def token_relations(
    model: MaskedImageModel,
    images: Tensor,
    *,
    setting: Setting = "practical",
    mask: MaskSpec | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[LayerRelations]:
    """Patch features, attention and similarity of every layer of a model on a batch.

    * ``"ideal"``: the encoder sees all L patches (as in evaluation); only encoder layers are reported,
      each with N = L tokens.
    * ``"practical"``: as in pretraining, the encoder sees the Lk visible patches of a mask and the
      decoder all L patches (visible tokens plus the shared mask token); encoder layers (N = Lk, in
      ``ids_keep`` order) then decoder layers (N = L, raster order) are reported.

    The model runs in eval mode (no drop path) without gradients; its training flag is restored.

    Args:
        model: a :class:`~mimkit.models.MaskedImageModel`.
        images: (B, C, H, W) normalized images on the model's device.
        setting: ``"practical"`` or ``"ideal"``.
        mask: practical setting only: a :class:`~mimkit.masking.MaskSpec` or a (B, L) bool mask (True =
            hidden, the same count per image); the model's masker draws one when None.
        generator: random generator of the model's masker (reproducible masks).

    Returns:
        One :class:`LayerRelations` per block: ``encoder.0 ...`` then (practical) ``decoder.0 ...``.

    Raises:
        ValueError: unknown setting, a mask in the ideal setting, or a mask of the wrong shape.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose 'practical' or 'ideal'")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    batch, device = images.shape[0], images.device
    num_patches = model.grid[0] * model.grid[1]
    if setting == "ideal" and mask is not None:
        raise ValueError("the ideal setting runs the encoder on all patches; pass no mask or use setting='practical'")
    was_training = model.training
    model.eval()
    try:
        if setting == "ideal":
            enc = model.encoder(images, return_attn=True, return_hidden=True)
            index = torch.arange(num_patches, device=device).expand(batch, -1)  # (B, L)
            no_hidden = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)  # (B, L)
            return _layers("encoder", enc.attentions, enc.hidden_states, enc.num_prefix_tokens, index, no_hidden)
        if mask is None:
            spec = model.make_mask(batch, generator=generator)
        elif isinstance(mask, MaskSpec):
            spec = mask
        else:
            spec = MaskSpec.from_mask(mask.bool())
        if tuple(spec.mask.shape) != (batch, num_patches):
            raise ValueError(f"mask must be ({batch}, {num_patches}) for this batch, got {tuple(spec.mask.shape)}")
        spec = spec.to(device)
        enc = model.encoder(images, spec, return_attn=True, return_hidden=True)
        dec = model.decoder(enc, spec, return_attn=True, return_hidden=True)
    finally:
        model.train(was_training)
    visible_hidden = torch.zeros_like(spec.ids_keep, dtype=torch.bool)  # (B, Lk)
    layers = _layers("encoder", enc.attentions, enc.hidden_states, enc.num_prefix_tokens, spec.ids_keep, visible_hidden)
    raster = torch.arange(num_patches, device=device).expand(batch, -1)  # (B, L)
    decoder_prefix = cast(int, model.decoder.num_prefix_tokens)
    layers += _layers("decoder", dec.attentions, dec.hidden_states, decoder_prefix, raster, spec.mask)
    return layers


def _check_square(matrix: Tensor, what: str) -> None:
    if matrix.ndim != 3 or matrix.shape[1] != matrix.shape[2]:
        raise ValueError(f"{what} must be (B, N, N), got shape {tuple(matrix.shape)}")


def feature_variance(features: Tensor) -> float:
    """Variance of patch features across patches, averaged over channels and images.

    Args:
        features: (B, N, D) patch features.

    Returns:
        ``mean_{b, d} Var_n features[b, n, d]`` (population variance); 0 when all patches are equal.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (B, N, D), got shape {tuple(features.shape)}")
    return float(features.float().var(dim=1, correction=0).mean())


def _off_diagonal(matrix: Tensor) -> Tensor:
    """(B, N, N) -> (B, N * (N - 1)) entries off the diagonal."""
    size = matrix.shape[-1]
    keep = ~torch.eye(size, dtype=torch.bool, device=matrix.device)  # (N, N)
    return matrix[:, keep]  # (B, N * (N - 1))


def similarity_variance(similarity: Tensor) -> float:
    """Variance of the pairwise similarities of distinct patches, per image, averaged over images.

    Args:
        similarity: (B, N, N) e.g. :attr:`LayerRelations.similarity`; the diagonal (self-similarity)
            is left out.

    Returns:
        A float >= 0; 0 when every pair of distinct patches is equally similar.
    """
    _check_square(similarity, "similarity")
    if similarity.shape[1] < 2:
        raise ValueError("similarity variance needs at least 2 patches")
    return float(_off_diagonal(similarity.float()).var(dim=1, correction=0).mean())


def cluster_gap(similarity: Tensor, labels: Tensor) -> float:
    """Mean similarity within clusters minus mean similarity across clusters of a bipartition.

    Pairs of a patch with itself are left out. Images whose partition puts every patch on one side
    have no across-cluster pair and are skipped; NaN when no image has two sides.

    Args:
        similarity: (B, N, N) pairwise similarities.
        labels: (B, N) bool cluster of each patch, e.g. from
            :func:`~mimkit.masking.ncut.ncut_bipartition` of the same features.

    Returns:
        Gap averaged over images: positive when the clusters are tighter than the whole.
    """
    _check_square(similarity, "similarity")
    if labels.shape != similarity.shape[:2] or labels.dtype != torch.bool:
        raise ValueError(
            f"labels must be a {tuple(similarity.shape[:2])} bool tensor, got {labels.dtype} {tuple(labels.shape)}"
        )
    similarity = similarity.float()
    same = labels[:, :, None] == labels[:, None, :]  # (B, N, N)
    same &= ~torch.eye(labels.shape[1], dtype=torch.bool, device=labels.device)
    across = labels[:, :, None] != labels[:, None, :]  # (B, N, N)
    intra_count, inter_count = same.sum(dim=(1, 2)), across.sum(dim=(1, 2))  # (B,)
    intra = (similarity * same).sum(dim=(1, 2)) / intra_count.clamp(min=1)  # (B,)
    inter = (similarity * across).sum(dim=(1, 2)) / inter_count.clamp(min=1)  # (B,)
    valid = (intra_count > 0) & (inter_count > 0)  # (B,)
    if not bool(valid.any()):
        return math.nan
    return float((intra - inter)[valid].mean())


def _entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last dimension, with 0 log 0 = 0: (..., N) -> (...)."""
    return -torch.special.xlogy(p, p).sum(dim=-1)


def attention_nmi(attention: Tensor) -> float:
    """Normalized mutual information between queries and keys of attention matrices.

    Each matrix is read as a joint distribution ``p(q, k) = A[q, k] / sum A``; with its marginals
    ``p(q)`` and ``p(k)``, ``NMI = I(Q; K) / sqrt(H(Q) H(K))``. A rank-one matrix (every query attends
    alike: Q and K independent) gives 0; a permutation matrix (each query attends to one key of its
    own) gives 1. Matrices with a degenerate marginal (zero entropy) count as 0.

    Args:
        attention: (B, N, N) or (B, heads, N, N) non-negative weights; one NMI per matrix.

    Returns:
        The NMI averaged over all matrices, in [0, 1].
    """
    if attention.ndim not in (3, 4) or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be (B, N, N) or (B, heads, N, N), got shape {tuple(attention.shape)}")
    if bool((attention < 0).any()):
        raise ValueError("attention weights must be non-negative to form a joint distribution")
    weights = attention.double().flatten(0, -3)  # (M, N, N)
    joint = weights / weights.sum(dim=(1, 2), keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    p_query, p_key = joint.sum(dim=2), joint.sum(dim=1)  # (M, N), (M, N)
    outer = p_query[:, :, None] * p_key[:, None, :]  # (M, N, N)
    ratio = torch.where(joint > 0, joint / outer.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
    information = (joint * ratio.log()).sum(dim=(1, 2)).clamp(min=0)  # (M,)
    normalizer = (_entropy(p_query) * _entropy(p_key)).sqrt()  # (M,)
    nmi = torch.where(normalizer > 0, information / normalizer.clamp(min=1e-300), 0.0)  # (M,)
    return float(nmi.clamp(max=1.0).mean())


def _row_distributions(layer: LayerRelations, kind: str, temperature: float) -> Tensor:
    """(B, N, N) rows turned into distributions over keys."""
    if kind == "attention":
        rows = layer.attention.double()  # (B, N, N)
        return rows / rows.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return torch.softmax(layer.similarity.double() / temperature, dim=-1)  # (B, N, N)


def _mean_kl(p: Tensor, q: Tensor) -> float:
    """Mean over rows (and images) of KL(p || q) of (B, N, N) row distributions."""
    tiny = torch.finfo(torch.float64).tiny
    kl = (torch.special.xlogy(p, p) - p * q.clamp(min=tiny).log()).sum(dim=-1)  # (B, N)
    return float(kl.clamp(min=0).mean())


def relation_kl(
    relations_a: Sequence[LayerRelations],
    relations_b: Sequence[LayerRelations],
    *,
    temperature: float = 0.1,
) -> list[dict[str, Any]]:
    """KL divergence, layer by layer, between two models' relations on the same images (and mask).

    Rows become distributions over keys: attention rows are renormalized to sum to 1 (the weight on
    prefix tokens is dropped), similarity rows go through a softmax at ``temperature``. Per layer the
    value is ``mean_{b, q} KL(a[b, q] || b[b, q])``: 0 for identical relations.

    Args:
        relations_a: :func:`token_relations` of the reference model (e.g. the final checkpoint).
        relations_b: :func:`token_relations` of the other model on the same images, setting and mask.
        temperature: softmax temperature of the similarity rows.

    Returns:
        Per layer ``{"layer": name, "attention_kl": float, "similarity_kl": float}``.

    Raises:
        ValueError: the two lists do not name the same layers with the same token counts.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    names_a, names_b = [layer.name for layer in relations_a], [layer.name for layer in relations_b]
    if names_a != names_b:
        raise ValueError(f"the models have different layers ({names_a} vs {names_b}); compare the same architecture")
    results = []
    for layer_a, layer_b in zip(relations_a, relations_b, strict=True):
        if layer_a.attention.shape != layer_b.attention.shape:
            raise ValueError(
                f"layer {layer_a.name}: relations of shape {tuple(layer_a.attention.shape)} and "
                f"{tuple(layer_b.attention.shape)}; run both models on the same images and mask"
            )
        kl = {
            f"{kind}_kl": _mean_kl(
                _row_distributions(layer_a, kind, temperature), _row_distributions(layer_b, kind, temperature)
            )
            for kind in ("attention", "similarity")
        }
        results.append({"layer": layer_a.name, **kl})
    return results


def relation_summary(relations: Sequence[LayerRelations]) -> list[dict[str, Any]]:
    """Per layer: token count, feature variance, similarity variance, Ncut cluster gap, attention NMI.

    The cluster gap uses the Ncut bipartition (:func:`~mimkit.masking.ncut.ncut_bipartition`) of the
    layer's own features.

    Returns:
        Per layer ``{"layer", "tokens", "feature_variance", "similarity_variance", "cluster_gap",
        "attention_nmi"}``.
    """
    summary = []
    for layer in relations:
        labels = ncut_bipartition(layer.features)  # (B, N) bool
        summary.append(
            {
                "layer": layer.name,
                "tokens": layer.num_tokens,
                "feature_variance": feature_variance(layer.features),
                "similarity_variance": similarity_variance(layer.similarity),
                "cluster_gap": cluster_gap(layer.similarity, labels),
                "attention_nmi": attention_nmi(layer.attention),
            }
        )
    return summary


def format_relations(summary: Sequence[dict[str, Any]], kl: Sequence[dict[str, Any]] | None = None) -> str:
    """A plain-text table of :func:`relation_summary` (and :func:`relation_kl`) rows."""
    header = f"{'layer':<11}{'tokens':>7}{'feat var':>11}{'sim var':>10}{'gap':>9}{'attn NMI':>10}"
    if kl is not None:
        header += f"{'KL attn':>10}{'KL sim':>10}"
    lines = [header]
    by_layer = {row["layer"]: row for row in kl or []}
    for row in summary:
        line = (
            f"{row['layer']:<11}{row['tokens']:>7}{row['feature_variance']:>11.4f}{row['similarity_variance']:>10.4f}"
            f"{row['cluster_gap']:>9.4f}{row['attention_nmi']:>10.4f}"
        )
        if kl is not None:
            other = by_layer[row["layer"]]
            line += f"{other['attention_kl']:>10.4f}{other['similarity_kl']:>10.4f}"
        lines.append(line)
    return "\n".join(lines)


def _on_grid(values: Tensor, patch_index: Tensor, num_patches: int, fill: float | bool) -> Tensor:
    """(B, N) per-token values -> (B, L) per-patch values in raster order; patches without a token get ``fill``."""
    out = torch.full((values.shape[0], num_patches), fill, dtype=values.dtype, device=values.device)  # (B, L)
    return out.scatter(1, patch_index, values)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (e.g. the NaN gap of a one-sided cut) replaced by None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def analyze_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    compare: str | Path | None = None,
    setting: Setting = "practical",
    layer: int = -1,
    limit: int = 8,
    seed: int = 0,
    graph: Literal["weighted", "binary"] = "weighted",
    foreground: Literal["border", "mean", "eigenvector"] = "border",
) -> dict[str, Any]:
    """Token relations of a checkpoint on image files, written to a folder (``mimkit analyze``).

    Writes ``out/relations.json`` (the per-layer :func:`relation_summary`, and :func:`relation_kl`
    against ``compare`` when given; strict JSON with NaN as null), ``out/maps.png`` (image, class-token attention, Ncut
    bipartition and informed mask of layer ``layer``, see
    :func:`~mimkit.analysis.maps.save_relation_maps`), ``out/sides.png`` (the object side of the same
    cut under each rule of :func:`~mimkit.masking.ncut.choose_foreground`, side by side) and, when the
    checkpoint's folder holds a ``metrics.jsonl`` with exploitation-rate records, ``out/exploitation.png``.

    Args:
        checkpoint: anything :func:`~mimkit.build.load_checkpoint` reads.
        images: image files and/or folders.
        out: output folder (created).
        compare: a second checkpoint of the same architecture, run on the same images and mask.
        setting: ``"practical"`` or ``"ideal"``, see :func:`token_relations`.
        layer: index into the reported layers of the layer to draw (-1: the last).
        limit: at most this many images.
        seed: seed of the mask and of the random part of the informed mask.
        graph: Ncut graph, ``"weighted"`` (cosine similarities) or ``"binary"`` (TokenCut's).
        foreground: the object-side rule of ``maps.png``.

    Returns:
        The content of ``relations.json``.

    Raises:
        FileNotFoundError: a missing image path.
        ValueError: bad arguments, no readable image, or a ``compare`` model of another architecture.
        CheckpointError: a checkpoint cannot be loaded.
    """
    from mimkit.analysis.maps import exploitation_records, plot_exploitation, save_foreground_rules, save_relation_maps

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose 'practical' or 'ideal'")
    out = Path(out)
    model = load_checkpoint(checkpoint)
    other = load_checkpoint(compare) if compare is not None else None
    if other is not None and (other.grid != model.grid or other.config.get("in_chans") != model.config["in_chans"]):
        raise ValueError(
            f"--compare {compare} has a {other.grid} patch grid and {other.config.get('in_chans')} channels, "
            f"{checkpoint} {model.grid} and {model.config['in_chans']}; compare checkpoints of the same architecture"
        )
    batch, paths, mean, std = load_model_images(model, images, limit=limit)
    generator = torch.Generator().manual_seed(seed)
    mask = model.make_mask(batch.shape[0], generator=generator) if setting == "practical" else None
    relations = token_relations(model, batch, setting=setting, mask=mask)
    if not -len(relations) <= layer < len(relations):
        raise ValueError(f"--layer {layer} is out of range; the model reports {len(relations)} layers")
    summary = relation_summary(relations)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "setting": setting,
        "images": [str(path) for path in paths],
        "mask_ratio": float(mask.mask.float().mean()) if mask is not None else 0.0,
        "layers": summary,
    }
    if other is not None:
        result["compare"] = str(compare)
        result["kl"] = relation_kl(relations, token_relations(other, batch, setting=setting, mask=mask))

    drawn = relations[layer]
    num_patches = model.grid[0] * model.grid[1]
    attention_map = _on_grid(drawn.cls_attention, drawn.patch_index, num_patches, 0.0)  # (B, L)
    if foreground not in FOREGROUND_RULES:
        raise ValueError(f"unknown foreground rule {foreground!r}; choose one of {FOREGROUND_RULES}")
    cut, eigenvector = ncut_split(patch_affinity(drawn.features.float(), binarize=graph == "binary"))  # (B, N)
    partition = _on_grid(cut, drawn.patch_index, num_patches, False)  # (B, L)
    eigenvector = _on_grid(eigenvector.float(), drawn.patch_index, num_patches, 0.0)  # (B, L)
    features = drawn.features.float()  # (B, N, D)
    if features.shape[1] != num_patches:  # some patches absent from this layer: place them on the grid
        placed = features.new_zeros(features.shape[0], num_patches, features.shape[2])  # (B, L, D)
        features = placed.scatter(1, drawn.patch_index[..., None].expand(-1, -1, features.shape[2]), features)
    sides = {
        rule: choose_foreground(partition, model.grid, how=rule, features=features, eigenvector=eigenvector)  # type: ignore[arg-type]
        for rule in FOREGROUND_RULES
    }
    result["foreground_rule"] = foreground
    result["graph"] = graph
    result["object_share"] = {rule: float(side.float().mean()) for rule, side in sides.items()}
    foreground_side = sides[foreground]  # (B, L)
    ratio = float(model.masker.ratio)
    num_hidden = num_hidden_patches(num_patches, ratio)
    informed = informed_mask(foreground_side, num_hidden, num_hints=0, generator=generator)  # (B, L)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(checkpoint).name}: {drawn.name} ({setting} setting)"
    prefix = model.encoder.num_prefix_tokens if drawn.name.startswith("encoder") else model.decoder.num_prefix_tokens
    label = "class-token attention" if prefix else "attention received"
    save_relation_maps(
        batch,
        attention_map,
        foreground_side,
        informed,
        out / "maps.png",
        mean=mean,
        std=std,
        title=title,
        attention_label=label,
    )
    save_foreground_rules(batch, sides, out / "sides.png", mean=mean, std=std, title=f"{title}, {graph} graph")
    metrics = Path(checkpoint).parent / "metrics.jsonl"
    result["exploitation_plot"] = None
    if metrics.is_file() and exploitation_records(metrics):
        result["exploitation_plot"] = str(plot_exploitation(metrics, out / "exploitation.png"))
    text = json.dumps(_finite(result), indent=2, allow_nan=False) + "\n"
    atomic_write(out / "relations.json", lambda handle: handle.write(text.encode()))
    return result
