"""A whole pretraining job: train, then the end-of-run picture and kNN check the recipe asks for."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from mimkit.build import build_model
from mimkit.config import Config
from mimkit.engine.pretrain import Pretrainer
from mimkit.files import atomic_write
from mimkit.models import MaskedImageModel

log = logging.getLogger(__name__)


def eval_split(config: Config, split: str, limit: int | None) -> Any:
    """A split of the run's data set decoded in memory, for the end-of-run checks."""
    from mimkit.data import build_dataset

    data = build_dataset(
        config.data.dataset,
        root=config.data.root,
        split=split,
        img_size=config.model.img_size,
        in_chans=config.model.in_chans,
        in_memory=True,
        limit=limit,
        num_workers=config.data.num_workers,
        crop_ratio=config.data.eval_crop_ratio,
    )
    if data.images is None:  # in_memory=True decodes everything up front
        raise RuntimeError(f"the {split} split of {config.data.dataset} was not decoded into memory")
    return data


def check_knn_data(trainer: Pretrainer) -> None:
    """Fail before training, not after it, when the kNN check asked for cannot run on this data."""
    from mimkit.data import resolve_folder_split
    from mimkit.data.folder import scan_image_folder

    cfg = trainer.config
    advice = "or set eval.knn=false"
    if trainer.dataset.labels is None:
        raise ValueError(
            f"eval.knn needs labelled training images (one subfolder per class) in {cfg.data.root}, {advice}"
        )
    if cfg.data.dataset == "folder":
        assert cfg.data.root is not None  # validated with the config
        try:
            test_root = resolve_folder_split(cfg.data.root, "test")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"eval.knn needs a test split: {err}; {advice}") from None
        _, test_labels, test_classes = scan_image_folder(test_root)
        if test_labels is None:
            raise ValueError(f"eval.knn needs labelled test images (one subfolder per class) in {test_root}, {advice}")
        if list(test_classes) != list(trainer.dataset.classes):
            raise ValueError(
                f"the class subfolders of {test_root} {list(test_classes)} differ from the training ones "
                f"{list(trainer.dataset.classes)}; give both splits the same classes"
            )


def knn_report(trainer: Pretrainer, model: MaskedImageModel) -> dict[str, Any]:
    """kNN accuracy on the test split for the trained encoder and, as a baseline, the same
    architecture at random initialisation (same seed as the run)."""
    from mimkit.data.transforms import EvalTransform
    from mimkit.eval.knn import extract_features, knn_accuracy

    cfg = trainer.config
    ev = cfg.eval
    train = eval_split(cfg, "train", ev.knn_train_limit)
    test = eval_split(cfg, "test", ev.knn_test_limit)
    if train.labels is None or test.labels is None:
        raise ValueError("kNN evaluation needs labelled data (one subfolder per class); set eval.knn=false")
    transform = EvalTransform(cfg.model.img_size, mean=trainer.mean, std=trainer.std)
    torch.manual_seed(cfg.train.seed)
    encoders = {"pretrained": model.encoder}
    if ev.knn_baseline:
        encoders["random_init"] = build_model(cfg).encoder.to(trainer.device)
    report: dict[str, Any] = {
        "pool": ev.knn_pool,
        "k": ev.knn_k,
        "temperature": ev.knn_temperature,
        "train_images": len(train),
        "test_images": len(test),
    }
    for name, encoder in encoders.items():
        feats = [
            extract_features(
                encoder,
                data.images,
                transform=transform,
                pool=ev.knn_pool,
                device=trainer.device,
                progress=cfg.train.progress,
                desc=f"kNN features ({name}, {split})",
            )
            for data, split in ((train, "train"), (test, "test"))
        ]
        report[name] = knn_accuracy(
            feats[0],
            train.labels,
            feats[1],
            test.labels,
            k=ev.knn_k,
            temperature=ev.knn_temperature,
            num_classes=len(train.classes),
        )
    return report


