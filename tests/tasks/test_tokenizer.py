"""``mimkit tokenizer-train`` asked to stop: it ends after the step, says nothing was saved, and frees its folder."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from mimkit.cli import main
from mimkit.engine.run_guard import LOCK_NAME, STOPPED_EXIT_STATUS
from mimkit.targets.vqkd import VQKDTokenizer

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
        "mimkit tokenizer-train: stopped by SIGTERM after step 2; this command does not resume, so nothing was "
        "saved: run it again"
    )
    assert calls["n"] == 2 and not (out_dir / "tokenizer.pt").exists() and not (out_dir / LOCK_NAME).exists()
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
