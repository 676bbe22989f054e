"""BEiT v2's VQ-KD tokenizer: the quantizer's rules, training on real Fashion-MNIST with the real
EfficientNet-Lite0 teacher, save/load, and ``mimkit tokenizer-train`` end to end."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.cli import main
from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
from mimkit.files import CheckpointError
from mimkit.layers import VectorQuantizer
from mimkit.targets import (
    CodebookCollapseWarning,
    Teacher,
    VQKDTokenizer,
    build_teacher,
    check_codebook,
    codebook_stats,
    load_tokenizer,
)
from mimkit.targets.vqkd import save_tokenizer

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "vqkd_fmnist.yaml"
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
NUM_IMAGES = 256
TINY = dict(
    img_size=32,
    patch_size=4,
    in_chans=1,
    embed_dim=64,
    depth=2,
    num_heads=2,
    num_codes=128,
    code_dim=16,
    decay=0.9,
    dead_code_threshold=1.0,
    decoder_embed_dim=64,
    decoder_depth=1,
    decoder_num_heads=2,
    mean=FMNIST_MEAN,
    std=FMNIST_STD,
)
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


@pytest.fixture(scope="module")
def images() -> Tensor:
    """256 Fashion-MNIST test images as a 32x32 student sees them: (256, 1, 32, 32), normalized."""
    raw, _ = load_fashion_mnist(split="test")
    pixels = resize_uint8(raw[:NUM_IMAGES], 32).float() / 255
    return (pixels - FMNIST_MEAN[0]) / FMNIST_STD[0]


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    """The real ImageNet EfficientNet-Lite0 at 64x64 input (stage 4: a 4x4 map resampled to 8x8, 112-d)."""
    return build_teacher("efficientnet_lite0", student_mean=FMNIST_MEAN, student_std=FMNIST_STD, input_size=64)


@pytest.fixture(scope="module")
def targets(images: Tensor, teacher: Teacher) -> Tensor:
    """The teacher's features of ``images`` on the 8x8 grid, computed once: (256, 64, 112)."""
    return torch.cat([teacher(images[start : start + 128], (8, 8)) for start in range(0, NUM_IMAGES, 128)])


def tokenizer_with(teacher: Teacher, seed: int = 0, **overrides) -> VQKDTokenizer:
    torch.manual_seed(seed)
    return VQKDTokenizer(**{**TINY, **overrides}, teacher=teacher)


def unit(rows: int, dim: int, seed: int) -> Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_nearest_code_is_the_brute_force_argmax_of_cosine() -> None:
    quantizer = VectorQuantizer(64, 8, kmeans_init=False).eval()
    z = unit(500, 8, seed=1).view(5, 100, 8)
    out = quantizer(z)
    cosine = F.cosine_similarity(z[..., None, :], quantizer.codebook, dim=-1)  # (5, 100, 64)
    expected = cosine.argmax(dim=-1)
    assert out.codes.shape == (5, 100) and out.codes.dtype == torch.int64
    assert torch.equal(out.codes, expected)
    torch.testing.assert_close(out.quantized, quantizer.codebook[expected])
    # the ranking is by cosine: scaling an input does not change its code
    assert torch.equal(quantizer.nearest(3.0 * z), expected)


def test_straight_through_gradient_and_commitment_loss() -> None:
    quantizer = VectorQuantizer(16, 4, beta=1.0, kmeans_init=False).eval()
    z = unit(10, 4, seed=2).requires_grad_()
    out = quantizer(z)
    out.quantized.retain_grad()
    upstream = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    (out.quantized * upstream).sum().backward()
    assert out.quantized.grad is not None and z.grad is not None
    torch.testing.assert_close(z.grad, out.quantized.grad, rtol=0, atol=0)
    torch.testing.assert_close(z.grad, upstream, rtol=0, atol=0)
    # the commitment loss pulls z towards its (fixed) code: d/dz beta * mean((z - q)^2) = 2 beta (z - q) / numel
    z.grad = None
    quantizer(z).loss.backward()
    chosen = quantizer.codebook[quantizer.nearest(z.detach())]
    torch.testing.assert_close(z.grad, 2 * (z.detach() - chosen) / z.numel())