def reconstruction_picture(trainer: Pretrainer, model: MaskedImageModel) -> str:
    """A grid of test images, their masks and reconstructions, saved as ``reconstruction.png``."""
    from mimkit.data.transforms import EvalTransform
    from mimkit.engine.reconstruction import reconstruct, save_reconstruction_grid

    cfg = trainer.config
    try:
        images = eval_split(cfg, "test", cfg.eval.num_images).images
    except FileNotFoundError:  # a folder without a test split: show training images
        images = eval_split(cfg, "train", cfg.eval.num_images).images
    images = images[: cfg.eval.num_images]
    batch = EvalTransform(cfg.model.img_size, mean=trainer.mean, std=trainer.std)(images.to(trainer.device))
    result = reconstruct(model, batch, generator=torch.Generator().manual_seed(cfg.train.seed))
    path = trainer.out_dir / "reconstruction.png"
    save_reconstruction_grid(
        result,
        path,
        mean=trainer.mean,
        std=trainer.std,
        norm_pix=cfg.target.norm_pix,
        title=f"{cfg.model.name} after {trainer.step} steps",
    )
    return str(path)


def run_pretraining(config: Config, resume: bool | str = False) -> dict[str, Any]:
    """Pretrain, then write the reconstruction picture and the kNN check if the recipe asks for them.

    Under torchrun every rank trains; rank 0 alone draws, evaluates and writes the summary.

    Returns:
        A summary dict, also written to ``output_dir/summary.json``.
    """
    trainer = Pretrainer(config, resume=resume)
    try:
        return _train_and_report(trainer)
    finally:
        trainer.close()  # the run directory is free again


def _train_and_report(trainer: Pretrainer) -> dict[str, Any]:
    config = trainer.config
    if config.eval.knn:
        check_knn_data(trainer)
    result = trainer.fit()
    summary: dict[str, Any] = {
        "output_dir": str(result.output_dir),
        "checkpoint": str(result.checkpoint),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "train_images_per_second": round(result.images_per_second, 1),
        "train_seconds": round(result.seconds, 1),
        "skipped_images": result.num_skipped_images,
    }
    if trainer.place.distributed:
        summary["world_size"] = trainer.place.world_size
    if config.mask.type == "self_guided":
        summary["self_guided_switch_step"] = trainer.model.masker.switch_step  # type: ignore[attr-defined]
    if not trainer.place.is_main:
        return summary
    model = trainer.evaluation_model()
    if config.eval.reconstruct and config.target.type == "pixel":
        summary["reconstruction"] = reconstruction_picture(trainer, model)
    elif config.eval.reconstruct:
        log.info("no reconstruction picture: the model predicts %s targets, not pixels", config.target.type)
    if config.eval.knn:
        summary["knn"] = knn_report(trainer, model)
    text = json.dumps(summary, indent=2)
    atomic_write(trainer.out_dir / "summary.json", lambda handle: handle.write(text.encode()))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report printed by ``mimkit pretrain``: where things went and what they measure."""
    lines = [
        f"run directory   {summary['output_dir']}",
        f"checkpoint      {summary['checkpoint']} (step {summary['steps']})",
        f"final loss      {summary['final_loss']:.4f}",
        f"throughput      {summary['train_images_per_second']:.1f} img/s over {summary['train_seconds']:.0f} s"
        + (f" on {summary['world_size']} ranks" if summary.get("world_size") else ""),
    ]
    if summary.get("skipped_images"):
        lines.append(f"skipped images  {summary['skipped_images']} unreadable file(s), named in the warnings above")
    if "reconstruction" in summary:
        lines.append(f"reconstruction  {summary['reconstruction']}")
    knn = summary.get("knn")
    if knn:
        head = (
            f"kNN on the test split ({knn['test_images']} images; {knn['train_images']} train images, "
            f"k={knn['k']}, T={knn['temperature']}, {knn['pool']} pool)"
        )
        lines.append(head)
        for name in ("pretrained", "random_init"):
            if name in knn:
                acc = knn[name]
                top5 = f"   top-5 {100 * acc['top5']:6.2f}%" if "top5" in acc else ""
                lines.append(f"  {name.replace('_', ' '):<12} top-1 {100 * acc['top1']:6.2f}%{top5}")
    return "\n".join(lines)
