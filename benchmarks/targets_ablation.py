"""What to predict: pixels, HOG, a teacher's features (MaskDistill, MILAN) or VQ-KD codes, at one budget.

Every variant pretrains the demo's student (ViT-Tiny/4, 8x8 patches of 32x32 Fashion-MNIST) for the same
steps on the same images, then its frozen encoder is measured by kNN and the linear probe (better of
class token and average pool) and fine-tuned at one fixed budget (``mimkit probe`` / ``mimkit
finetune``). The teacher is the ImageNet EfficientNet-Lite0 (stage 4, 112-d, input 128: an 8x8 map); its
own linear probe and kNN (average-pooled stage-4 features) are the reference line. Variants:

* ``pixel``: MAE, per-patch normalized pixels, MSE.
* ``hog``: MaskFeat, HOG of each patch, MSE.
* ``maskdistill``: the teacher's features, LayerNorm without affine, smooth-L1.

Every target runs in MAE's frame (visible-only encoder, MAE's decoder; ``model.head=mae`` where the target's
recipe would choose BEiT's encoder and FC head), so that only the target changes between rows.
* ``milan``: the teacher's features, cosine loss, prompting decoder, masks that keep what the teacher
  finds salient (``mask.type=attention mask.attention.mode=keep mask.attention.source=teacher``).
* ``vqkd``: BEiT v2, cross-entropy on the codes of a VQ-KD tokenizer (``configs/vqkd_fmnist.yaml``,
  trained first when ``--tokenizer`` does not exist).
* ``vqkd_cls``: the same with BEiT v2's class-token pretraining head.

Step cost: after the runs, one training step of each variant (forward, backward, AdamW; the teacher or
tokenizer included, each step getting a fresh copy of the batch) is timed on the same 64 images, the
variants taking turns round by round in this process (``ablation.step_costs``), the median of ``--rounds``
reported relative to ``pixel``; ``--step-cost-only`` times the steps without the runs. Runs are cached
under ``--out/<variant>/``; variants may run in separate processes (``--variants``; ``--threads 1`` for
two at once on two cores) and a last call prints the table::

    .venv/bin/python benchmarks/targets_ablation.py --out runs/targets --threads 1 [--variants pixel hog]
    .venv/bin/python benchmarks/targets_ablation.py --threads 1 --step-cost-only --rounds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ablation  # benchmarks/ablation.py, beside this script
import torch

from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
from mimkit.data.transforms import EvalTransform, default_normalization
from mimkit.eval.knn import knn_scores
from mimkit.eval.linear import train_linear_probe
from mimkit.eval.report import classification_metrics
from mimkit.targets import build_teacher

RECIPE = Path("configs/mae_vit_tiny_fmnist.yaml")
TEACHER = ["target.teacher.spec=efficientnet_lite0", "target.teacher.input_size=128"]


def variants(tokenizer: Path) -> dict[str, list[str]]:
    # every target in MAE's frame (visible-only encoder, MAE's decoder), so that only the target changes; the
    # BEiT encoder and FC head of MaskDistill's and BEiT v2's own recipes are rows of benchmarks/design_space.py
    vqkd = ["target.type=vqkd", f"target.tokenizer={tokenizer}", "model.head=mae"]
    return {
        "pixel": [],
        "hog": ["target.type=hog"],
        "maskdistill": ["target.type=maskdistill", *TEACHER, "model.head=mae"],
        "milan": [
            "target.type=milan",
            *TEACHER,
            "mask.type=attention",
            "mask.attention.mode=keep",
            "mask.attention.source=teacher",
        ],
        "vqkd": vqkd,
        "vqkd_cls": [*vqkd, "target.cls.enabled=true"],
    }


def teacher_reference(out: Path, train_limit: int, test_limit: int) -> dict[str, float]:
    """kNN and linear probe on the teacher's average-pooled stage-4 features of the same images."""
    path = out / "teacher_reference.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    print("[teacher] features and probes ...", flush=True)
    mean, std = default_normalization(1, "fashion_mnist")
    teacher = build_teacher("efficientnet_lite0", student_mean=mean, student_std=std, input_size=128)
    transform = EvalTransform(32, mean=mean, std=std)
    data = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images, labels = load_fashion_mnist(split=split)
        batches = resize_uint8(images[:limit], 32).split(256)
        features = torch.cat([teacher(transform(batch), (8, 8)).mean(dim=1) for batch in batches])  # (N, 112)
        data[split] = (features, labels[:limit].long())
    (train, train_labels), (test, test_labels) = data["train"], data["test"]
    knn = classification_metrics(knn_scores(train, train_labels, test, num_classes=10), test_labels, 10).top1
    linear = train_linear_probe(train, train_labels, test, test_labels, num_classes=10, epochs=90, blr=0.1).top1
    result = {"knn": knn, "linear": linear}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/targets"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/vqkd_fmnist/tokenizer.pt"))
    parser.add_argument("--variants", nargs="*", default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=20000, help="pretraining images (the first ones)")
    parser.add_argument("--train-limit", type=int, default=5000, help="probe and fine-tuning training images")
    parser.add_argument("--test-limit", type=int, default=1000, help="probe and fine-tuning test images")
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--no-step-cost", action="store_true", help="skip the step timing")
    parser.add_argument("--step-cost-only", action="store_true", help="only time one training step of every variant")
    parser.add_argument("--rounds", type=int, default=5, help="step timing: timed rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = variants(args.tokenizer)
    names = args.variants or list(table)
    unknown = set(names) - set(table)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(table)}")
    if any(name.startswith("vqkd") for name in names):
        ablation.ensure_tokenizer(args.tokenizer, progress=args.progress)
    timed = {name: table[name] for name in dict.fromkeys(["pixel", *names])}
    if args.step_cost_only:
        costs = ablation.step_costs(RECIPE, timed, rounds=args.rounds)
        print(f"one training step on 64 images, {torch.get_num_threads()} thread(s), median of {args.rounds} rounds")
        print("| target | ms | relative to pixel |")
        print("|---|---:|---:|")
        for name, seconds in costs.items():
            print(f"| {name} | {1000 * seconds:.0f} | {seconds / costs['pixel']:.2f}x |")
        return
    finetune_config = ablation.finetune_recipe(args.ft_epochs, args.train_limit, args.test_limit)
    limits = dict(train_limit=args.train_limit, test_limit=args.test_limit, progress=args.progress)
    rows = []
    for name in names:
        settings = [*table[name], f"train.epochs={args.epochs}", f"data.limit={args.limit}"]
        rows.append((name, *ablation.measure(args.out / name, RECIPE, settings, finetune_config, **limits)))
    reference = teacher_reference(args.out, args.train_limit, args.test_limit)
    costs = {} if args.no_step_cost else ablation.step_costs(RECIPE, timed, rounds=args.rounds)

    print()
    print(
        f"Fashion-MNIST 32x32, ViT-Tiny/4 student, {args.epochs} epoch(s) of {args.limit} images, batch 64; kNN, "
        f"linear probe and {args.ft_epochs}-epoch full fine-tuning on {args.train_limit} train / "
        f"{args.test_limit} test images (top-1 %); step cost relative to pixel (same batch, turns in one process)"
    )
    print("| target | final loss | kNN | linear | fine-tune | step cost |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, summary, knn, linear, tuned in rows:
        cost = f"{costs[name] / costs['pixel']:.2f}x" if costs else "-"
        print(
            f"| {name} | {summary['final_loss']:.4f} | {100 * knn:.2f} | {100 * linear:.2f} | {100 * tuned:.2f} "
            f"| {cost} |"
        )
    print(f"| teacher (EfficientNet-Lite0 stage 4, pooled) | - | {100 * reference['knn']:.2f} | "
          f"{100 * reference['linear']:.2f} | - | - |")  # fmt: skip
    if costs:
        print(f"(pixel step: {costs['pixel'] * 1000:.0f} ms on {torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
