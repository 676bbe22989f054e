"""Partial and full fine-tuning on real Fashion-MNIST images with a tiny ViT."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mimkit.build import create_model
from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
from mimkit.data.transforms import EvalTransform
from mimkit.eval.finetune import (
    Classifier,
    FinetuneConfig,
    finetune,
    format_finetune,
    layer_decay_groups,
    load_classifier,
    run_finetune,
)
from mimkit.eval.linear import predict

FMNIST_MEAN, FMNIST_STD = (0.286,), (0.353,)


@pytest.fixture(scope="module")
def subset() -> dict[str, torch.Tensor]:
    """The first 600 training and 200 test images of Fashion-MNIST at 32x32 (every class present)."""
    train, train_labels = load_fashion_mnist(split="train")
    test, test_labels = load_fashion_mnist(split="test")
    return {
        "train": resize_uint8(train[:600], 32),
        "train_labels": train_labels[:600].long(),
        "test": resize_uint8(test[:200], 32),
        "test_labels": test_labels[:200].long(),
    }


def tiny_encoder(tiny_args: dict, depth: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("vit_tiny", **{**tiny_args, "depth": depth}).encoder


def test_partial_finetuning_leaves_frozen_blocks_bit_identical(subset, tiny_args) -> None:
    encoder = tiny_encoder(tiny_args, depth=3)
    model = Classifier(encoder, 10, trainable_blocks=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = FinetuneConfig(epochs=1, batch_size=100, blr=4e-3, drop_path=0.2, log_every_steps=1)
    result = finetune(
        model, subset["train"], subset["train_labels"], subset["test"], subset["test_labels"],
        config=config, mean=FMNIST_MEAN, std=FMNIST_STD, progress=False,
    )  # fmt: skip
    assert result.steps == 6
    trainable = {"encoder.blocks.2.", "encoder.norm.", "head."}
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        if any(name.startswith(prefix) for prefix in trainable):
            assert param.requires_grad
            assert moved or name.startswith("head.norm"), name  # BN without affine has no parameters
        else:
            assert not param.requires_grad and not moved, name  # patch embed, class token, blocks 0-1
    assert not any(name.startswith("head.norm") for name, _ in model.named_parameters())
    model.train()
    assert [block.training for block in encoder.blocks] == [False, False, True]
    assert encoder.blocks[2].drop_path.drop_prob == pytest.approx(0.2)


def test_layer_decay_assigns_the_expected_lr_to_every_block(tiny_args) -> None:
    depth, decay = 4, 0.5
    model = Classifier(tiny_encoder(tiny_args, depth=depth), 10)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if name.startswith("encoder.blocks."):
            block = int(name.split(".")[2])
            expected = decay ** (depth - block)  # the last block learns at half the head's rate
        elif name.startswith(("encoder.patch_embed", "encoder.cls_token")):
            expected = decay ** (depth + 1)
        else:  # the encoder's final norm and the head
            expected = 1.0
        if param.requires_grad:
            assert scale_of[id(param)] == pytest.approx(expected), name
            assert decay_of[id(param)] == (0.0 if param.ndim == 1 or "cls_token" in name else 0.05), name
    assert len(scale_of) == sum(p.requires_grad for p in model.parameters())  # every parameter in one group
    assert "encoder.pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}  # fixed sin-cos


def test_head_only_partial_finetuning_matches_the_linear_probe_model(subset, tiny_args) -> None:
    model = Classifier(tiny_encoder(tiny_args), 10, trainable_blocks=0)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"head.head.weight", "head.head.bias"}
    config = FinetuneConfig(
        epochs=10, batch_size=64, blr=0.1, weight_decay=0.0, label_smoothing=0.0, crop_scale=(1.0, 1.0), hflip=False
    )
    result = finetune(
        model, subset["train"], subset["train_labels"], subset["test"], subset["test_labels"],
        config=config, mean=FMNIST_MEAN, std=FMNIST_STD, progress=False,
    )  # fmt: skip
    top1 = (result.logits.argmax(1) == subset["test_labels"]).float().mean().item()
    assert top1 > 0.45  # a linear classifier on a random tiny ViT's features: ~0.6, chance 0.1
    assert [record["epoch"] for record in result.history] == list(range(1, 11))
    assert result.history[-1]["test_top1"] == pytest.approx(top1)


def test_full_finetuning_learns_and_writes_its_outputs(checkpoint, tmp_path) -> None:
    recipe = ["epochs=4", "batch_size=50", "blr=1e-2", "warmup_epochs=0.5", "layer_decay=1.0", "drop_path=0.0"]
    recipe += ["label_smoothing=0.0", "crop_scale=[0.8, 1.0]", "train_limit=600", "test_limit=200", "log_every_steps=5"]
    results = run_finetune(
        checkpoint, config=load_config(None, recipe, schema=FinetuneConfig), out_dir=tmp_path, progress=False
    )
    run_dir = tmp_path / "full" / "pretrained"
    assert results["top1"] > 0.3  # measured 0.42 for this untrained tiny ViT after 48 steps; chance 0.1
    assert results["steps"] == 48 and results["trainable_parameters"] > 100_000
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["top1"] == results["top1"] and saved["protocol"] == "full"
    assert len(saved["history"]) == 4 and sum(map(sum, saved["confusion"])) == 200
    assert saved["top5"] >= saved["top1"] and set(saved["per_class_accuracy"]) == set(saved["classes"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "finetune/lr" in r] == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert [r["finetune/test_top1"] for r in records if "finetune/test_top1" in r] == [
        h["test_top1"] for h in saved["history"]
    ]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "confusion.png").stat().st_size > 1000
    restored, state = load_classifier(run_dir / "classifier.pt")
    test_images = resize_uint8(load_fashion_mnist(split="test")[0][:200], 32)
    logits = predict(restored, test_images, 256, transform=EvalTransform(32, FMNIST_MEAN, FMNIST_STD))
    assert state["classes"] == saved["classes"]
    assert (logits.argmax(1) == load_fashion_mnist(split="test")[1][:200]).float().mean().item() == pytest.approx(
        results["top1"]
    )
    assert "top-1" in format_finetune(results)


def test_mixup_cutmix_and_ema_run_and_ema_is_reported(checkpoint, tmp_path) -> None:
    config = load_config(
        None,
        ["epochs=1", "batch_size=50", "train_limit=300", "test_limit=100", "mixup=0.8", "cutmix=1.0", "ema=true"],
        schema=FinetuneConfig,
    )
    results = run_finetune(checkpoint, config=config, out_dir=tmp_path, progress=False, save_model=False)
    assert config.mixing and results["config"]["mixup"] == 0.8
    assert "top1_without_ema" in results  # the EMA's accuracy is the one reported, the raw model's beside it
    assert not (tmp_path / "full" / "pretrained" / "classifier.pt").exists()


def test_bad_recipes_fail_before_training_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key.*epoch"):
        load_config(None, ["epoch=3"], schema=FinetuneConfig)
    with pytest.raises(ConfigError, match="layer_decay"):
        load_config(None, ["layer_decay=1.5"], schema=FinetuneConfig)
    with pytest.raises(ConfigError, match="batch_size: must be even"):
        load_config(None, ["mixup=0.8", "batch_size=51"], schema=FinetuneConfig)


def test_cli_finetune_on_a_folder_and_its_errors(checkpoint, tmp_path, capsys, write_split_folder) -> None:
    data = write_split_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*argv, "--partial-blocks", "1", "epochs=8", "batch_size=16", "blr=0.05"]) == 0
    assert "partial1 fine-tuning of" in capsys.readouterr().out
    results = json.loads((out / "partial1" / "pretrained" / "results.json").read_text())
    assert results["classes"] == ["bag", "trouser"] and results["top5"] is None
    assert results["top1"] > 0.85  # bags and trousers are easy to tell apart

    assert main([*argv, "--partial-blocks", "3"]) == 2
    assert "--partial-blocks must lie in [0, 2]" in capsys.readouterr().err
    assert main([*argv, "epochs=two"]) == 2
    assert "epochs: expected an integer" in capsys.readouterr().err
    mismatched = write_split_folder(tmp_path / "mismatched", test_classes=("bag", "sneaker"))
    assert main([*argv[:3], "--data", str(mismatched), "--out", str(tmp_path / "bad")]) == 2
    assert "['bag', 'sneaker']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


CONVMAE = dict(img_size=32, in_chans=1, patch_sizes=(2, 2, 2), depths=(1, 1, 2), decoder="micro")


@pytest.mark.parametrize("fuse", [True, False])
def test_classifier_features_are_the_encoders_own_for_vit_and_convmae(subset, tiny_args, fuse) -> None:
    torch.manual_seed(0)
    vit = tiny_encoder(tiny_args)
    convvit = create_model("convmae_tiny", **CONVMAE, fuse=fuse).encoder
    images = EvalTransform(32, FMNIST_MEAN, FMNIST_STD)(subset["test"][:8])  # (8, 1, 32, 32)
    for encoder in (vit, convvit):
        for blocks in (None, 0, 1):
            model = Classifier(encoder, 10, pool="avg", trainable_blocks=blocks).eval()
            model.head = torch.nn.Identity()  # the pooled features the head sees
            expected = encoder.forward_features(images, pool="avg")  # (8, D), no fusion downstream
            torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no class token"):
        Classifier(convvit, 10, pool="cls")


def test_partial_convmae_finetuning_freezes_the_conv_stages_and_decays_them_as_embeddings(subset) -> None:
    torch.manual_seed(0)
    encoder = create_model("convmae_tiny", **CONVMAE).encoder
    model = Classifier(encoder, 10, trainable_blocks=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = FinetuneConfig(epochs=1, batch_size=100, blr=4e-3, drop_path=0.2, log_every_steps=1)
    result = finetune(
        model, subset["train"], subset["train_labels"], subset["test"], subset["test_labels"],
        config=config, mean=FMNIST_MEAN, std=FMNIST_STD, progress=False,
    )  # fmt: skip
    assert result.steps == 6
    trainable = ("encoder.blocks3.1.", "encoder.norm.", "head.")
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        if name.startswith(trainable):
            assert param.requires_grad and moved, name
        else:  # conv stages, embeddings, fusion convolutions, the first transformer block
            assert not param.requires_grad and not moved, name
    model.train()
    assert not any(module.training for module in (*encoder.blocks1, *encoder.blocks2, encoder.blocks3[0]))
    assert encoder.blocks3[1].training

    full = Classifier(create_model("convmae_tiny", **CONVMAE).encoder, 10)
    groups = layer_decay_groups(full, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, param in full.named_parameters():
        if name.startswith("encoder.blocks3."):
            expected = 0.5 ** (2 - int(name.split(".")[2]))
        elif name.startswith(("encoder.norm", "head.")):
            expected = 1.0
        else:  # stages 1-2, the stage-3 embedding and the fusion convolutions come before the blocks
            expected = 0.5**3
        if param.requires_grad:
            assert scale_of[id(param)] == pytest.approx(expected), name


@pytest.mark.slow
def test_torchrun_finetune_on_two_ranks_equals_one_process(checkpoint, tmp_path, write_split_folder) -> None:
    import os
    import subprocess
    import sys

    data = write_split_folder(tmp_path / "data")
    recipe = ["epochs=2", "drop_path=0.0", "blr=0.01"]  # no drop path: its draws are per rank
    argv = ["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "one"), *recipe, "batch_size=16"]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mimkit"]
    command += [*argv, "--out", str(tmp_path / "two"), *recipe, "batch_size=8"]
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fine-tuning of") == 1  # rank 0 alone reports
    one, two = (
        torch.load(tmp_path / run / "full" / "pretrained" / "classifier.pt", weights_only=True)["model"]
        for run in ("one", "two")
    )
    for key, value in one.items():  # DDP's mean of two half-batch gradients vs one batch mean: float rounding
        torch.testing.assert_close(two[key], value, atol=2e-5, rtol=1e-4, msg=key)
    results = [
        json.loads((tmp_path / run / "full" / "pretrained" / "results.json").read_text()) for run in ("one", "two")
    ]
    assert results[0]["steps"] == results[1]["steps"] and results[0]["lr"] == results[1]["lr"]
    assert abs(results[0]["top1"] - results[1]["top1"]) <= 1 / results[0]["test_images"]


def test_finetuning_on_photo_folders_trains_on_crops_of_the_original_images(subset, tiny_args, tmp_path) -> None:
    """Wide photos (3:1) with a white left third and a black right third: every crop of the original covers
    part of a border (a box of at least half the area is wider than the middle third), where the old path's
    stored center squares never showed one."""
    from PIL import Image

    from mimkit.data import ImageFolderDataset
    from mimkit.data.crops import CropDataset
    from mimkit.data.transforms import MAEAugment
    from mimkit.eval.data import load_training_crops

    photos = subset["train"][:8, 0].numpy().clip(40, 215)  # (8, 32, 32) real garments, no pure white or black
    for split in ("train", "test"):
        for index, middle in enumerate(photos):
            folder = tmp_path / "data" / split / ("bag" if index % 2 else "shirt")
            folder.mkdir(parents=True, exist_ok=True)
            canvas = Image.new("L", (96, 32), 255)  # (width, height)
            canvas.paste(0, (64, 0, 96, 32))
            canvas.paste(Image.fromarray(middle), (32, 0))
            canvas.save(folder / f"{index}.png")
    crops = load_training_crops(
        tmp_path / "data", img_size=32, in_chans=1, scale=(0.5, 1.0), hflip=True, seed=0, progress=False
    )
    assert isinstance(crops, CropDataset) and crops.classes == ["bag", "shirt"] and len(crops) == 8
    seen: list[torch.Tensor] = []
    model = Classifier(tiny_encoder(tiny_args), 2)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if module.training else None)
    config = FinetuneConfig(epochs=2, batch_size=4, num_workers=0, drop_path=0.0)
    result = finetune(
        model, crops, crops.labels, subset["test"][:4], torch.tensor([0, 1, 0, 1]),
        config=config, mean=(0.5,), std=(0.25,), progress=False,
    )  # fmt: skip
    assert result.steps == 4 and len(seen) == 4
    pixels = torch.cat(seen) * 0.25 * 255 + 0.5 * 255  # (16, 1, 32, 32) back to 0..255
    border = (pixels >= 250) | (pixels <= 5)  # white or black, never in the garments
    assert border.flatten(1).any(1).all()  # every training crop shows a border of its original
    # the same images stored as center squares and cropped per batch, the old path: never a border
    squares = ImageFolderDataset(tmp_path / "data" / "train", 32, in_chans=1, in_memory=True)
    old = MAEAugment(32, (0.5, 1.0), mean=(0.0,), std=(1 / 255,))(squares.images, torch.Generator().manual_seed(0))
    assert not ((old >= 250) | (old <= 5)).any()


RESUMED = ["epochs=2", "batch_size=16", "train_limit=96", "test_limit=64", "log_every_steps=1", "num_workers=0"]


@pytest.mark.parametrize(
    ("source", "stop_after"),
    [("memory", 4), ("memory", 6), ("folder", 3)],  # mid-epoch, at an epoch's last step, crops of photos
)
def test_a_stopped_finetuning_resumes_to_the_uninterrupted_result(
    checkpoint, tmp_path, monkeypatch, request, write_split_folder, source, stop_after
) -> None:
    """A real SIGTERM after a step: the run saves, stops, and ``resume=True`` ends with the weights, history,
    accuracy and metrics of the run that was never stopped (drop path, mixup and the EMA all draw random
    numbers, so every generator and RNG state must come back)."""
    import signal

    from mimkit.engine.logging import MetricsLogger
    from mimkit.engine.run_guard import TrainingInterrupted
    from mimkit.files import load_checkpoint_file

    data = "fashion_mnist" if source == "memory" else str(write_split_folder(tmp_path / "data"))
    config = load_config(None, [*RESUMED, "mixup=0.8", "ema=true", "drop_path=0.1"], schema=FinetuneConfig)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two runs must do the same arithmetic
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def run(out: str, **kwargs):
        torch.manual_seed(0)  # drop path draws from the global generator: both runs start from the same state
        return run_finetune(checkpoint, data=data, config=config, out_dir=tmp_path / out, progress=False, **kwargs)

    reference = run("whole")
    assert reference["steps"] > stop_after + 1  # the memory runs: 2 epochs of 6 steps; the folder: of 4
    logged = MetricsLogger.log

    def log_then_signal(self, step, metrics):
        logged(self, step, metrics)
        if step == stop_after and "finetune/loss" in metrics:
            signal.raise_signal(signal.SIGTERM)  # as a scheduler would send it, mid-run

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)
    run_dir = tmp_path / "stopped" / "full" / "pretrained"
    with pytest.raises(
        TrainingInterrupted, match=rf"after step {stop_after}; saved .*last\.pt, continue with --resume"
    ):
        run("stopped")
    monkeypatch.setattr(MetricsLogger, "log", logged)
    assert load_checkpoint_file(run_dir / "last.pt")["step"] == stop_after
    assert not (run_dir / "results.json").exists()

    resumed = run("stopped", resume=True)
    assert resumed["steps"] == reference["steps"] and resumed["history"] == reference["history"]
    assert resumed["top1"] == reference["top1"] and torch.equal(resumed["confusion"], reference["confusion"])
    whole = torch.load(tmp_path / "whole" / "full" / "pretrained" / "classifier.pt", weights_only=True)["model"]
    again = torch.load(run_dir / "classifier.pt", weights_only=True)["model"]
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert not (run_dir / "last.pt").exists()  # finished: nothing left to resume
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "whole" / "full" / "pretrained" / "metrics.jsonl").read_text().splitlines()


def test_a_diverging_finetuning_stops_with_one_line_naming_the_step_and_lr(checkpoint, tmp_path, capsys) -> None:
    argv = ["finetune", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--no-progress", *RESUMED]
    assert main([*argv, "lr=1e30", "warmup_epochs=0"]) == 1
    err = capsys.readouterr().err.strip()
    pattern = (
        r"mimkit finetune: error: fine-tuning diverged at step \d+ \(loss nan\) with peak lr 1e\+30; lower blr or lr"
    )
    assert re.fullmatch(pattern, err), err


def test_a_resume_needs_the_stopped_runs_file_and_settings(checkpoint, tmp_path, capsys) -> None:
    from mimkit.engine.resumable import SettingsChanged

    argv = ["finetune", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--no-progress", *RESUMED]
    assert main([*argv, "--resume"]) == 2
    assert "--resume: no " + str(tmp_path / "full" / "pretrained" / "last.pt") in capsys.readouterr().err
    config = load_config(None, [*RESUMED, "epochs=1"], schema=FinetuneConfig)
    run_finetune(checkpoint, config=config, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "full" / "pretrained" / "last.pt").exists()  # a finished run removes it
    torch.save(  # a run stopped after step 2 of the 1-epoch recipe, continued with 2 epochs and blr 0.01
        _stopped_state(checkpoint, config, tmp_path), tmp_path / "full" / "pretrained" / "last.pt"
    )
    other = load_config(None, [*RESUMED, "blr=0.01"], schema=FinetuneConfig)
    with pytest.raises(SettingsChanged, match=r"config\.blr: 0\.001 there, 0\.01 now; config\.epochs: 1 there, 2 now"):
        run_finetune(checkpoint, config=other, out_dir=tmp_path, progress=False, resume=True)


def _stopped_state(checkpoint, config: FinetuneConfig, tmp_path) -> dict:
    """The file a run of ``config`` stopped by a signal after step 2 leaves behind."""
    import signal

    from mimkit.engine.logging import MetricsLogger
    from mimkit.engine.run_guard import TrainingInterrupted
    from mimkit.files import load_checkpoint_file

    class StopAtStepTwo(MetricsLogger):
        def log(self, step, metrics):
            super().log(step, metrics)
            if step == 2:
                signal.raise_signal(signal.SIGTERM)

    out = tmp_path / "first"
    with pytest.raises(TrainingInterrupted), pytest.MonkeyPatch.context() as patch:
        patch.setattr("mimkit.engine.logging.MetricsLogger", StopAtStepTwo)
        run_finetune(checkpoint, config=config, out_dir=out, progress=False)
    return load_checkpoint_file(out / "full" / "pretrained" / "last.pt")


def test_finetuning_draws_its_drop_path_from_its_own_seed_and_gives_back_the_callers_rng(subset, tiny_args) -> None:
    """Drop path draws from torch's global RNG: fine-tuning seeds it from ``config.seed``, so the result does not
    depend on what the process drew before, and the caller's RNG state is as it was afterwards."""
    config = FinetuneConfig(epochs=1, batch_size=100, blr=4e-3, drop_path=0.3, log_every_steps=1)
    weights = []
    for caller_seed in (1, 2):
        model = Classifier(tiny_encoder(tiny_args), 10)
        torch.manual_seed(caller_seed)
        caller = torch.get_rng_state()
        finetune(
            model, subset["train"], subset["train_labels"], subset["test"], subset["test_labels"],
            config=config, mean=FMNIST_MEAN, std=FMNIST_STD, progress=False,
        )  # fmt: skip
        assert torch.equal(torch.get_rng_state(), caller)
        weights.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
