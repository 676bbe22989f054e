"""Behaviour of the training engine on real Fashion-MNIST images with a small real model."""

import itertools
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from mimkit.build import create_model
from mimkit.data.fashion_mnist import load_fashion_mnist
from mimkit.data.transforms import EvalTransform
from mimkit.engine.divergence import TrainingDiverged
from mimkit.engine.pretrain import Pretrainer, TrainingInterrupted
from mimkit.engine.schedule import warmup_cosine
from mimkit.files import CheckpointError, load_checkpoint_file


def test_schedule_is_pure_warmup_then_cosine() -> None:
    lrs = [warmup_cosine(s, base_lr=1.0, total_steps=10, warmup_steps=2, min_lr=0.1) for s in range(11)]
    assert lrs[0] == 0.0 and lrs[1] == 0.5 and lrs[2] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert math.isclose(lrs[10], 0.1)


def test_resume_equals_uninterrupted(tmp_path: Path, small_config, weights) -> None:
    full = Pretrainer(small_config(tmp_path / "full", "train.epochs=2"))
    full.fit()
    # Same run stopped after 5 steps (mid-epoch: 4 steps per epoch), then resumed in a new process state.
    first = Pretrainer(small_config(tmp_path / "split", "train.epochs=2", "train.max_steps=5"))
    assert [first.lr_at(step) for step in range(8)] == [full.lr_at(step) for step in range(8)]  # schedule spans epochs
    first.fit()
    assert first.step == 5
    torch.manual_seed(1234)  # whatever the global RNG holds, resume must restore it
    resumed = Pretrainer(small_config(tmp_path / "split", "train.epochs=2"), resume=True)
    assert resumed.step == 5
    resumed.fit()
    assert resumed.step == full.step == 8
    a, b = weights(full), weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated records after the resume
    again = Pretrainer(small_config(tmp_path / "split", "train.epochs=2"), resume=True).fit()  # already done
    assert again.steps == 8 and again.final_loss == resumed.last_loss and math.isfinite(again.final_loss)


def test_gradient_accumulation_equals_large_batch(tmp_path: Path, small_config, weights) -> None:
    big = Pretrainer(small_config(tmp_path / "big", "train.max_steps=3"))
    acc = Pretrainer(small_config(tmp_path / "acc", "train.max_steps=3", "optim.accum_steps=4"))
    big.fit()
    acc.fit()
    for key, value in weights(big).items():
        torch.testing.assert_close(weights(acc)[key], value, atol=2e-5, rtol=1e-4, msg=key)


