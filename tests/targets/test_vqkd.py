"""BEiT v2's VQ-KD tokenizer: codebook health, training on real Fashion-MNIST with the real EfficientNet-Lite0
teacher, and save/load."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

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