def test_ema_update_matches_a_hand_computed_step_and_only_in_training() -> None:
    decay, eps, num_codes = 0.9, 1e-5, 4
    quantizer = VectorQuantizer(num_codes, 3, decay=decay, eps=eps, kmeans_init=False)
    codebook = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, -1.0, -1.0]]), dim=-1)
    quantizer.codebook.copy_(codebook)
    quantizer.embed_sum.copy_(codebook)
    z = F.normalize(
        torch.tensor([[1.0, 0.2, 0], [1.0, -0.1, 0.3], [0.1, 1.0, 0], [0.2, 0.1, 1.0], [0, 0.3, 1.0]]), dim=-1
    )
    codes = torch.tensor([0, 0, 1, 2, 2])  # code 3 gets nothing
    sums = torch.stack([z[codes == k].sum(0) if (codes == k).any() else torch.zeros(3) for k in range(num_codes)])
    counts = torch.tensor([2.0, 1.0, 2.0, 0.0])
    sizes = (1 - decay) * counts  # the sizes start at zero
    embed_sum = decay * codebook + (1 - decay) * sums
    total = sizes.sum()
    smoothed = (sizes + eps) / (total + num_codes * eps) * total
    expected = F.normalize(embed_sum / smoothed[:, None], dim=-1)

    quantizer.eval()
    quantizer(z)
    torch.testing.assert_close(quantizer.codebook, codebook, rtol=0, atol=0)  # eval mode: no update
    quantizer.train()
    out = quantizer(z)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.quantized, codebook[codes])  # the codes before this step's update
    torch.testing.assert_close(quantizer.cluster_size, sizes)
    torch.testing.assert_close(quantizer.embed_sum, embed_sum)
    torch.testing.assert_close(quantizer.codebook, expected)
    torch.testing.assert_close(quantizer.codebook[3], codebook[3])  # an unused code keeps its direction
    torch.testing.assert_close(quantizer.codebook.norm(dim=-1), torch.ones(num_codes))
    before = quantizer.codebook.clone()
    with torch.no_grad():
        quantizer.eval()(unit(50, 3, seed=4))
    assert torch.equal(quantizer.codebook, before)


