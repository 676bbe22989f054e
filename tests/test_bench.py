"""``mimkit bench`` in its smoke mode: every measurement runs and reports finite, positive numbers, and the
HuggingFace peer really is the same architecture as mimkit's model."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mimkit.bench import CONFIGS, Timing, build_hf, build_mimkit, count_parameters, paired_ratio
from mimkit.cli import main


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """``mimkit bench --smoke``, run once: its results.json, what it printed and its folder."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["bench", "--smoke", "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return json.loads((out / "results.json").read_text()), printed.getvalue(), out


@pytest.mark.slow
def test_smoke_compares_with_hf_on_the_same_architecture(smoke: tuple[dict[str, Any], str, Path]) -> None:
    results, printed, _ = smoke
    assert positive(results["machine"]["sgemm_peak_gflops"])
    row = results["compare"]["smoke"]
    assert row["mimkit_params"] == row["hf_params"] == count_parameters(build_mimkit(CONFIGS["smoke"]))
    for side in ("mimkit", "hf"):
        for key in ("img_per_s", "step_ms", "gflop_per_s", "fraction_of_peak"):
            assert positive(row[side][key]), (side, key, row[side][key])
    assert positive(row["ratio"])
    assert f"params mimkit {row['mimkit_params']:,} hf {row['hf_params']:,}" in printed
    assert "mimkit/hf" in printed
    assert f"mimkit/hf {row['ratio']:.3f}" in printed


@pytest.mark.slow
def test_smoke_reports_every_measurement(smoke: tuple[dict[str, Any], str, Path]) -> None:
    results, printed, out = smoke
    check = results["loss_check"]
    assert len(check["mimkit_losses"]) == len(check["hf_losses"]) == 2
    assert check["max_rel_diff"] < 1e-4  # same weights, same noise: the two losses are one loss
    assert positive(results["masking"]["speedup"])
    labels = {row["label"] for row in results["levers"]["rows"]}
    assert labels == {"default", "math attention", "fused AdamW", "grad checkpointing"}
    assert all(positive(row["img_per_s"]) and positive(row["speedup_vs_default"]) for row in results["levers"]["rows"])
    variants = {row["label"]: row for row in results["variants"]["rows"]}
    assert {"mae", "convmae_tiny", "self-guided (informed)"} <= set(variants)
    assert all(positive(row["relative_step_time"]) for row in variants.values())
    for row in results["memory"]:
        assert positive(row["peak_rss_mib"]) and row["peak_rss_mib"] >= row["rss_before_step_mib"]
    assert {row["grad_checkpointing"] for row in results["memory"]} == {False, True}
    pipe = results["pipeline"]
    assert positive(pipe["end_to_end_img_per_s"]) and positive(pipe["model_only_img_per_s"])
    assert positive(pipe["fraction"])
    assert all(positive(row["mimkit_img_per_s"]) and positive(row["hf_img_per_s"]) for row in results["sweep"]["rows"])
    assert (out / "throughput.png").stat().st_size > 1000
    assert "pipeline: end-to-end" in printed and "encoder speed-up from masking" in printed


def test_hf_peer_copies_weights_and_gives_the_same_loss() -> None:
    model = build_mimkit(CONFIGS["smoke"])
    hf = build_hf(model, copy_weights=True)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        model(images, noise).loss, hf(pixel_values=images, noise=noise).loss, rtol=1e-5, atol=1e-6
    )


def test_paired_ratio_is_the_median_of_per_repeat_ratios() -> None:
    slow, fast = Timing("slow", [2.0, 4.0, 9.0], 1), Timing("fast", [1.0, 1.0, 3.0], 1)
    assert paired_ratio(slow, fast) == 3.0
    assert fast.images_per_second == 1.0


def test_cli_bench_refuses_an_unknown_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--config", "huge"])
    assert "invalid choice" in capsys.readouterr().err


def test_bf16_comparison_runs_both_models_under_autocast_against_the_bf16_peak() -> None:
    from mimkit.bench import compare_with_hf, sgemm_peak

    peak = sgemm_peak(256, device="cpu", dtype=torch.bfloat16)
    row = compare_with_hf(CONFIGS["smoke"], steps=1, repeats=2, peak=peak, precision="bf16")
    assert positive(row["ratio"]) and positive(row["mimkit"]["img_per_s"]) and positive(row["hf"]["img_per_s"])
    with pytest.raises(ValueError, match="precision must be one of"):
        compare_with_hf(CONFIGS["smoke"], steps=1, repeats=1, peak=peak, precision="fp16")


def test_bench_off_the_cpu_is_refused_before_timing_unless_it_can_run(capsys) -> None:
    from mimkit.bench import BenchOptions

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            BenchOptions(device="cuda").check()
        assert main(["bench", "--device", "cuda", "--compare-only"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    else:
        with pytest.raises(ValueError, match="add --compare-only"):
            BenchOptions(device="cuda").check()
    options = BenchOptions()
    assert options.check() is options  # the CPU default runs everything
