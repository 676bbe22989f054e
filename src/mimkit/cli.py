"""``mimkit <command>``: thin wrappers that parse a config and call tasks, engine, eval and analysis."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mimkit.config import ConfigError, load_config


def _pretrain(args: argparse.Namespace) -> int:
    from mimkit.engine import distributed
    from mimkit.tasks.pretrain import format_summary, run_pretraining

    config = load_config(args.config, args.overrides)
    resume: bool | str = args.resume if args.resume not in (None, "") else False
    if args.resume == "":
        resume = True
    with distributed.leaving_together():
        summary = run_pretraining(config, resume=resume)
    if distributed.place().is_main:
        print(format_summary(summary))
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from mimkit.analysis.reconstruct import reconstruct_files

    path = reconstruct_files(
        args.checkpoint, args.images, args.out, mask_ratio=args.mask_ratio, seed=args.seed, limit=args.limit
    )
    print(f"wrote {path}")
    return 0


def _show_batch(args: argparse.Namespace) -> int:
    from mimkit.analysis.show_batch import show_batch

    config = load_config(args.config, args.overrides)
    records = show_batch(config, args.out, boxes=args.boxes, limit=args.limit)
    print(f"wrote {args.out} ({len(records)} crops)" + (f" and {args.boxes}" if args.boxes else ""))
    return 0


def _jpeg_restart(args: argparse.Namespace) -> int:
    from mimkit.data.jpeg_restart import add_restart_markers

    summary = add_restart_markers(args.src, args.dst, progress=not args.no_progress)
    print(summary.format())
    return 1 if summary.failed else 0


def _convert(args: argparse.Namespace) -> int:
    from mimkit.build import convert_checkpoint

    out = convert_checkpoint(args.input, args.output, to=args.to)
    print(f"wrote {out} ({args.to} layout)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from mimkit.analysis.complexity import format_info, model_info
    from mimkit.build import build_model

    config = load_config(args.config, args.overrides)
    print(format_info(model_info(build_model(config))))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from mimkit.engine import distributed
    from mimkit.eval.probe import format_probe, run_probe

    with distributed.leaving_together():
        results = run_probe(
            args.checkpoint,
            protocol=args.protocol,
            data=args.data,
            random_init=args.random_init,
            pool=args.pool,
            out_dir=args.out,
            train_limit=args.train_limit,
            test_limit=args.test_limit,
            epochs=args.epochs,
            batch_size=args.batch_size,
            blr=args.blr,
            optimizer=args.optimizer,
            seed=args.seed,
            progress=not args.no_progress,
            resume=args.resume,
        )
    if distributed.place().is_main:
        print(format_probe(results))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from mimkit.engine import distributed
    from mimkit.eval.finetune import FinetuneConfig, format_finetune, run_finetune

    config = load_config(args.config, args.overrides, schema=FinetuneConfig)
    with distributed.leaving_together():
        results = run_finetune(
            args.checkpoint,
            data=args.data,
            partial_blocks=args.partial_blocks,
            random_init=args.random_init,
            config=config,
            out_dir=args.out,
            progress=not args.no_progress,
            save_model=not args.no_save,
            resume=args.resume,
        )
    if distributed.place().is_main:
        print(format_finetune(results))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from mimkit.analysis.relations import analyze_files, format_relations

    result = analyze_files(
        args.checkpoint,
        args.images,
        args.out,
        compare=args.compare,
        setting=args.setting,
        layer=args.layer,
        limit=args.limit,
        seed=args.seed,
        graph=args.graph,
        foreground=args.foreground,
    )
    print(format_relations(result["layers"], result.get("kl")))
    written = ["relations.json", "maps.png", "sides.png"] + (
        ["exploitation.png"] if result["exploitation_plot"] else []
    )
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from mimkit.tasks.tokenizer import TokenizerConfig, format_tokenizer_summary, train_tokenizer

    config = load_config(args.config, args.overrides, schema=TokenizerConfig)
    summary = train_tokenizer(config, progress=not args.no_progress, resume=args.resume)
    print(format_tokenizer_summary(summary))
    return 0


def _detect_train(args: argparse.Namespace) -> int:
    from mimkit.tasks.detect import DetectConfig, format_detection, run_detect_train

    config = load_config(args.config, args.overrides, schema=DetectConfig)
    results = run_detect_train(config, progress=False if args.no_progress else None, resume=args.resume)
    print(format_detection(results))
    print(f"wrote {config.train.output_dir}/last.pt, results.json, metrics.jsonl")
    return 0


def _detect_eval(args: argparse.Namespace) -> int:
    from mimkit.tasks.detect import format_detection, run_detect_eval

    results = run_detect_eval(
        args.checkpoint,
        args.data,
        annotations=args.annotations,
        out_dir=args.out,
        limit=args.limit,
        picture_score_threshold=args.picture_threshold,
        progress=not args.no_progress,
    )
    print(format_detection(results))
    return 0


def _detect_shapes(args: argparse.Namespace) -> int:
    from mimkit.dense.data.shapes import generate_shapes

    root = generate_shapes(args.out, args.num_images, size=args.size, max_objects=args.max_objects, seed=args.seed)
    print(f"wrote {args.num_images} images to {root}/images, {root}/annotations.json and {root}/masks")
    return 0


def _detect_import_voc(args: argparse.Namespace) -> int:
    from mimkit.dense.data.voc import voc_to_coco

    report = voc_to_coco(args.annotations, args.out, classes=args.classes, skip_difficult=args.skip_difficult)
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mimkit.bench import CONFIGS, BenchOptions, run_benchmark, smoke_options

    if args.smoke:
        options = smoke_options(args.out)
    else:
        # ConvMAE has no HF peer: it is timed among the variants, against MAE.
        configs: tuple[str, ...] = {"all": ("tiny", "base"), "convmae": ()}.get(args.config, (args.config,))
        options = BenchOptions(
            configs=configs,
            steps=args.steps,
            repeats=args.repeats,
            threads=args.threads,
            loss_check=args.loss_check,
            compile=args.compile,
            levers=(args.config in ("tiny", "all") or args.compile) and not args.compare_only,
            masking=args.config in ("tiny", "all") and not args.compare_only,
            variants=args.config in ("convmae", "all") and not args.compare_only,
            memory=args.memory,
            pipeline=args.pipeline
            if args.config in ("tiny", "all") and not (args.no_pipeline or args.compare_only)
            else None,
            sweep=args.sweep,
            out=args.out,
            device=args.device,
            precision=args.precision,
        )
    if args.config not in (*CONFIGS, "all"):
        raise ValueError(f"unknown bench config {args.config!r}")
    run_benchmark(options)
    return 0


def _seg_train(args: argparse.Namespace) -> int:
    from mimkit.tasks.segment import SegConfig, format_segmentation, run_seg_train

    config = load_config(args.config, args.overrides, schema=SegConfig)
    results = run_seg_train(config, progress=False if args.no_progress else None, resume=args.resume)
    print(format_segmentation(results))
    print(f"wrote {config.train.output_dir}/last.pt, results.json, metrics.jsonl")
    return 0


def _seg_eval(args: argparse.Namespace) -> int:
    from mimkit.tasks.segment import format_segmentation, run_seg_eval

    results = run_seg_eval(args.checkpoint, args.data, out_dir=args.out, split=args.split, limit=args.limit)
    print(format_segmentation(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="Masked image modeling toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("pretrain", help="pretrain a masked image model")
    p.add_argument("--config", type=Path, help="YAML recipe (defaults when omitted)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="continue from train.output_dir/last.pt, or from CHECKPOINT",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.blr=1e-3 train.epochs=2")
    p.set_defaults(func=_pretrain)

    p = commands.add_parser("reconstruct", help="picture of originals, masks and reconstructions")
    p.add_argument("--checkpoint", required=True, help="mimkit, MAE or HuggingFace checkpoint (file or directory)")
    p.add_argument("--images", required=True, nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--mask-ratio", type=float, default=None, help="mask ratio (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--limit", type=int, default=16, help="at most this many images")
    p.set_defaults(func=_reconstruct)

    p = commands.add_parser("show-batch", help="picture of one augmented training batch beside its crop boxes")
    p.add_argument("--config", type=Path, help="YAML recipe (defaults when omitted)")
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--boxes", type=Path, default=None, help="also write each crop's file, size, box and flip as JSON")
    p.add_argument("--limit", type=int, default=None, help="draw only the first N samples of the batch")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as data.root=/photos train.batch_size=16")
    p.set_defaults(func=_show_batch)

    p = commands.add_parser(
        "jpeg-restart",
        help="copy an image folder with restart markers in its JPEGs, so crops decode only their region",
    )
    p.add_argument("src", type=Path, help="image folder (class subfolders are kept)")
    p.add_argument("dst", type=Path, help="the copy (files already there are kept: an interrupted copy continues)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_jpeg_restart)

    p = commands.add_parser("convert", help="convert weights between mimkit, MAE and HuggingFace layouts")
    p.add_argument("--to", required=True, choices=["mimkit", "mae", "hf"])
    p.add_argument("input", help="checkpoint file or HuggingFace directory")
    p.add_argument("output", help="output file (mimkit, mae) or directory (hf)")
    p.set_defaults(func=_convert)

    p = commands.add_parser("probe", help="kNN or linear-probe accuracy of a checkpoint's frozen encoder")
    p.add_argument("--checkpoint", required=True, help="mimkit, MAE or HuggingFace checkpoint (file or directory)")
    p.add_argument("--protocol", required=True, choices=["knn", "linear"])
    p.add_argument(
        "--data",
        default="fashion_mnist",
        help="fashion_mnist, or a folder with train/ and test/ holding one subfolder per class",
    )
    p.add_argument("--random-init", action="store_true", help="probe the same architecture untrained (a baseline)")
    p.add_argument(
        "--pool",
        choices=["cls", "avg", "both"],
        default=None,
        help="feature pooling (default: both for linear, avg for knn)",
    )
    p.add_argument("--out", type=Path, default=Path("probe"), help="output folder (results.json, PNGs, feature cache)")
    p.add_argument("--epochs", type=int, default=90, help="linear probe epochs (MAE: 90)")
    p.add_argument("--batch-size", type=int, default=256, help="linear probe batch size")
    p.add_argument("--blr", type=float, default=0.1, help="linear probe base lr; lr = blr * batch size / 256")
    p.add_argument(
        "--optimizer",
        choices=["sgd", "lars"],
        default="sgd",
        help="linear probe optimizer: sgd (momentum 0.9), or lars as MAE at batch 16384 (raise --blr with it)",
    )
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only this many test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init and of the linear probe")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the linear probe stopped in this --out folder (same checkpoint, data and settings)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_probe)

    p = commands.add_parser("finetune", help="partial or full fine-tuning of a checkpoint's encoder on labelled data")
    p.add_argument("--checkpoint", required=True, help="mimkit, MAE or HuggingFace checkpoint (file or directory)")
    p.add_argument(
        "--data",
        default="fashion_mnist",
        help="fashion_mnist, or a folder with train/ and test/ holding one subfolder per class",
    )
    p.add_argument(
        "--partial-blocks",
        type=int,
        default=None,
        metavar="K",
        help="train only the last K blocks plus the head (0: the head alone); full fine-tuning when omitted",
    )
    p.add_argument("--random-init", action="store_true", help="fine-tune the same architecture untrained (a baseline)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of fine-tuning keys")
    p.add_argument(
        "--out", type=Path, default=Path("finetune"), help="output folder (results.json, PNG, TensorBoard, model)"
    )
    p.add_argument("--no-save", action="store_true", help="do not write the fine-tuned classifier.pt")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run stopped in this --out folder (same checkpoint, data and recipe) from its last.pt",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "overrides",
        nargs="*",
        help="recipe keys such as epochs=10 blr=1e-3 layer_decay=0.65 mixup=0.8 cutmix=1.0 ema=true",
    )
    p.set_defaults(func=_finetune)

    p = commands.add_parser(
        "analyze", help="token relations per layer, attention/cluster maps, exploitation-rate curves"
    )
    p.add_argument("--checkpoint", required=True, help="mimkit, MAE or HuggingFace checkpoint (file or directory)")
    p.add_argument("--images", required=True, nargs="+", help="image files or folders")
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (relations.json, maps.png, sides.png, exploitation.png)"
    )
    p.add_argument("--compare", default=None, help="second checkpoint: KL divergence of its relations per layer")
    p.add_argument(
        "--setting",
        choices=["practical", "ideal"],
        default="practical",
        help="practical: masked encoder + decoder, as in pretraining; ideal: encoder on all patches",
    )
    p.add_argument("--layer", type=int, default=-1, help="index of the reported layer drawn in maps.png")
    p.add_argument("--limit", type=int, default=8, help="at most this many images")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask")
    p.add_argument("--graph", choices=["weighted", "binary"], default="weighted", help="Ncut graph")
    p.add_argument(
        "--foreground", choices=["border", "mean", "eigenvector"], default="border", help="object side in maps.png"
    )
    p.set_defaults(func=_analyze)

    p = commands.add_parser("tokenizer-train", help="train a BEiT v2 VQ-KD visual tokenizer (codes as MIM targets)")
    p.add_argument("--config", type=Path, help="YAML recipe (defaults when omitted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume", action="store_true", help="continue the run stopped in train.output_dir (same config) from last.pt"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100 model.num_codes=256")
    p.set_defaults(func=_tokenizer_train)

    p = commands.add_parser(
        "detect-train", help="fine-tune a pretrained encoder as a Mask R-CNN backbone (MIMDet, ConvMAE)"
    )
    p.add_argument("--config", type=Path, help="YAML recipe, e.g. configs/detect_shapes.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its last.pt")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides such as model.checkpoint=runs/x/last.pt train.epochs=2"
    )
    p.set_defaults(func=_detect_train)

    p = commands.add_parser("detect-eval", help="COCO box and mask AP of a trained detector, prediction pictures")
    p.add_argument("--checkpoint", required=True, help="last.pt of a detect-train run")
    p.add_argument(
        "--data", required=True, help="COCO folder: images/ + annotations.json (or annotations/instances_*.json)"
    )
    p.add_argument("--annotations", default=None, help="the instances JSON, when not in the folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (results.json, predictions.png)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument(
        "--picture-threshold", type=float, default=None, help="draw detections scoring at least this (default 0.5)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_detect_eval)

    p = commands.add_parser("detect-shapes", help="generate the shapes detection/segmentation set as a COCO folder")
    p.add_argument("--out", required=True, type=Path, help="new folder")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--max-objects", type=int, default=4, help="1 to this many objects per image")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_detect_shapes)

    p = commands.add_parser("detect-import-voc", help="Pascal-VOC XML annotations to a COCO instances JSON (boxes)")
    p.add_argument("annotations", type=Path, help="folder of VOC *.xml files (VOC's Annotations/)")
    p.add_argument("out", type=Path, help="COCO JSON to write, e.g. VOC2012/annotations.json")
    p.add_argument("--classes", nargs="+", default=None, help="class names in label order (default: all found, sorted)")
    p.add_argument("--skip-difficult", action="store_true", help="drop objects marked difficult")
    p.set_defaults(func=_detect_import_voc)

    p = commands.add_parser(
        "seg-train", help="fine-tune a pretrained encoder with a UperNet head for semantic segmentation"
    )
    p.add_argument("--config", type=Path, help="YAML recipe, e.g. configs/seg_shapes.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its last.pt")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as model.backbone=convmae train.epochs=2")
    p.set_defaults(func=_seg_train)

    p = commands.add_parser("seg-eval", help="mIoU and per-class IoU of a trained segmenter, overlays as PNG")
    p.add_argument("--checkpoint", required=True, help="last.pt of a seg-train run")
    p.add_argument("--data", required=True, help="folder: images/ + masks/, JPEGImages/ + SegmentationClass/ (VOC)")
    p.add_argument("--split", default=None, help="ADE20K split folder (images/<split>, annotations/<split>)")
    p.add_argument("--out", required=True, type=Path, help="output folder (results.json, overlays.png)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.set_defaults(func=_seg_eval)

    p = commands.add_parser("info", help="parameters, tokens and FLOPs of a recipe's model")
    p.add_argument("--config", type=Path)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_info)

    p = commands.add_parser("bench", help="pretraining throughput against HuggingFace ViTMAE, FLOP/s, memory")
    p.add_argument(
        "--config",
        choices=["tiny", "base", "convmae", "all"],
        default="tiny",
        help="tiny: ViT-Tiny/4 at 32 px, batch 128, with levers and masking speed-up; base: ViT-B/16 at 224, "
        "batch 32; convmae: ConvMAE-Small, self-guided and teacher steps against MAE; all: everything",
    )
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per model (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--loss-check", type=int, default=0, metavar="STEPS", help="also compare the loss with HF for STEPS steps"
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation)")
    p.add_argument("--memory", action="store_true", help="peak memory of ViT-Tiny/B/L steps (fresh processes)")
    p.add_argument("--sweep", action="store_true", help="img/s against batch size and mask ratio, plotted to --out")
    p.add_argument(
        "--pipeline",
        default="configs/mae_vit_tiny_fmnist.yaml",
        help="recipe of the short end-to-end run that measures the data pipeline's share",
    )
    p.add_argument("--no-pipeline", action="store_true", help="skip the end-to-end run")
    p.add_argument("--compare-only", action="store_true", help="only mimkit against HF (no levers, masking, variants)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of everything on a 2-block model")
    p.add_argument(
        "--device", default="cpu", help="where the comparison runs: cpu, cuda, cuda:N (cuda: --compare-only)"
    )
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast forwards (GPU)")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and throughput.png")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # These import torch: not before --help has been handled.
    from mimkit.checkpoints.load import OptionalDependencyError
    from mimkit.engine.divergence import TrainingDiverged
    from mimkit.engine.run_guard import STOPPED_EXIT_STATUS, RunDirectoryInUse, StoppedAtOnce, TrainingInterrupted
    from mimkit.files import CheckpointError

    try:
        return int(args.func(args))
    except (
        CheckpointError,  # and DiskFullError: no space left, with the space free and needed
        ConfigError,
        OSError,  # FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, no space left
        OptionalDependencyError,
        RunDirectoryInUse,
        ValueError,
    ) as err:
        print(f"mimkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:  # NaN/inf loss: the message says which step and what to lower
        print(f"mimkit {args.command}: error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:  # SIGTERM or Ctrl-C: the step finished and was saved
        print(f"mimkit {args.command}: {err}", file=sys.stderr)
        return STOPPED_EXIT_STATUS
    except StoppedAtOnce as err:
        print(f"mimkit {args.command}: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt as err:
        print(f"mimkit {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