def test_tiny_model_overfits_eight_images() -> None:
    # Eight real images and one fixed mask: a small MAE must drive its loss on the hidden patches down 10x.
    images, _ = load_fashion_mnist(split="train")
    batch = EvalTransform(16)(images[:8])  # (8, 1, 16, 16)
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny",
        img_size=16,
        patch_size=4,
        in_chans=1,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder="micro",
        norm_pix=False,
    )
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = model(batch, noise).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_existing_run_needs_resume_and_resume_needs_checkpoint(tmp_path: Path, small_config) -> None:
    Pretrainer(small_config(tmp_path, "train.max_steps=1")).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Pretrainer(small_config(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        Pretrainer(small_config(tmp_path / "other"), resume=True)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, small_config) -> None:
    trainer = Pretrainer(small_config(tmp_path, "train.save_every_steps=2", "train.epochs=3"))
    original = trainer.train_step
    calls = {"n": 0}

    def poisoned(images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # corrupt the weights the way a diverging step would
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return original(images, labels)

    trainer.train_step = poisoned  # type: ignore[method-assign]
    good = tmp_path / "last.pt"
    with pytest.raises(TrainingDiverged, match="NaN/inf"):
        trainer.fit()
    state = load_checkpoint_file(good)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ctrl_c_finishes_the_step_saves_and_resume_completes_the_run(tmp_path: Path, small_config, weights) -> None:
    full = Pretrainer(small_config(tmp_path / "full", "train.epochs=2"))
    full.fit()
    trainer = Pretrainer(small_config(tmp_path / "stopped", "train.epochs=2"))
    original = trainer.train_step

    def interrupted(images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if trainer.step == 2:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during the third step
        return original(images, labels)

    trainer.train_step = interrupted  # type: ignore[method-assign]
    with pytest.raises(TrainingInterrupted, match="--resume"):
        trainer.fit()
    assert load_checkpoint_file(tmp_path / "stopped" / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    resumed = Pretrainer(small_config(tmp_path / "stopped", "train.epochs=2"), resume=True)
    resumed.fit()
    for key, value in weights(full).items():
        assert torch.equal(weights(resumed)[key], value), key


def test_numbered_snapshots_every_k_epochs(tmp_path: Path, small_config) -> None:
    Pretrainer(small_config(tmp_path, "train.epochs=4", "train.keep_every_epochs=2")).fit()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch_0002.pt", "epoch_0004.pt", "last.pt"]
    assert load_checkpoint_file(tmp_path / "epoch_0002.pt")["step"] == 8


def test_checkpoint_contents(tmp_path: Path, small_config) -> None:
    trainer = Pretrainer(small_config(tmp_path, "train.max_steps=2"))
    trainer.fit()
    state = load_checkpoint_file(tmp_path / "last.pt")
    assert {"model", "optimizer", "scheduler", "step", "epoch", "rng", "config"} <= set(state)
    assert state["config"]["model"]["embed_dim"] == 32
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.jsonl").is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_bf16_autocast_trains_close_to_fp32(tmp_path: Path, small_config, weights) -> None:
    fp32 = Pretrainer(small_config(tmp_path / "fp32", "train.max_steps=3"))
    bf16 = Pretrainer(small_config(tmp_path / "bf16", "train.max_steps=3", "train.precision=bf16"))
    fp32.fit()
    result = bf16.fit()
    assert math.isfinite(result.final_loss)
    a, b = weights(fp32), weights(bf16)
    assert any(not torch.equal(a[key], b[key]) for key in a)  # the forward really ran in bf16 ...
    for key in a:  # ... and stayed close: bf16 keeps 8 mantissa bits, weights and AdamW stay fp32
        torch.testing.assert_close(b[key], a[key], atol=2e-2, rtol=0, msg=key)
    assert b["encoder.blocks.0.attn.qkv.weight"].dtype == torch.float32


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path: Path, small_config, weights) -> None:
    eager = Pretrainer(small_config(tmp_path / "eager", "train.max_steps=2"))
    compiled = Pretrainer(small_config(tmp_path / "compiled", "train.max_steps=2", "train.compile=true"))
    assert compiled.forward_model is not compiled.model  # the compiled wrapper runs the steps
    eager.fit()
    compiled.fit()
    # Inductor fuses and reorders float operations: equal up to rounding (1e-5 after two AdamW steps).
    for key, value in weights(eager).items():
        torch.testing.assert_close(weights(compiled)[key], value, atol=1e-5, rtol=1e-4, msg=key)
    state = load_checkpoint_file(tmp_path / "compiled" / "last.pt")
    assert not any(key.startswith("_orig_mod") for key in state["model"])  # checkpoints keep the plain names


def test_a_run_resumes_with_activation_checkpointing_switched_on(tmp_path: Path, small_config, weights) -> None:
    full = Pretrainer(small_config(tmp_path / "full", "train.epochs=2"))
    full.fit()
    Pretrainer(small_config(tmp_path / "split", "train.epochs=2", "train.max_steps=5")).fit()
    resumed = Pretrainer(
        small_config(tmp_path / "split", "train.epochs=2", "model.grad_checkpointing=true"), resume=True
    )
    assert resumed.model.encoder.grad_checkpointing and resumed.model.decoder.grad_checkpointing
    resumed.fit()
    for key, value in weights(full).items():  # recomputed blocks give the same gradients
        torch.testing.assert_close(weights(resumed)[key], value, atol=1e-6, rtol=1e-5, msg=key)
    with pytest.raises(CheckpointError, match=r"model.depth: 2 in the checkpoint, 3 here"):
        Pretrainer(small_config(tmp_path / "split", "train.epochs=3", "model.depth=3"), resume=True)
