"""``mimkit tokenizer-train`` end to end on real Fashion-MNIST with the real teacher, and asked to stop: it ends
after the step, saves its state, frees its folder, and ``--resume`` ends where a run never stopped ends."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data import load_fashion_mnist
from mimkit.engine.run_guard import LOCK_NAME, STOPPED_EXIT_STATUS
from mimkit.files import load_checkpoint_file
from mimkit.targets.vqkd import CodebookCollapseWarning, VQKDTokenizer, load_tokenizer

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "vqkd_fmnist.yaml"
TINY_CLI = [
    "train.max_steps=4",
    "data.limit=64",
    "train.batch_size=16",
    "train.eval_images=64",
    "teacher.input_size=64",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "model.num_codes=64",
    "model.decoder_embed_dim=32",
    "model.decoder_depth=1",
    "model.decoder_num_heads=2",
    "log.every_steps=2",
]


HOLD = """
import time
from mimkit.engine.run_guard import RunLock
RunLock({out_dir!r}).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_sigterm_stops_after_the_step_and_a_held_folder_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    out_dir = tmp_path / "run"
    args = ["tokenizer-train", "--no-progress", "--config", str(RECIPE), f"train.output_dir={out_dir}", *TINY_CLI]
    real_forward = VQKDTokenizer.forward
    calls = {"n": 0}

    def signalled_in_step_two(self, *inputs, **options):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_forward(self, *inputs, **options)

    monkeypatch.setattr(VQKDTokenizer, "forward", signalled_in_step_two)
    assert main(args) == STOPPED_EXIT_STATUS
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mimkit tokenizer-train: stopped by SIGTERM after step 2; saved {out_dir / 'last.pt'}, continue with --resume"
    )
    assert calls["n"] == 2 and not (out_dir / "tokenizer.pt").exists() and not (out_dir / LOCK_NAME).exists()
    assert load_checkpoint_file(out_dir / "last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()

    holder = subprocess.Popen(  # another program writes to the folder
        [sys.executable, "-c", HOLD.format(out_dir=str(out_dir))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"train.output_dir {out_dir} is in use by another run (pid {holder.pid} on" in err
    finally:
        holder.kill()
        holder.wait()


def test_tokenizer_train_command_end_to_end(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "run"
    args = ["tokenizer-train", "--no-progress", "--config", str(RECIPE), f"train.output_dir={out_dir}", *TINY_CLI]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CodebookCollapseWarning)  # 4 steps may well leave a collapsed codebook
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "codebook usage" in printed and "perplexity" in printed and str(out_dir / "tokenizer.pt") in printed
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["num_codes"] == 64 and summary["usage_tokens"] == 64 * 64
    assert 0 < summary["final_loss"] < 2 and 0 < summary["codebook_usage"] <= 1 and summary["perplexity"] >= 1
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    assert all({"train/loss", "codebook/usage", "codebook/perplexity"} <= set(record) for record in records)
    assert (out_dir / "config.yaml").is_file()
    tokenizer = load_tokenizer(out_dir / "tokenizer.pt")
    assert tokenizer.config["embed_dim"] == 32 and tokenizer.num_codes == 64

    assert main(args) == 2  # a finished run is not overwritten without train.overwrite=true
    assert "already exists" in capsys.readouterr().err
    assert main([*args[:4], f"train.output_dir={tmp_path / 'other'}", "model.bogus=1"]) == 2
    assert "model.bogus" in capsys.readouterr().err
    assert main([*args, "data.dataset=folder", f"data.root={tmp_path / 'missing'}", "train.overwrite=true"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _tokenizer_files(out_dir: Path) -> tuple[dict, dict, list[dict]]:
    """The weights and buffers of ``tokenizer.pt``, the summary without its timings, the metrics records."""
    weights = load_checkpoint_file(out_dir / "tokenizer.pt")["model"]
    summary = json.loads((out_dir / "summary.json").read_text())
    for key in ("seconds", "images_per_second", "tokenizer"):
        summary.pop(key)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, summary, records


@pytest.mark.parametrize("source", ["fashion_mnist", "folder"])
def test_resume_after_sigterm_ends_bit_identical_to_a_run_never_stopped(
    source: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    # 2 epochs of 4 steps, logged every 2: the stop after step 3 falls mid-epoch and mid-window; the k-means
    # start (step 1) and the dead-code restarts (9 to 30 codes a step here) draw from the global RNG
    settings = [*TINY_CLI, "train.max_steps=6", "train.epochs=2", "model.dead_code_threshold=12.0"]
    if source == "folder":  # crops streamed by a DataLoader, which draws a seed from the global RNG per epoch
        photos = tmp_path / "photos"
        photos.mkdir()
        for index, pixels in enumerate(load_fashion_mnist(split="test")[0][:64, 0]):
            Image.fromarray(pixels.numpy()).resize((40, 40)).save(photos / f"{index:02d}.png")
        settings += ["data.dataset=folder", f"data.root={photos}", "data.num_workers=0", "data.in_memory=false"]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CodebookCollapseWarning)
        base = ["tokenizer-train", "--no-progress", "--config", str(RECIPE)]
        assert main([*base, f"train.output_dir={whole}", *settings]) == 0

        real_forward = VQKDTokenizer.forward
        calls = {"n": 0}

        def signalled_in_step_three(self, *inputs, **options):
            calls["n"] += 1
            if calls["n"] == 3:
                signal.raise_signal(signal.SIGTERM)
            return real_forward(self, *inputs, **options)

        monkeypatch.setattr(VQKDTokenizer, "forward", signalled_in_step_three)
        assert main([*base, f"train.output_dir={parted}", *settings]) == STOPPED_EXIT_STATUS
        monkeypatch.undo()
        assert "after step 3; saved" in capsys.readouterr().err and not (parted / "tokenizer.pt").exists()

        assert main([*base, "--resume", f"train.output_dir={parted}", *settings, "optim.lr=0.002"]) == 2
        assert "optim.lr: 0.001 there, 0.002 now" in capsys.readouterr().err  # another recipe is refused
        assert main([*base, "--resume", f"train.output_dir={parted}", *settings]) == 0
    assert not (parted / "last.pt").exists() and not (whole / "last.pt").exists()  # finished runs remove it

    weights, summary, records = _tokenizer_files(whole)
    resumed_weights, resumed_summary, resumed_records = _tokenizer_files(parted)
    assert weights.keys() == resumed_weights.keys() and "quantizer.cluster_size" in weights
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    assert summary == resumed_summary and summary["steps"] == 6 and math.isfinite(summary["final_loss"])
    assert [record["step"] for record in records] == [2, 4, 6] and resumed_records == records

    capsys.readouterr()
    assert main([*base, "--resume", f"train.output_dir={tmp_path / 'none'}", *settings]) == 2
    assert "--resume: no " in capsys.readouterr().err
