"""Shared steps of the ablation benchmarks: pretrain one variant, probe it, fine-tune it, each cached.

Fine-tuning follows ``benchmarks/fmnist_protocols.py``'s budget (:func:`finetune_recipe`).

Every step writes under ``<out>/<variant>/`` and is skipped when its result file exists, so variants may
run in separate processes and a last call only gathers the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mimkit.config import load_config, to_plain
from mimkit.eval.finetune import FinetuneConfig, run_finetune
from mimkit.eval.probe import run_probe
from mimkit.tasks.pretrain import run_pretraining


def pretrain(out: Path, config: Path, overrides: list[str], *, progress: bool = False) -> dict[str, Any]:
    """Pretrain a recipe with overrides into ``out`` (its ``summary.json``, reused when present)."""
    summary_path = out / "summary.json"
    if summary_path.is_file():
        return dict(json.loads(summary_path.read_text()))
    print(f"[{out.name}] pretraining ...", flush=True)
    settings = [
        *overrides,
        f"train.output_dir={out}",
        f"train.progress={'true' if progress else 'false'}",
        "eval.knn=false",
        "eval.reconstruct=true",
    ]
    return run_pretraining(load_config(config, settings))


def probe(
    out: Path,
    checkpoint: Path,
    protocol: str,
    *,
    train_limit: int,
    test_limit: int,
    random_init: bool = False,
    pool: str | None = None,
    progress: bool = False,
) -> float:
    """Top-1 of ``mimkit probe --protocol {knn,linear}`` on the checkpoint, written under ``out/probe``
    (``pool`` as in :func:`~mimkit.eval.probe.run_probe`; with two pools, the better one)."""
    which = "random_init" if random_init else "pretrained"
    path = out / "probe" / protocol / which / "results.json"
    if not path.is_file():
        print(f"[{out.name}] {protocol} probe{' (random init)' if random_init else ''} ...", flush=True)
        run_probe(
            checkpoint,
            protocol=protocol,
            random_init=random_init,
            out_dir=out / "probe",
            train_limit=train_limit,
            test_limit=test_limit,
            pool=pool,
            progress=progress,
        )
    return float(json.loads(path.read_text())["top1"])


def finetune_recipe(epochs: int, train_limit: int, test_limit: int) -> FinetuneConfig:
    """The fine-tuning budget of the ablations: MAE's recipe at batch 64, blr 2e-3, warmup 0.2 epoch,
    layer decay 0.75 (as the protocols table)."""
    return FinetuneConfig(
        epochs=epochs, batch_size=64, blr=2e-3, warmup_epochs=0.2, train_limit=train_limit, test_limit=test_limit
    ).validate()


def finetune(
    out: Path, checkpoint: Path, config: FinetuneConfig, *, random_init: bool = False, progress: bool = False
) -> float:
    """Top-1 of full fine-tuning (``mimkit finetune``) of the checkpoint, written under ``out/finetune``
    (redone when the results there came from another recipe)."""
    which = "random_init" if random_init else "pretrained"
    path = out / "finetune" / "full" / which / "results.json"
    if not path.is_file() or json.loads(path.read_text()).get("config") != to_plain(config):
        print(f"[{out.name}] fine-tuning{' (random init)' if random_init else ''} ...", flush=True)
        run_finetune(
            checkpoint,
            random_init=random_init,
            config=config,
            out_dir=out / "finetune",
            progress=progress,
            save_model=False,
        )
    return float(json.loads(path.read_text())["top1"])


def measure(
    out: Path,
    recipe: Path,
    overrides: list[str],
    finetune_config: FinetuneConfig,
    *,
    train_limit: int,
    test_limit: int,
    progress: bool = False,
) -> tuple[dict[str, Any], float, float, float]:
    """One row of an ablation table: pretrain the recipe with ``overrides`` into ``out``, then kNN, linear probe
    and fine-tuning top-1 of its checkpoint (each step cached). Returns (summary, knn, linear, fine-tune)."""
    summary = pretrain(out, recipe, overrides, progress=progress)
    checkpoint = Path(summary["checkpoint"])
    limits = dict(train_limit=train_limit, test_limit=test_limit, progress=progress)
    knn = probe(out, checkpoint, "knn", **limits)
    linear = probe(out, checkpoint, "linear", **limits)
    return summary, knn, linear, finetune(out, checkpoint, finetune_config, progress=progress)


def ensure_tokenizer(path: Path, *, progress: bool = False) -> None:
    """Train the VQ-KD tokenizer of ``configs/vqkd_fmnist.yaml`` into ``path``'s folder unless ``path`` exists."""
    from mimkit.tasks.tokenizer import TokenizerConfig, train_tokenizer

    if path.is_file():
        return
    print(f"[tokenizer] training {path} ...", flush=True)
    train_tokenizer(
        load_config("configs/vqkd_fmnist.yaml", [f"train.output_dir={path.parent}"], schema=TokenizerConfig),
        progress=progress,
    )


def _timed_step(model: Any, optimizer: Any, images: Any, seed: int) -> float:
    """Wall time of one training step (forward, backward, AdamW) of a masked image model on ``images``,
    the mask drawn from ``seed``; CUDA synchronized around the step. The step gets a copy of the batch, as a
    new batch: a target that keeps its output for the tensor it last saw (a teacher's features, VQ-KD codes)
    computes it again, as it does in training."""
    import time

    import torch

    images = images.clone()
    cuda = images.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    loss = model(images, generator=torch.Generator().manual_seed(seed)).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - start


def _adamw(model: Any) -> Any:
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def median_step_seconds(model: Any, images: Any, *, repeats: int, warmup: int) -> float:
    """Median wall time of one training step (forward, backward, AdamW) of a masked image model on one
    batch, after ``warmup`` untimed steps; masks seeded per step, CUDA synchronized around each step."""
    import statistics

    optimizer = _adamw(model)
    times = [_timed_step(model, optimizer, images, index) for index in range(warmup + repeats)]
    return statistics.median(times[warmup:])


def interleaved_step_seconds(models: dict[str, Any], images: Any, *, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of one training step of each model on the same batch, the models taking turns: each
    round times one step of every model, in an order that reverses from round to round, so that a change of
    the machine's load reaches all of them alike. ``warmup`` untimed rounds first; the mask of round r is drawn
    from seed r for every model."""
    import statistics

    optimizers = {name: _adamw(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for index in range(warmup + rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            seconds = _timed_step(models[name], optimizers[name], images, index)
            if index >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def step_costs(recipe: Path, variants: dict[str, list[str]], *, rounds: int) -> dict[str, float]:
    """Median seconds of one training step of each variant (``recipe`` with its overrides) on one batch of the
    first 64 Fashion-MNIST training images at 32x32, the models taking turns round by round in this process
    (:func:`interleaved_step_seconds`: a fresh copy of the batch per step, so teachers and tokenizers run)."""
    import torch

    from mimkit.build import build_model
    from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
    from mimkit.data.transforms import EvalTransform, default_normalization

    torch.manual_seed(0)
    models = {name: build_model(load_config(recipe, overrides)) for name, overrides in variants.items()}
    mean, std = default_normalization(1, "fashion_mnist")
    images = EvalTransform(32, mean=mean, std=std)(resize_uint8(load_fashion_mnist(split="train")[0][:64], 32))
    return interleaved_step_seconds(models, images, rounds=rounds)
