"""``run_probe`` and ``mimkit probe`` end to end on real Fashion-MNIST, with a tiny ViT saved in every layout."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import mimkit.eval.probe as probe_module
from mimkit.build import build_model, load_checkpoint
from mimkit.checkpoints.load import save_checkpoint_as
from mimkit.cli import main
from mimkit.config import load_config
from mimkit.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from mimkit.data.transforms import EvalTransform
from mimkit.engine.logging import read_metrics
from mimkit.eval.knn import extract_features
from mimkit.eval.probe import format_probe, run_probe

LIMITS = dict(train_limit=1000, test_limit=300)  # the first images of Fashion-MNIST: every class present


@pytest.fixture
def count_extractions(monkeypatch) -> list[str]:
    """Records the ``desc`` of every encoder pass run_probe makes."""
    calls: list[str] = []

    def counting(*args, **kwargs):
        calls.append(kwargs["desc"])
        return extract_features(*args, **kwargs)

    monkeypatch.setattr(probe_module, "extract_features", counting)
    return calls


def test_knn_then_linear_probe_share_one_feature_cache(checkpoint, tmp_path, count_extractions) -> None:
    out = tmp_path / "probe"
    knn = run_probe(checkpoint, protocol="knn", out_dir=out, progress=False, **LIMITS)
    assert count_extractions == ["features (train, avg)", "features (test, avg)"]
    assert knn["pools"] == ["avg"] and (knn["k"], knn["temperature"]) == (20, 0.07)
    assert knn["top1"] > 0.3  # a random tiny ViT's features on 1000 images: ~0.56, chance 0.1
    saved = json.loads((out / "knn" / "pretrained" / "results.json").read_text())
    assert saved["protocol"] == "knn" and saved["random_init"] is False and saved["checkpoint"] == str(checkpoint)
    assert (saved["train_images"], saved["test_images"]) == (1000, 300)
    assert saved["classes"] == FASHION_MNIST_CLASSES
    accuracy = saved["results"]["avg"]["per_class_accuracy"]
    assert list(accuracy) == FASHION_MNIST_CLASSES and all(0 <= value <= 1 for value in accuracy.values())
    assert sum(map(sum, saved["results"]["avg"]["confusion"])) == 300
    assert saved["normalization"] == {"mean": [0.286], "std": [0.353]}  # no run config: Fashion-MNIST defaults
    with Image.open(out / "knn" / "pretrained" / "confusion_avg.png") as img:
        assert img.format == "PNG"

    count_extractions.clear()
    again = run_probe(checkpoint, protocol="knn", out_dir=out, progress=False, **LIMITS)
    assert count_extractions == [] and again["features_extracted"] == 0
    assert again["results"]["avg"]["top1"] == knn["results"]["avg"]["top1"]
    assert "all features from the cache" in format_probe(again)

    # The linear probe reports both pools; only the class-token features are new.
    linear = run_probe(checkpoint, protocol="linear", out_dir=out, optimizer="lars", blr=5.0, progress=False, **LIMITS)
    assert count_extractions == ["features (train, cls)", "features (test, cls)"]
    assert linear["pools"] == ["cls", "avg"]
    for pool in ("cls", "avg"):
        entry = linear["results"][pool]
        assert entry["top1"] > 0.3 and entry["top5"] >= entry["top1"]  # measured ~0.65
        assert entry["feature_dim"] == 64 and len(entry["losses"]) == 90
        assert (out / "linear" / "pretrained" / f"confusion_{pool}.png").is_file()
    assert linear["top1"] == max(linear["results"][pool]["top1"] for pool in ("cls", "avg"))
    assert json.loads((out / "linear" / "pretrained" / "results.json").read_text())["protocol"] == "linear"
    records = read_metrics(out / "linear" / "pretrained" / "metrics.jsonl")  # mirrored to TensorBoard
    assert [r["linear/avg/loss"] for r in records if "linear/avg/loss" in r] == linear["results"]["avg"]["losses"]
    assert records[-1]["step"] == 90 and records[-1]["linear/cls/top1"] == linear["results"]["cls"]["top1"]
    assert list((out / "linear" / "pretrained" / "tb").glob("events.out.tfevents.*"))
    assert len(list((out / "cache").glob("*.pt"))) == 4

    # Other limits are other features: a new cache entry, never a stale hit.
    count_extractions.clear()
    run_probe(checkpoint, protocol="knn", out_dir=out, progress=False, train_limit=500, test_limit=300)
    assert count_extractions == ["features (train, avg)"]

    # The random-init baseline lands beside the checkpoint's results, never over them.
    run_probe(checkpoint, protocol="knn", out_dir=out, random_init=True, progress=False, **LIMITS)
    assert json.loads((out / "knn" / "random_init" / "results.json").read_text())["random_init"] is True
    assert json.loads((out / "knn" / "pretrained" / "results.json").read_text())["random_init"] is False


def test_random_init_is_a_separate_seeded_baseline(checkpoint, tmp_path, count_extractions) -> None:
    out = tmp_path / "probe"
    limits = dict(train_limit=400, test_limit=100)
    trained = run_probe(checkpoint, protocol="knn", pool="cls", out_dir=out, progress=False, **limits)
    baseline = run_probe(
        checkpoint, protocol="knn", pool="cls", random_init=True, seed=1, out_dir=out, progress=False, **limits
    )
    assert len(count_extractions) == 4  # the baseline's features are not the checkpoint's cached ones
    assert baseline["random_init"] is True
    cached = {path.name: torch.load(path, weights_only=True) for path in (out / "cache").glob("train_cls_*.pt")}
    assert len(cached) == 2
    first, second = (entry["features"] for entry in cached.values())
    assert first.shape == second.shape == (400, 64) and not torch.allclose(first, second)
    assert trained["top1"] > 0.3 and baseline["top1"] > 0.3
    # The untrained twin built with the seed the checkpoint was made with has the very same weights.
    same = run_probe(
        checkpoint, protocol="knn", pool="cls", random_init=True, seed=0, out_dir=out, progress=False, **limits
    )
    assert same["results"]["cls"]["confusion"].tolist() == trained["results"]["cls"]["confusion"].tolist()


def test_mimkit_mae_and_hf_layouts_give_identical_features(checkpoint, tmp_path) -> None:
    model = load_checkpoint(checkpoint)
    paths = {layout: save_checkpoint_as(model, tmp_path / f"tiny_{layout}", layout) for layout in ("mae", "hf")}
    images = load_fashion_mnist(split="test")[0][:64]  # (64, 1, 28, 28) uint8
    transform = EvalTransform(32, mean=(0.286,), std=(0.353,))
    reference = {
        pool: extract_features(model.encoder, images, transform=transform, pool=pool, progress=False)
        for pool in ("cls", "avg")
    }
    for layout, path in paths.items():
        encoder = load_checkpoint(path).encoder
        for pool, expected in reference.items():
            features = extract_features(encoder, images, transform=transform, pool=pool, progress=False)
            assert torch.allclose(features, expected, atol=1e-5), (layout, pool)
    assert reference["cls"].std() > 0.1  # real, varied features
    result = run_probe(
        paths["hf"], protocol="knn", out_dir=tmp_path / "hf_probe", progress=False, train_limit=300, test_limit=100
    )
    assert result["model"] == "vit_tiny" and result["top1"] > 0.3


def test_cli_probe_on_a_folder_and_its_errors(checkpoint, tmp_path, capsys, write_split_folder) -> None:
    data = write_split_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["probe", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*argv, "--protocol", "linear", "--epochs", "30", "--optimizer", "sgd"]) == 0
    printed = capsys.readouterr().out
    assert "linear probe of" in printed and "  cls " in printed and "  avg " in printed
    results = json.loads((out / "linear" / "pretrained" / "results.json").read_text())
    assert results["classes"] == ["bag", "trouser"] and results["data"] == str(data.resolve())
    assert results["normalization"] == {"mean": [0.5], "std": [0.5]}  # gray folder default
    assert results["top5"] is None  # two classes
    assert results["top1"] > 0.9  # bags and trousers are easy to tell apart
    assert results["train_images"] + results["test_images"] == sum(1 for _ in data.rglob("*.png"))

    mismatched = write_split_folder(tmp_path / "mismatched", test_classes=("bag", "sneaker"))
    assert main([*argv[:3], "--data", str(mismatched), "--protocol", "knn", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "mimkit probe: error:" in err and "['bag', 'sneaker']" in err and "['bag', 'trouser']" in err
    assert not list((tmp_path / "bad").rglob("results.json"))

    flat = data / "train"  # class subfolders but no train/ and test/ inside
    assert main([*argv[:3], "--data", str(flat), "--protocol", "knn", "--out", str(tmp_path / "bad")]) == 2
    assert f"{flat} has no train/ subfolder" in capsys.readouterr().err
    assert main([*argv[:3], "--data", str(tmp_path / "nowhere"), "--protocol", "knn"]) == 2
    assert "neither 'fashion_mnist' nor an existing folder" in capsys.readouterr().err


def test_normalization_comes_from_the_checkpoints_run_config(tmp_path, tiny_args) -> None:
    overrides = [f"model.{key}={value}" for key, value in tiny_args.items()] + [
        "data.dataset=folder",
        "data.root=/none",
    ]
    config = load_config(None, [*overrides, "model.depth=1"])
    model = build_model(config)
    model.run_config = config
    path = save_checkpoint_as(model, tmp_path / "run.pt", "mimkit")
    result = run_probe(path, protocol="knn", out_dir=tmp_path / "out", progress=False, train_limit=200, test_limit=50)
    # Pretrained on a gray folder (mean 0.5, std 0.5), probed on Fashion-MNIST: the encoder's own statistics.
    assert result["normalization"] == {"mean": [0.5], "std": [0.5]}
    assert result["top1"] > 0.3


@pytest.mark.slow
def test_torchrun_probe_splits_feature_extraction_and_matches_one_process(checkpoint, tmp_path) -> None:
    import os
    import subprocess
    import sys

    argv = ["probe", "--checkpoint", str(checkpoint), "--protocol", "knn", "--no-progress"]
    argv += ["--train-limit", "301", "--test-limit", "101"]  # odd sizes: the ranks' shares differ by one
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mimkit"]
    done = subprocess.run(
        [*command, *argv, "--out", str(tmp_path / "two")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("knn probe of") == 1  # rank 0 alone reports
    caches = [sorted((tmp_path / run / "cache").glob("*.pt")) for run in ("one", "two")]
    assert [path.name for path in caches[0]] == [path.name for path in caches[1]] and len(caches[0]) == 2
    for mine, theirs in zip(*caches, strict=True):  # features gathered from both ranks, in order
        a, b = (torch.load(path, weights_only=True) for path in (mine, theirs))
        assert a["features"].shape == b["features"].shape and torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["features"], a["features"], atol=1e-5, rtol=1e-5)
    one, two = (
        json.loads((tmp_path / run / "knn" / "pretrained" / "results.json").read_text()) for run in ("one", "two")
    )
    assert one["top1"] == two["top1"] and one["test_images"] == two["test_images"] == 101


HOLD = """
import time
from mimkit.engine.run_guard import RunLock
RunLock({folder!r}).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _probe_files(run_dir) -> tuple[dict, list[dict]]:
    """results.json without the paths of its pictures and the count of encoder passes, and metrics.jsonl."""
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("features_extracted")
    for entry in results["results"].values():
        entry.pop("confusion_png")
    return results, read_metrics(run_dir / "metrics.jsonl")


