"""``mimkit probe``: kNN or linear-probe accuracy of a checkpoint's frozen encoder on labelled data.

Features are extracted once per (checkpoint content, random_init, seed, pool, data, split, limit, image
size, normalization) and cached under ``out_dir/cache/``, so re-running a probe with other head
hyperparameters, or the other protocol, costs no encoder passes. A linear probe stopped by SIGTERM or
Ctrl-C leaves ``last.pt`` in its run folder and continues with ``resume`` (the features from the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mimkit.engine import distributed
from mimkit.engine.resumable import ResumableState, read_resume_file
from mimkit.engine.run_guard import holding_run_lock
from mimkit.eval.data import (
    LabelledSplit,
    check_labelled_folder,
    data_source,
    listing_digest,
    load_eval_model,
    load_labelled_split,
)
from mimkit.eval.knn import extract_features, knn_scores
from mimkit.eval.linear import train_linear_probe
from mimkit.eval.report import ClassificationMetrics, classification_metrics, save_confusion_matrix, write_results
from mimkit.files import atomic_write

log = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear")
POOLS = ("cls", "avg", "both")
CACHE_VERSION = 1  # bump when what a cache file holds, or how features are computed, changes


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 of a checkpoint's bytes: of the file, or of every file (name and content) of a directory."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class _Features:
    """The labelled train/test features of one encoder, extracted on demand and cached on disk."""

    def __init__(
        self,
        *,
        checkpoint: Path,
        random_init: bool,
        seed: int,
        data: str | Path,
        train_limit: int | None,
        test_limit: int | None,
        cache_dir: Path,
        device: torch.device,
        batch_size: int,
        progress: bool,
    ) -> None:
        self.dataset, self.folder = data_source(data)
        self.limits = {"train": train_limit, "test": test_limit}
        for split, limit in self.limits.items():
            if limit is not None and limit <= 0:
                raise ValueError(f"{split}_limit must be positive, got {limit}")
        # both splits are checked before any encoder pass
        self.listings = check_labelled_folder(self.folder) if self.folder is not None else {}
        model = load_eval_model(checkpoint, random_init=random_init, seed=seed, dataset=self.dataset)
        self.config = model.config
        self.encoder = model.encoder.to(device)
        self.mean, self.std = model.mean, model.std
        self.img_size, self.in_chans = model.img_size, model.in_chans
        self.crop_ratio = model.eval_crop_ratio
        self.key_base = {
            "version": CACHE_VERSION,
            "checkpoint": checkpoint_digest(checkpoint),
            "random_init": random_init,
            "seed": seed if random_init else None,
            "data": self.dataset if self.folder is None else str(self.folder),
            "img_size": self.img_size,
            "in_chans": self.in_chans,
            "eval_crop_ratio": self.crop_ratio,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        self.cache_dir, self.device, self.batch_size, self.progress = cache_dir, device, batch_size, progress
        self._images: dict[str, LabelledSplit] = {}
        self.extracted = 0  # encoder passes over a split in this run (0 when everything came from the cache)

    def _key(self, split: str, pool: str) -> dict[str, Any]:
        key = {**self.key_base, "split": split, "pool": pool, "limit": self.limits[split]}
        if self.folder is not None:
            key["files"] = listing_digest(self.listings[split])
        return key

    def _split(self, split: str) -> LabelledSplit:
        if split not in self._images:
            self._images[split] = load_labelled_split(
                self.dataset,
                self.folder,
                split,
                img_size=self.img_size,
                in_chans=self.in_chans,
                limit=self.limits[split],
                progress=self.progress,
                crop_ratio=self.crop_ratio,
            )
        return self._images[split]

    def get(self, split: str, pool: str) -> tuple[Tensor, Tensor, list[str]]:
        """(features (N, D), labels (N,), class names) of a split, from the cache when it has them."""
        from mimkit.data.transforms import EvalTransform

        key = self._key(split, pool)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        path = self.cache_dir / f"{split}_{pool}_{name}.pt"
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if cached.get("key") == key:
                    log.info("features of the %s split (%s pool) from %s", split, pool, path)
                    return cached["features"], cached["labels"], list(cached["classes"])
            except Exception as err:  # a damaged cache file is recomputed, not fatal
                log.warning("ignoring the unreadable feature cache %s (%s)", path, err)
        data = self._split(split)
        features = extract_features(
            self.encoder,
            data.images,
            transform=EvalTransform(self.img_size, mean=self.mean, std=self.std),
            batch_size=self.batch_size,
            pool=pool,
            device=self.device,
            progress=self.progress,
            desc=f"features ({split}, {pool})",
        )  # (N, D)
        labels, classes = data.labels, data.classes  # (N,)
        self.extracted += 1
        state = {"key": key, "features": features, "labels": labels, "classes": classes}
        if distributed.place().is_main:
            atomic_write(path, lambda handle: torch.save(state, handle))
        return features, labels, classes


def _per_class(accuracy: Tensor, classes: Sequence[str]) -> dict[str, float | None]:
    return {
        name: (None if math.isnan(value) else round(value, 6))
        for name, value in zip(classes, accuracy.tolist(), strict=True)
    }


def probe_run_dir(out_dir: str | Path, protocol: str, random_init: bool) -> Path:
    """Where :func:`run_probe` writes a run's results: ``out_dir/<protocol>/<pretrained|random_init>``."""
    return Path(out_dir) / protocol / ("random_init" if random_init else "pretrained")