def test_codes_stay_unit_norm_and_dead_codes_restart_at_inputs() -> None:
    quantizer = VectorQuantizer(8, 4, decay=0.9, kmeans_init=False, dead_code_threshold=0.5).train()
    target = quantizer.codebook[0].clone()
    z = F.normalize(target + 0.05 * torch.randn(20, 4, generator=torch.Generator().manual_seed(5)), dim=-1)
    assert (quantizer.nearest(z) == 0).all()
    quantizer(z)  # code 0: EMA size 0.1 * 20 = 2 >= 0.5; codes 1-7: 0 < 0.5, restarted at inputs
    torch.testing.assert_close(quantizer.codebook.norm(dim=-1), torch.ones(8))
    restarted = quantizer.codebook[1:]  # (7, 4)
    distance = torch.cdist(restarted, z).min(dim=1).values  # each restarted code is one of the inputs
    torch.testing.assert_close(distance, torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(quantizer.cluster_size[1:], torch.full((7,), 0.5))
    assert quantizer.cluster_size[0] == pytest.approx(2.0)


def test_usage_and_perplexity_of_hand_made_histograms() -> None:
    uniform = torch.zeros(100)
    uniform[:10] = 7
    stats = codebook_stats(uniform)
    assert (stats.used_codes, stats.num_tokens, stats.usage) == (10, 70, 0.1)
    assert stats.perplexity == pytest.approx(10.0)
    assert codebook_stats(torch.tensor([0, 0, 5, 0])).perplexity == pytest.approx(1.0)
    probs = torch.tensor([0.5, 0.25, 0.25])
    stats = codebook_stats(torch.tensor([2, 1, 1, 0]))
    assert stats.perplexity == pytest.approx(math.exp(-(probs * probs.log()).sum().item()))  # 2 ** 1.5
    assert stats.perplexity == pytest.approx(2**1.5) and stats.usage == 0.75
    empty = codebook_stats(torch.zeros(5))
    assert (empty.used_codes, empty.perplexity) == (0, 0.0)


def test_collapse_warning_fires_on_a_collapsed_codebook_only() -> None:
    quantizer = VectorQuantizer(256, 8).train()  # k-means initialization on the first batch
    same = unit(1, 8, seed=6).expand(4096, 8)  # every input identical: one code
    codes = quantizer(same).codes
    with pytest.warns(CodebookCollapseWarning, match="1 of 256 codes"):
        stats = check_codebook(torch.bincount(codes, minlength=256), where="step 1")
    assert stats.collapsed() and stats.used_codes == 1
    healthy = VectorQuantizer(256, 8).train()
    codes = healthy(unit(4096, 8, seed=7)).codes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = check_codebook(torch.bincount(codes, minlength=256))
        # a batch smaller than the codebook is judged on the codes it could fill: 40 tokens, 40 codes
        check_codebook(torch.bincount(torch.arange(40), minlength=256))
    assert stats.usage > 0.5 and not stats.collapsed()


def test_every_trainable_parameter_gets_a_gradient_and_teacher_is_frozen(images, teacher, targets) -> None:
    tokenizer = tokenizer_with(teacher).train()
    out = tokenizer(images[:16], targets[:16])
    assert out.codes.shape == (16, 64) and out.decoded.shape == (16, 64, 112)
    out.loss.backward()
    for name, param in tokenizer.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert name.startswith("teacher.") or name.endswith("pos_embed"), name
    assert not any(param.requires_grad for param in tokenizer.teacher.parameters())  # type: ignore[union-attr]
    # the teacher computes the same targets on the fly
    torch.testing.assert_close(tokenizer(images[:16]).rec_loss, out.rec_loss, atol=1e-5, rtol=0)


def test_tokenizer_learns_the_teacher_features(images, teacher, targets) -> None:
    tokenizer = tokenizer_with(teacher)
    optimizer = torch.optim.AdamW([p for p in tokenizer.parameters() if p.requires_grad], lr=1e-3)

    def eval_loss() -> float:
        tokenizer.eval()
        with torch.no_grad():
            return float(tokenizer(images, targets).rec_loss)

    generator = torch.Generator().manual_seed(0)
    tokenizer.train()
    tokenizer(images[:64], targets[:64])  # k-means initialization of the codebook
    before = eval_loss()
    for step in range(40):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 5)
        rows = torch.randperm(NUM_IMAGES, generator=generator)[:32]
        tokenizer.train()
        loss = tokenizer(images[rows], targets[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    usage = codebook_stats(torch.bincount(tokenizer.tokenize(images).flatten(), minlength=tokenizer.num_codes))
    # measured: 1 - cosine 0.969 -> 0.403 in 40 steps, 112 of 128 codes used (perplexity 54)
    assert before > 0.8 and after < 0.55, (before, after)
    assert usage.usage > 0.3, usage


@pytest.mark.slow
def test_a_codebook_of_8192_codes_trains_without_collapse(teacher) -> None:
    """BEiT v2's codebook size (8192 codes of 32 dimensions) on 512 real images: after 40 steps of 64 more than half of
    the codes are in use on those images' 32,768 patches (measured: 4,783 codes used, perplexity 3,506)."""
    raw, _ = load_fashion_mnist(split="test")
    images = (resize_uint8(raw[:512], 32).float() / 255 - FMNIST_MEAN[0]) / FMNIST_STD[0]  # (512, 1, 32, 32)
    features = torch.cat([teacher(images[start : start + 128], (8, 8)) for start in range(0, 512, 128)])
    tokenizer = tokenizer_with(teacher, num_codes=8192, code_dim=32)
    optimizer = torch.optim.AdamW([p for p in tokenizer.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    tokenizer.train()
    for _ in range(40):
        rows = torch.randperm(512, generator=generator)[:64]
        loss = tokenizer(images[rows], features[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    codes = torch.cat([tokenizer.tokenize(images[start : start + 128]) for start in range(0, 512, 128)])
    stats = codebook_stats(torch.bincount(codes.flatten(), minlength=8192))
    assert stats.used_codes > 4096 and not stats.collapsed(), stats


def test_tokenize_shape_dtype_range_and_determinism(images, teacher, targets) -> None:
    tokenizer = tokenizer_with(teacher).train()
    tokenizer(images[:64], targets[:64])  # one training step of the codebook (k-means init + EMA)
    codebook = tokenizer.quantizer.codebook.clone()
    codes = tokenizer.tokenize(images[:8])
    assert tokenizer.training  # the mode is restored
    assert codes.shape == (8, tokenizer.num_patches) == (8, 64) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < tokenizer.num_codes == 128
    assert torch.equal(tokenizer.tokenize(images[:8]), codes)
    assert torch.equal(tokenizer.quantizer.codebook, codebook)  # tokenizing never updates the codebook
    tokenizer.eval()
    with torch.no_grad():
        assert torch.equal(tokenizer(images[:8], targets[:8]).codes, codes)
    assert tokenizer.grid == (8, 8)


def test_save_load_round_trip_without_teacher_weights(images, teacher, targets, tmp_path: Path) -> None:
    tokenizer = tokenizer_with(teacher).train()
    tokenizer(images[:64], targets[:64])
    tokenizer.eval()
    path = save_tokenizer(tmp_path / "tokenizer.pt", tokenizer, teacher="efficientnet_lite0", step=1)
    state = torch.load(path, weights_only=True)
    assert not any("teacher" in key for key in state["model"])
    assert state["teacher"] == {"spec": "efficientnet_lite0", "options": {}} and state["step"] == 1
    assert state["normalization"] == {"mean": list(FMNIST_MEAN), "std": list(FMNIST_STD)}
    assert len(state["model"]) == len(tokenizer.state_dict())
    assert {key for key in tokenizer.state_dict() if key.startswith("quantizer.")} >= {"quantizer.codebook"}
    loaded = load_tokenizer(path)
    assert not loaded.training and loaded.teacher is None and loaded.num_codes == 128
    assert loaded.config["mean"] == list(FMNIST_MEAN) and loaded.config["teacher_dim"] == 112
    assert torch.equal(loaded.tokenize(images[:32]), tokenizer.tokenize(images[:32]))
    assert torch.equal(load_tokenizer(tmp_path).quantizer.codebook, tokenizer.quantizer.codebook)  # the directory
    with_teacher = load_tokenizer(path, with_teacher=True)
    assert with_teacher.teacher is not None and with_teacher.teacher.dim == 112

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "step": 3}, foreign)
    for bad, message in (
        (truncated, "could not be read"),
        (foreign, "not a mimkit VQ-KD"),
        (tmp_path / "no.pt", "does not exist"),
    ):
        with pytest.raises(CheckpointError, match=message):
            load_tokenizer(bad)


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
