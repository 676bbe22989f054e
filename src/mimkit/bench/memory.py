"""Peak resident memory of training steps, measured in a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from mimkit.bench.contenders import build_hf, build_mimkit, hf_contender, make_images, mimkit_contender, step_flops


def _memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: build a model, then ``steps`` training steps; resident set sizes in MiB."""
    torch.set_num_threads(int(spec["threads"]))
    config = spec["config"]
    model = build_mimkit(config, grad_checkpointing=bool(spec["grad_checkpointing"]))
    images = make_images(config)
    if spec["kind"] == "hf":
        flops = step_flops(model, images.shape[0])
        contender = hf_contender("hf", build_hf(model), images, flops)
        del model
    else:
        contender = mimkit_contender("mimkit", model, images)
    before = _status_mib("VmHWM")
    for _ in range(int(spec["steps"])):
        contender.step()
    after = _status_mib("VmHWM")
    return {"peak_rss_mib": after, "rss_before_step_mib": before, "step_increase_mib": after - before}


def _status_mib(key: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (``VmHWM``: peak resident set) in MiB.
    Unlike ``getrusage``'s maximum, it starts afresh at ``exec``, so a child does not inherit its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{key} not found in /proc/self/status (peak memory is measured on Linux only)")


def peak_memory(
    config: dict[str, Any], *, kind: str = "mimkit", grad_checkpointing: bool = False, steps: int = 1, threads: int = 1
) -> dict[str, Any]:
    """Peak resident memory of training steps (model, gradients, AdamW state, activations), measured in a
    fresh Python process so that nothing else this process allocated counts.

    Returns:
        ``peak_rss_mib`` (the whole process, PyTorch's libraries included), ``rss_before_step_mib`` (after
        building the model and the batch) and their difference ``step_increase_mib``.
    """
    spec = dict(config=config, kind=kind, grad_checkpointing=grad_checkpointing, steps=steps, threads=threads)
    code = (
        "import json, sys; from mimkit.bench.memory import _memory_child; "
        "print(json.dumps(_memory_child(json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode:
        raise RuntimeError(f"the memory measurement failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"kind": kind, "grad_checkpointing": grad_checkpointing, "batch": config["batch"], **result}
