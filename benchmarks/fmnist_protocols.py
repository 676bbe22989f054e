"""Does MAE pretraining help? Every evaluation protocol on Fashion-MNIST, pretrained against random init.

Rows: the same architecture untrained (random init), each pretrained checkpoint given, and raw pixels
(logistic regression and kNN on the normalized 32x32 pixels). Columns: kNN (k=20, T=0.07, average
pool), linear probe (MAE's BatchNorm-without-affine head, SGD, 90 epochs on cached features; the
better of class token and average pool), partial fine-tuning of the last 1 and 2 blocks, and full
fine-tuning, both at one fixed budget for every row.

Every cell is written by ``mimkit probe`` / ``mimkit finetune``'s functions under ``--out/<row>/`` and
reused when its ``results.json`` exists with the same recipe, so rows can run in separate processes
(``--rows``) and a last call prints the whole table::

    .venv/bin/python benchmarks/fmnist_protocols.py --out runs/protocols --threads 1 \\
        --checkpoint "MAE 1 epoch=runs/demo/last.pt" --checkpoint "MAE 5 epochs=runs/fmnist_5ep/last.pt"

Scratch (random-init) fine-tuning uses no layer-wise lr decay (``--scratch-layer-decay 1.0``): layer
decay exists to protect pretrained lower layers, which a random init does not have.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mimkit.config import to_plain
from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
from mimkit.data.transforms import EvalTransform, default_normalization
from mimkit.eval.finetune import FinetuneConfig, run_finetune
from mimkit.eval.knn import knn_scores
from mimkit.eval.linear import train_linear_probe
from mimkit.eval.probe import run_probe
from mimkit.eval.report import classification_metrics, write_results

COLUMNS = ("knn", "linear", "partial1", "partial2", "full")
HEADERS = {
    "knn": "kNN",
    "linear": "linear",
    "partial1": "partial FT k=1",
    "partial2": "partial FT k=2",
    "full": "full FT",
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cached(path: Path, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """A cell's stored results when they were made with this recipe."""
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("benchmark_recipe") == recipe else None


def cell(label: str, path: Path, recipe: dict[str, Any], run: Callable[[], object]) -> dict[str, Any]:
    """A cell's results: from ``path`` when made with ``recipe``, else from ``run()`` (which writes
    ``path``), stamped with the recipe and the minutes it took."""
    results = cached(path, recipe)
    if results is None:
        print(f"{label} ...", flush=True)
        start = time.perf_counter()
        run()
        results = json.loads(path.read_text())
        results.update(benchmark_recipe=recipe, benchmark_seconds=round(time.perf_counter() - start, 1))
        write_results(path, results)
    return results


def encoder_cells(
    name: str, checkpoint: Path, random_init: bool, args: argparse.Namespace, out: Path
) -> dict[str, dict[str, Any]]:
    """kNN, linear, partial and full fine-tuning results of one encoder row."""
    which = "random_init" if random_init else "pretrained"
    cells: dict[str, dict[str, Any]] = {}
    probe_limits = dict(train_limit=args.train_limit, test_limit=args.test_limit)
    for protocol in ("knn", "linear"):
        recipe = {"checkpoint": str(checkpoint), **probe_limits, "epochs": 90, "blr": 0.1, "seed": args.seed}
        cells[protocol] = cell(
            f"[{name}] {protocol} probe",
            out / protocol / which / "results.json",
            recipe,
            functools.partial(
                run_probe,
                checkpoint,
                protocol=protocol,
                random_init=random_init,
                out_dir=out,
                pool="both" if protocol == "linear" else "avg",
                epochs=90,
                blr=0.1,
                seed=args.seed,
                progress=args.progress,
                **probe_limits,
            ),
        )
    for partial in (1, 2, None):
        column = "full" if partial is None else f"partial{partial}"
        config = FinetuneConfig(
            epochs=args.ft_epochs,
            batch_size=args.ft_batch_size,
            blr=args.ft_blr if partial is None else args.partial_blr,
            warmup_epochs=args.ft_warmup_epochs,
            layer_decay=args.scratch_layer_decay if random_init else args.layer_decay,
            train_limit=args.ft_train_limit,
            test_limit=args.test_limit,
            seed=args.seed,
        )
        recipe = {"checkpoint": str(checkpoint), **to_plain(config)}
        cells[column] = cell(
            f"[{name}] {column} fine-tuning",
            out / column / which / "results.json",
            recipe,
            functools.partial(
                run_finetune,
                checkpoint,
                partial_blocks=partial,
                random_init=random_init,
                config=config,
                out_dir=out,
                progress=args.progress,
                save_model=False,
            ),
        )
    return cells


