"""Distributed pretraining through the real ``torchrun`` launcher on CPU (gloo), against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mimkit.engine.pretrain import Pretrainer
from mimkit.files import load_checkpoint_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not built")


def torchrun(nproc: int, args: list[str], *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc [extra] -m mimkit pretrain [args]``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra]
    command += ["-m", "mimkit", "pretrain", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]


@pytest.mark.slow
def test_two_ranks_with_half_batches_train_the_same_weights_as_one_process(tmp_path: Path, small_config) -> None:
    # One process, batch 16 (4 steps per epoch on 64 images) ...
    single = Pretrainer(small_config(tmp_path / "one", "train.max_steps=3"))
    single.fit()
    # ... and two gloo ranks with batch 8 each: same global batches, augmentation and masks, lr scaled
    # by the world size, gradients averaged by DDP.
    recipe = tmp_path / "two.yaml"
    config = small_config(tmp_path / "two", "train.max_steps=3", "train.batch_size=8")
    recipe.write_text(yaml.safe_dump(config.to_dict()))
    done = torchrun(2, ["--config", str(recipe)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stdout and done.stdout.count("run directory") == 1  # rank 0 alone reports

    state = load_checkpoint_file(tmp_path / "two" / "last.pt")
    assert state["step"] == 3
    # Tolerance: DDP averages two half-batch gradients where one process takes the mean over the batch;
    # the summation order differs by float rounding (~1e-7 relative), amplified a little by AdamW.
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(state["model"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    # the logged loss is the mean over both ranks, and one record per logging step (rank 0 writes)
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fsdp_shards_train_like_one_process_and_its_checkpoint_loads_anywhere(tmp_path: Path, small_config) -> None:
    single = Pretrainer(small_config(tmp_path / "one", "train.epochs=2"))  # 8 steps of batch 16
    single.fit()
    run_dir = tmp_path / "fsdp"
    recipe = tmp_path / "fsdp.yaml"
    stopped = small_config(run_dir, "train.epochs=2", "train.batch_size=8", "train.parallel=fsdp", "train.max_steps=3")
    recipe.write_text(yaml.safe_dump(stopped.to_dict()))
    done = torchrun(2, ["--config", str(recipe)])
    assert done.returncode == 0, done.stderr[-3000:]

    pointer = torch.load(run_dir / "last.pt", weights_only=True)
    assert "model" not in pointer and pointer["sharded"]["world_size"] == 2  # last.pt only names the shards
    shards = sorted((run_dir / pointer["sharded"]["dir"]).iterdir())
    assert [path.name for path in shards] == ["rank_00000.pt", "rank_00001.pt"]
    assert len(list((run_dir / "shards").iterdir())) == 1  # older steps' shards were removed
    part = torch.load(shards[1], weights_only=True)["model"]["encoder.blocks.0.mlp.fc1.weight"]
    whole = single.model.state_dict()["encoder.blocks.0.mlp.fc1.weight"]
    assert part.shape[0] == whole.shape[0] // 2  # each rank holds half of each weight

    # Resume the sharded run on 2 ranks to the end; then its checkpoint, joined in this process, equals
    # the single-process run.
    resumed = small_config(run_dir, "train.epochs=2", "train.batch_size=8", "train.parallel=fsdp")
    recipe.write_text(yaml.safe_dump(resumed.to_dict()))
    done = torchrun(2, ["--config", str(recipe), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint_file(run_dir / "last.pt")
    assert state["step"] == 8 and "sharded" not in state
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(state["model"][key], value, atol=5e-5, rtol=1e-4, msg=key)
    # and a single process resumes a sharded checkpoint (here: one more epoch)
    more = Pretrainer(small_config(run_dir, "train.epochs=3", "train.batch_size=16"), resume=True)
    assert more.step == 8
    more.fit()
    assert more.step == 12 and load_checkpoint_file(run_dir / "last.pt")["step"] == 12