def test_cli_linear_probe_stopped_in_its_second_pool_resumes_to_the_uninterrupted_results(
    checkpoint, tmp_path, capsys, monkeypatch
) -> None:
    import signal
    import subprocess
    import sys

    from mimkit.engine.run_guard import LOCK_NAME, STOPPED_EXIT_STATUS
    from mimkit.eval.linear import LinearProbe

    argv = ["probe", "--checkpoint", str(checkpoint), "--protocol", "linear", "--no-progress"]
    argv += ["--train-limit", "1000", "--test-limit", "300", "--epochs", "4", "--blr", "1"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "parted"
    run_dir = out / "linear" / "pretrained"
    real_forward = LinearProbe.forward
    calls = {"n": 0}

    def signalled(self, features):  # 3 steps an epoch, 12 a pool: step 17 is the second pool's 5th
        if self.training:
            calls["n"] += 1
            if calls["n"] == 17:
                signal.raise_signal(signal.SIGTERM)
        return real_forward(self, features)

    monkeypatch.setattr(LinearProbe, "forward", signalled)
    assert main([*argv, "--out", str(out)]) == STOPPED_EXIT_STATUS
    monkeypatch.undo()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mimkit probe: stopped by SIGTERM after step 5; saved {run_dir / 'last.pt'}, continue with --resume"
    )
    assert not (run_dir / LOCK_NAME).exists() and not (run_dir / "results.json").exists()
    assert (run_dir / "confusion_cls.png").is_file()  # the first pool had finished

    assert main([*argv, "--out", str(out), "--resume", "--epochs", "5"]) == 2
    assert "epochs: 4 there, 5 now" in capsys.readouterr().err
    assert main([*argv[:4], "knn", "--out", str(out), "--resume"]) == 2
    assert "a kNN probe trains nothing to continue" in capsys.readouterr().err
    holder = subprocess.Popen(  # another program writes to the run folder
        [sys.executable, "-c", HOLD.format(folder=str(run_dir))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main([*argv, "--out", str(out), "--resume"]) == 2
        assert f"--out {run_dir} is in use by another run (pid {holder.pid} on" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()

    calls["n"] = 0
    monkeypatch.setattr(LinearProbe, "forward", signalled)  # counts the steps the resume trains
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert calls["n"] == 12 - 5 and "all features from the cache" in capsys.readouterr().out
    assert not (run_dir / "last.pt").exists()  # finished: nothing left to resume
    resumed, resumed_records = _probe_files(run_dir)
    whole, records = _probe_files(tmp_path / "whole" / "linear" / "pretrained")
    assert resumed == whole and resumed_records == records
    assert len(whole["results"]["avg"]["losses"]) == 4 and whole["top1"] > 0.3