def pixel_cells(args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """kNN and logistic regression (the linear probe's head and recipe) on normalized 32x32 pixels."""
    recipe = {**dict(train_limit=args.train_limit, test_limit=args.test_limit), "epochs": 90, "seed": args.seed}
    path = out / "pixels.json"
    results = cached(path, recipe)
    if results is None:
        mean, std = default_normalization(1, "fashion_mnist")
        transform = EvalTransform(32, mean=mean, std=std)
        data = {}
        for split, limit in (("train", args.train_limit), ("test", args.test_limit)):
            images, labels = load_fashion_mnist(split=split)
            pixels = transform(resize_uint8(images[:limit], 32)).flatten(1)  # (N, 1024)
            data[split] = (pixels, labels[:limit].long())
        (train, train_labels), (test, test_labels) = data["train"], data["test"]
        scores = knn_scores(train, train_labels, test, k=20, temperature=0.07, num_classes=10)
        knn = classification_metrics(scores, test_labels, 10)
        linear = train_linear_probe(
            train, train_labels, test, test_labels, num_classes=10, epochs=90, blr=0.1, seed=args.seed
        )
        results = {"knn": {"top1": knn.top1}, "linear": {"top1": linear.top1}, "benchmark_recipe": recipe}
        write_results(path, results)
    return {"knn": results["knn"], "linear": results["linear"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", action="append", default=[], metavar="NAME=PATH", help="a pretrained row (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/protocols"))
    parser.add_argument("--rows", nargs="*", default=None, help="only these row names (slugs); default all")
    parser.add_argument("--train-limit", type=int, default=10000, help="training images of kNN and linear probe")
    parser.add_argument("--test-limit", type=int, default=2000, help="test images of every protocol")
    parser.add_argument("--ft-train-limit", type=int, default=5000, help="training images of fine-tuning")
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--ft-batch-size", type=int, default=64)
    parser.add_argument("--ft-blr", type=float, default=2e-3, help="full fine-tuning: lr = blr * batch / 256")
    parser.add_argument("--partial-blr", type=float, default=8e-3, help="partial fine-tuning base lr")
    parser.add_argument("--ft-warmup-epochs", type=float, default=0.2)
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--scratch-layer-decay", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 when rows run side by side)")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints = []
    for item in args.checkpoint:
        name, sep, path = item.rpartition("=")
        if not sep or not name or not Path(path).exists():
            parser.error(f"--checkpoint takes NAME=PATH with an existing PATH, got {item!r}")
        checkpoints.append((name, Path(path)))
    if not checkpoints:
        parser.error("give at least one --checkpoint NAME=PATH (its architecture is also the random-init row)")

    rows: list[tuple[str, Any]] = [("random init", (checkpoints[0][1], True))]
    rows += [(name, (path, False)) for name, path in checkpoints]
    rows.append(("raw pixels", None))
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, spec in rows:
        if args.rows is not None and slug(name) not in args.rows:
            continue
        out = args.out / slug(name)
        table[name] = pixel_cells(args, out) if spec is None else encoder_cells(name, *spec, args, out)

    print()
    print(
        f"Fashion-MNIST test top-1 (%), first {args.test_limit} test images; kNN/linear on {args.train_limit} "
        f"train images; fine-tuning {args.ft_epochs} epoch(s) of {args.ft_train_limit} images, batch "
        f"{args.ft_batch_size}"
    )
    print("| encoder | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, cells in table.items():
        values = [f"{100 * cells[c]['top1']:.2f}" if c in cells else "-" for c in COLUMNS]
        print(f"| {name} | " + " | ".join(values) + " |")
    minutes = {
        name: sum(cell.get("benchmark_seconds", 0.0) for cell in cells.values()) / 60 for name, cells in table.items()
    }
    print("evaluation minutes per row: " + ", ".join(f"{name} {value:.1f}" for name, value in minutes.items()))


if __name__ == "__main__":
    main()