@holding_run_lock(lambda out_dir, protocol, random_init, **_: probe_run_dir(out_dir, protocol, random_init), "--out")
def run_probe(
    checkpoint: str | Path,
    *,
    protocol: str = "knn",
    data: str | Path = "fashion_mnist",
    random_init: bool = False,
    pool: str | None = None,
    out_dir: str | Path = "probe",
    train_limit: int | None = None,
    test_limit: int | None = None,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float | None = None,
    blr: float = 0.1,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    warmup_epochs: int = 10,
    k: int = 20,
    temperature: float = 0.07,
    seed: int = 0,
    device: torch.device | str | None = None,
    extract_batch_size: int = 256,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Measure a checkpoint's frozen encoder with a kNN classifier or MAE's linear probe.

    Args:
        checkpoint: any checkpoint :func:`~mimkit.build.load_checkpoint` reads (mimkit, MAE, HF).
        protocol: ``"knn"`` (DINO's weighted kNN, k=20, T=0.07) or ``"linear"`` (MAE's linear probe).
        data: ``"fashion_mnist"`` or a folder with ``train/`` and ``test/`` (or ``val/``) holding one
            subfolder of images per class, the same classes in both.
        random_init: probe the same architecture untrained (seeded with ``seed``), a baseline.
        pool: ``"cls"``, ``"avg"`` or ``"both"``; default ``"both"`` for linear, ``"avg"`` for kNN.
        out_dir: receives the feature ``cache/`` and, per run, ``<protocol>/<pretrained|random_init>/``
            with ``results.json`` and ``confusion_<pool>.png`` (a baseline never overwrites its checkpoint's).
        train_limit: keep only this many training images (the first ones of Fashion-MNIST, evenly
            spaced files of a folder, so every class keeps its share).
        test_limit: the same for the test split.
        epochs, batch_size, lr, blr, weight_decay, optimizer, warmup_epochs: linear probe settings, see
            :func:`~mimkit.eval.linear.train_linear_probe`.
        k, temperature: kNN settings, see :func:`~mimkit.eval.knn.knn_scores`.
        seed: seeds the random initialisation and the linear probe.
        device: where the encoder and head run; default CUDA when available.
        extract_batch_size: images per encoder pass.
        progress: progress bars.
        resume: continue the linear probe stopped in this run folder from its ``last.pt`` (which a stop
            signal leaves there after a step, and a finished run removes), with the same checkpoint,
            data and settings; the pools it had finished are kept, and the result equals that of a run
            never stopped.

    SIGTERM or Ctrl-C stop a linear probe after the step in flight
    (:class:`~mimkit.engine.run_guard.TrainingInterrupted`, exit status 75 from the command line); the
    kNN protocol does not train and ends when its work is done. Rank 0 locks the run folder against a
    second writer while this runs.

    Returns:
        The dict written to ``out_dir/<protocol>/<pretrained|random_init>/results.json``: protocol,
        checkpoint, random_init, pools, data, image counts, classes, and per pool top-1/top-5/per-class
        accuracy and the confusion PNG; the top-level ``top1``/``top5`` are those of the best pool
        (``best_pool``).

    Raises:
        ValueError: unknown protocol or pool, unlabelled data, classes that differ between splits,
            ``resume`` with the kNN protocol.
        FileNotFoundError: missing data or split, or ``resume`` without a ``last.pt`` to continue.
        CheckpointError: unreadable checkpoint.
        SettingsChanged: ``resume`` with another checkpoint, data or probe settings than the stopped run's.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if resume and protocol != "linear":
        raise ValueError("--resume continues a stopped linear probe; a kNN probe trains nothing to continue")
    pool = pool or ("both" if protocol == "linear" else "avg")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {POOLS}")
    pools = ["cls", "avg"] if pool == "both" else [pool]
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    where, device = distributed.setup(device)  # under torchrun: features extracted by all ranks, rank 0 probes
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    run_dir = probe_run_dir(out_dir, protocol, random_init)
    state_path = run_dir / "last.pt"
    resume_state = read_resume_file(state_path) if resume and where.is_main else None
    features = _Features(
        checkpoint=checkpoint,
        random_init=random_init,
        seed=seed,
        data=data,
        train_limit=train_limit,
        test_limit=test_limit,
        cache_dir=out_dir / "cache",
        device=device,
        batch_size=extract_batch_size,
        progress=progress,
    )
    results: dict[str, Any] = {
        "protocol": protocol,
        "checkpoint": str(checkpoint),
        "model": features.config.get("name"),
        "random_init": random_init,
        "data": features.key_base["data"],
        "pools": pools,
        "normalization": {"mean": list(features.mean), "std": list(features.std)},
    }
    if protocol == "knn":
        results.update(k=k, temperature=temperature)
    else:
        results.update(
            epochs=epochs,
            batch_size=batch_size,
            blr=blr,
            weight_decay=weight_decay,
            optimizer=optimizer,
            warmup_epochs=warmup_epochs,
            seed=seed,
        )
    # what a resume must share with the run it continues: the features' key (checkpoint content, data,
    # sizes, normalization), the limits and the probe's settings
    settings = {
        "features": features.key_base,
        "train_limit": train_limit,
        "test_limit": test_limit,
        "pools": pools,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "blr": blr,
        "weight_decay": weight_decay,
        "optimizer": optimizer,
        "warmup_epochs": warmup_epochs,
        "seed": seed,
    }
    per_pool: dict[str, Any] = {}
    resumed_pool = None  # the pool the stopped run was training, whose state continues
    if resume_state is not None:
        ResumableState({}, settings=settings).check_settings(resume_state, state_path)  # before any work
        kept = resume_state["progress"]["keep"]
        per_pool, resumed_pool = dict(kept["pools"]), kept["pool"]
    for name in pools:
        train, train_labels, classes = features.get("train", name)
        test, test_labels, test_classes = features.get("test", name)
        if classes != test_classes:  # Fashion-MNIST or a folder checked above; guards a stale cache
            raise ValueError(f"test classes {test_classes} differ from train classes {classes}")
        if not where.is_main:
            continue
        results.update(classes=classes, train_images=len(train), test_images=len(test))
        if name in per_pool:  # finished before the stop that a resume continues
            continue
        num_classes = len(classes)
        entry: dict[str, Any] = {"feature_dim": train.shape[1]}
        if protocol == "knn":
            scores = knn_scores(
                train, train_labels, test, k=min(k, len(train)), temperature=temperature, num_classes=num_classes
            )
            metrics = classification_metrics(scores, test_labels, num_classes)
        else:
            probe = train_linear_probe(
                train,
                train_labels,
                test,
                test_labels,
                num_classes=num_classes,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                blr=blr,
                weight_decay=weight_decay,
                optimizer=optimizer,
                warmup_epochs=warmup_epochs,
                seed=seed,
                device=device,
                progress=progress,
                state_path=state_path,
                resume_state=resume_state if name == resumed_pool else None,
                settings=settings,
                keep={"pool": name, "pools": per_pool},
            )
            entry.update(lr=probe.lr, final_loss=probe.losses[-1], losses=probe.losses)
            metrics = ClassificationMetrics(probe.top1, probe.top5, probe.per_class_accuracy, probe.confusion)
        which = "random-init" if random_init else "pretrained"
        png = save_confusion_matrix(
            metrics.confusion,
            classes,
            run_dir / f"confusion_{name}.png",
            title=f"{protocol} probe, {name} pool, {which} {checkpoint.name}: top-1 {100 * metrics.top1:.1f}%",
        )
        entry.update(
            top1=metrics.top1,
            top5=metrics.top5,
            per_class_accuracy=_per_class(metrics.per_class_accuracy, classes),
            confusion=metrics.confusion,
            confusion_png=str(png),
        )
        per_pool[name] = entry
    if not where.is_main:
        return {"rank": where.rank}
    best = max(pools, key=lambda name: per_pool[name]["top1"])
    results.update(
        best_pool=best,
        top1=per_pool[best]["top1"],
        top5=per_pool[best]["top5"],
        results=per_pool,
        features_extracted=features.extracted,
    )
    _log_scalars(run_dir, protocol, per_pool)
    results["results_json"] = str(write_results(run_dir / "results.json", results))
    state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    return results


def _log_scalars(run_dir: Path, protocol: str, per_pool: dict[str, Any]) -> None:
    """TensorBoard (``run_dir/tb``) and ``metrics.jsonl``: the linear probe's loss per epoch, then the
    accuracies of every pool at the last step."""
    from mimkit.engine.logging import MetricsLogger

    metrics = MetricsLogger(run_dir, tensorboard=True)
    try:
        last = 0
        for name, entry in per_pool.items():
            for epoch, loss in enumerate(entry.get("losses", []), start=1):
                metrics.log(epoch, {f"{protocol}/{name}/loss": loss})
                last = max(last, epoch)
        scores = {}
        for name, entry in per_pool.items():
            scores[f"{protocol}/{name}/top1"] = entry["top1"]
            if entry["top5"] is not None:
                scores[f"{protocol}/{name}/top5"] = entry["top5"]
        metrics.log(last, scores)
    finally:
        metrics.close()


def format_probe(results: dict[str, Any]) -> str:
    """The short table ``mimkit probe`` prints: one row per pool, then where the files went."""
    which = "random init" if results["random_init"] else "pretrained"
    lines = [
        f"{results['protocol']} probe of {results['checkpoint']} ({which}) on {results['data']}: "
        f"{results['train_images']} train / {results['test_images']} test images, {len(results['classes'])} classes",
        f"  {'pool':<5} {'top-1':>7} {'top-5':>7}",
    ]
    for name, entry in results["results"].items():
        top5 = "-" if entry["top5"] is None else f"{100 * entry['top5']:6.2f}%"
        lines.append(f"  {name:<5} {100 * entry['top1']:6.2f}% {top5:>7}")
    cached = "all features from the cache" if results["features_extracted"] == 0 else "features cached"
    lines.append(f"results in {results['results_json']} ({cached})")
    return "\n".join(lines)
