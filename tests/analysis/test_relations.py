"""Token relations, their summaries, relation maps and ``mimkit analyze`` on real Fashion-MNIST images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mimkit.analysis.exploitation import exploitation_rate
from mimkit.analysis.maps import crossing_step, plot_exploitation, save_relation_maps
from mimkit.analysis.relations import (
    attention_nmi,
    cluster_gap,
    feature_variance,
    relation_kl,
    relation_summary,
    similarity_variance,
    token_relations,
)
from mimkit.build import create_model
from mimkit.checkpoints import save_checkpoint_as
from mimkit.cli import main
from mimkit.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist, resize_uint8
from mimkit.data.folder import BadImageWarning
from mimkit.engine.logging import MetricsLogger, read_metrics
from mimkit.layers import patchify
from mimkit.masking import informed_mask
from mimkit.masking.ncut import ncut_bipartition
from mimkit.models import MaskedImageModel

MEAN, STD = (0.2860,), (0.3530,)
GRID = (8, 8)
NUM_PATCHES = 64
NUM_VISIBLE = 16  # 64 - round(0.75 * 64)


def small_model(seed: int = 0) -> MaskedImageModel:
    torch.manual_seed(seed)
    return create_model(
        "vit_tiny", img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro"
    )


@pytest.fixture(scope="module")
def fmnist() -> torch.Tensor:
    """The first 6 Fashion-MNIST test images, (6, 1, 28, 28) uint8."""
    if not DEFAULT_ROOT.is_dir():
        pytest.fail(f"Fashion-MNIST is missing at {DEFAULT_ROOT}: `apt-get install dataset-fashion-mnist`")
    return load_fashion_mnist(split="test")[0][:6]


@pytest.fixture(scope="module")
def images(fmnist) -> torch.Tensor:
    """(6, 1, 32, 32) normalized."""
    return (resize_uint8(fmnist, 32).float() / 255 - MEAN[0]) / STD[0]


@pytest.fixture(scope="module")
def model() -> MaskedImageModel:
    return small_model(0)


def test_ideal_setting_reports_encoder_layers_over_all_patches(model, images) -> None:
    model.train()
    relations = token_relations(model, images, setting="ideal")
    assert model.training  # the training flag is restored
    assert [layer.name for layer in relations] == ["encoder.0", "encoder.1"]
    reference = model.eval().encoder(images, return_attn=True, return_hidden=True)
    for block, layer in enumerate(relations):
        assert layer.features.shape == (6, NUM_PATCHES, 64)
        assert layer.attention.shape == layer.similarity.shape == (6, NUM_PATCHES, NUM_PATCHES)
        assert layer.cls_attention.shape == (6, NUM_PATCHES)
        assert torch.equal(layer.patch_index, torch.arange(NUM_PATCHES).expand(6, -1))
        assert not layer.hidden.any()
        assert torch.allclose(layer.features, reference.hidden_states[block][:, 1:])
        # Rows keep all their weight except what went to the class token.
        to_cls = reference.attentions[block].mean(dim=1)[:, 1:, 0]  # (B, N)
        assert torch.allclose(layer.attention.sum(-1) + to_cls, torch.ones(6, NUM_PATCHES), atol=1e-5)
        assert torch.allclose(torch.diagonal(layer.similarity, dim1=1, dim2=2), torch.ones(6, NUM_PATCHES), atol=1e-5)
        assert torch.allclose(layer.similarity, layer.similarity.transpose(1, 2), atol=1e-6)


def test_practical_setting_reports_masked_encoder_then_decoder_layers(model, images) -> None:
    spec = model.make_mask(6, generator=torch.Generator().manual_seed(3))
    relations = token_relations(model, images, setting="practical", mask=spec)
    assert [layer.name for layer in relations] == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    for layer in relations[:2]:
        assert layer.features.shape == (6, NUM_VISIBLE, 64)
        assert layer.attention.shape == (6, NUM_VISIBLE, NUM_VISIBLE)
        assert torch.equal(layer.patch_index, spec.ids_keep)
        assert not layer.hidden.any()
    for layer in relations[2:]:
        assert layer.features.shape == (6, NUM_PATCHES, 128)
        assert layer.attention.shape == layer.similarity.shape == (6, NUM_PATCHES, NUM_PATCHES)
        assert torch.equal(layer.hidden, spec.mask)
    # The last decoder layer's features are exactly what the pixel head reads.
    decoder = model.decoder
    pred = decoder.pred(decoder.norm(relations[-1].features))  # (B, L, p*p*C)
    assert torch.allclose(pred, model.eval()(images, mask=spec).pred, atol=1e-5)
    # A bool mask is the same as its MaskSpec; the same generator seed gives the same mask.
    from_bool = token_relations(model, images, mask=spec.mask)
    from_seed = token_relations(model, images, generator=torch.Generator().manual_seed(3))
    for layer, other, seeded in zip(relations, from_bool, from_seed, strict=True):
        assert torch.equal(layer.patch_index, seeded.patch_index)
        assert torch.allclose(layer.features, seeded.features, atol=1e-6)
        # from_mask keeps visible tokens in raster order: the same tokens, permuted (attention is equivariant).
        assert torch.equal(layer.patch_index.sort(1).values, other.patch_index)
        order = layer.patch_index.argsort(1)[..., None].expand_as(layer.features)  # (B, N, D)
        assert torch.allclose(layer.features.gather(1, order), other.features, atol=1e-5)


def test_token_relations_rejects_bad_arguments(model, images) -> None:
    with pytest.raises(ValueError, match="ideal setting"):
        token_relations(model, images, setting="ideal", mask=torch.zeros(6, NUM_PATCHES, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown setting"):
        token_relations(model, images, setting="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mask must be \(6, 64\)"):
        token_relations(model, images, mask=torch.arange(16).expand(6, -1) < 12)


def test_attention_nmi_is_zero_for_independent_and_one_for_permutation() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.rand(3, 10, generator=generator), torch.rand(3, 10, generator=generator)
    rank_one = queries[:, :, None] * keys[:, None, :]  # (3, 10, 10): p(q, k) = p(q) p(k)
    assert attention_nmi(rank_one) == pytest.approx(0.0, abs=1e-9)
    permutation = torch.eye(10)[torch.randperm(10, generator=generator)].expand(3, -1, -1)
    assert attention_nmi(permutation) == pytest.approx(1.0, abs=1e-9)
    assert attention_nmi(permutation[:, None].expand(-1, 2, -1, -1)) == pytest.approx(1.0, abs=1e-9)  # with heads
    blend = 0.5 * permutation + 0.5 * rank_one / rank_one.sum((1, 2), keepdim=True) * 10
    assert 0.05 < attention_nmi(blend) < 0.95
    # Softmax rows of a real untrained model sit near independence, but not at it.
    assert 0.0 < attention_nmi(torch.softmax(torch.randn(2, 10, 10, generator=generator), -1)) < 0.5
    with pytest.raises(ValueError, match="non-negative"):
        attention_nmi(-permutation)


def two_texture_image() -> torch.Tensor:
    """(1, 1, 32, 32): vertical stripes on the left half, a fine checkerboard on the right, faint noise."""
    cols = torch.arange(32)
    stripes = (cols % 4 < 2).float().expand(32, 32)  # 2-pixel vertical stripes
    checker = ((cols[:, None] + cols[None, :]) % 2).float()  # 1-pixel checkerboard
    image = 2 * torch.where(cols < 16, stripes, checker) - 1  # (32, 32) in {-1, 1}: zero-mean textures
    noise = 0.05 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    return (image + noise)[None, None]


def test_cluster_gap_separates_two_textures() -> None:
    features = patchify(two_texture_image(), 4)  # (1, 64, 16) raw pixel patches
    unit = torch.nn.functional.normalize(features, dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # (1, 64, 64)
    left = (torch.arange(64) % 8 < 4)[None]  # (1, 64) patch columns 0..3
    labels = ncut_bipartition(features)
    assert torch.equal(labels, left) or torch.equal(labels, ~left)  # Ncut finds the two textures
    gap = cluster_gap(similarity, labels)
    assert gap > 0.3
    top = (torch.arange(64) < 32)[None]  # a split that cuts across both textures
    assert abs(cluster_gap(similarity, top)) < 0.05
    assert math.isnan(cluster_gap(similarity, torch.ones(1, 64, dtype=torch.bool)))  # one side only
    assert similarity_variance(similarity) > 0.01


def test_feature_and_similarity_variance_values() -> None:
    features = torch.tensor([[[0.0, 1.0], [2.0, 1.0]]])  # (1, 2, 2): variances 1 and 0
    assert feature_variance(features) == pytest.approx(0.5)
    constant = torch.ones(2, 5, 3)
    assert feature_variance(constant) == 0.0
    unit = torch.nn.functional.normalize(constant, dim=-1)
    assert similarity_variance(unit @ unit.transpose(1, 2)) == pytest.approx(0.0, abs=1e-12)
    similarity = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]])  # off-diagonal 0,1,0,0,1,0
    assert similarity_variance(similarity) == pytest.approx(2 / 9)


def test_relation_kl_is_zero_for_the_same_model_and_positive_for_another(model, images) -> None:
    spec = model.make_mask(6, generator=torch.Generator().manual_seed(1))
    relations = token_relations(model, images, mask=spec)
    again = token_relations(model, images, mask=spec)
    for row in relation_kl(relations, again):
        assert row["attention_kl"] == pytest.approx(0.0, abs=1e-9)
        assert row["similarity_kl"] == pytest.approx(0.0, abs=1e-9)
    other = token_relations(small_model(1), images, mask=spec)
    rows = relation_kl(relations, other)
    assert [row["layer"] for row in rows] == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    assert all(row["attention_kl"] > 1e-4 and row["similarity_kl"] > 1e-3 for row in rows)
    with pytest.raises(ValueError, match="different layers"):
        relation_kl(relations, token_relations(model, images, setting="ideal"))


def test_relation_summary_of_a_real_model(model, images) -> None:
    summary = relation_summary(token_relations(model, images, setting="ideal"))
    assert [row["layer"] for row in summary] == ["encoder.0", "encoder.1"]
    for row in summary:
        assert row["tokens"] == NUM_PATCHES
        assert row["feature_variance"] > 0 and row["similarity_variance"] > 0
        assert -2.0 <= row["cluster_gap"] <= 2.0 and row["cluster_gap"] > 0  # Ncut clusters are tighter
        assert 0.0 < row["attention_nmi"] < 1.0


def decoder_attentions(model: MaskedImageModel, images: torch.Tensor, seed: int = 0):
    spec = model.make_mask(images.shape[0], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        enc = model.encoder(images, spec)
        dec = model.decoder(enc, spec, return_attn=True)
    return dec.attentions, spec.mask


def test_exploitation_rate_of_a_real_decoder_and_of_one_blind_to_mask_tokens(model, images) -> None:
    attentions, mask = decoder_attentions(model, images)
    real = exploitation_rate(attentions, mask)
    assert 0 < real.mask < 1 and real.visible + real.mask == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(real.per_layer.sum(dim=1), torch.ones(2, 2), atol=1e-6)  # V + M shares of each set
    keys = torch.cat([torch.zeros(6, 1, dtype=torch.bool), mask], dim=1)  # (B, 1 + L): mask-token keys
    blind = []
    for attn in attentions:  # (B, heads, 1 + L, 1 + L)
        zeroed = attn.masked_fill(keys[:, None, None, :], 0.0)
        blind.append(zeroed / zeroed.sum(-1, keepdim=True))  # rows renormalized over the other keys
    rate = exploitation_rate(blind, mask)
    assert rate.mask == 0.0 and rate.visible == pytest.approx(1.0)


def log_exploitation(run_dir: Path, images: torch.Tensor, switch: bool = True) -> None:
    """A ``metrics.jsonl`` with the real decoder exploitation rate of two differently seeded models."""
    logger = MetricsLogger(run_dir, tensorboard=False)
    for step, seed in ((10, 0), (20, 1)):
        attentions, mask = decoder_attentions(small_model(seed), images, seed)
        logger.log(step, {"loss": 1.0, **exploitation_rate(attentions, mask).as_metrics()})
    if switch:
        logger.log(20, {"self_guided/switch_step": 20})
    logger.log(30, {"loss": 0.5})
    logger.close()


def is_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_plot_exploitation_and_its_errors(images, tmp_path: Path) -> None:
    log_exploitation(tmp_path, images)
    assert sum("exploitation/mask" in record for record in read_metrics(tmp_path / "metrics.jsonl")) == 2
    assert is_png(plot_exploitation(tmp_path / "metrics.jsonl", tmp_path / "u.png")) == (600, 360)
    (tmp_path / "plain.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError, match="no record with exploitation/visible"):
        plot_exploitation(tmp_path / "plain.jsonl", tmp_path / "v.png")
    assert not (tmp_path / "v.png").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_exploitation(tmp_path / "missing.jsonl", tmp_path / "v.png")


def test_crossing_step_needs_the_mask_curve_to_come_from_below() -> None:
    def records(*pairs: tuple[float, float]) -> list[dict[str, float]]:
        return [
            {"step": 10 * (index + 1), "exploitation/visible": v, "exploitation/mask": m}
            for index, (v, m) in enumerate(pairs)
        ]

    assert crossing_step(records((0.4, 0.6), (0.3, 0.7))) is None  # above from the start
    assert crossing_step(records((0.6, 0.4), (0.55, 0.45), (0.45, 0.55))) == 30
    assert crossing_step(records((0.4, 0.6), (0.6, 0.4), (0.4, 0.6))) == 30


def test_save_relation_maps_draws_one_row_per_image(model, images, tmp_path: Path) -> None:
    layer = token_relations(model, images[:3], setting="ideal")[-1]
    foreground = ncut_bipartition(layer.features)
    informed = informed_mask(foreground, 48, num_hints=0, generator=torch.Generator().manual_seed(0))
    path = save_relation_maps(
        images[:3], layer.cls_attention, foreground, informed, tmp_path / "maps.png", mean=MEAN, std=STD, title="t"
    )
    width, height = is_png(path)
    assert width == 4 * 160
    assert height == round((3 * 1.6 * 1.05 + 0.1 + 0.17 * 2 + 0.1) * 100)
    with pytest.raises(ValueError, match="attention must be"):
        save_relation_maps(
            images[:3], layer.cls_attention[:2], foreground, informed, tmp_path / "x.png", mean=MEAN, std=STD
        )


def test_analyze_command_end_to_end(fmnist, images, tmp_path: Path, capsys) -> None:
    folder, run_dir, out = tmp_path / "images", tmp_path / "run", tmp_path / "analysis"
    folder.mkdir()
    for index in range(4):
        Image.fromarray(fmnist[index, 0].numpy(), "L").save(folder / f"{index}.png")
    checkpoint = save_checkpoint_as(small_model(0), run_dir / "last.pt", "mimkit")
    other = save_checkpoint_as(small_model(1), tmp_path / "other.pt", "mimkit")
    log_exploitation(run_dir, images)
    argv = ["analyze", "--checkpoint", checkpoint, "--images", folder, "--out", out, "--compare", other, "--limit", "3"]
    assert main([str(arg) for arg in argv]) == 0
    printed = capsys.readouterr().out
    assert "decoder.1" in printed and "KL attn" in printed
    result = json.loads((out / "relations.json").read_text())
    assert result["setting"] == "practical"
    assert len(result["images"]) == 3
    assert result["mask_ratio"] == pytest.approx(0.75)
    names = ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    assert [row["layer"] for row in result["layers"]] == names
    assert [row["tokens"] for row in result["layers"]] == [NUM_VISIBLE, NUM_VISIBLE, NUM_PATCHES, NUM_PATCHES]
    assert [row["layer"] for row in result["kl"]] == names
    assert all(row["attention_kl"] > 0 for row in result["kl"])
    assert is_png(out / "maps.png")[0] == 4 * 160
    assert is_png(out / "exploitation.png") == (600, 360)
    assert is_png(out / "sides.png")[0] == 4 * 160  # the image and the three object-side rules
    assert set(result["object_share"]) == {"border", "mean", "eigenvector"}

    ideal = tmp_path / "ideal"
    argv = ["analyze", "--checkpoint", checkpoint, "--images", folder, "--out", ideal, "--setting", "ideal"]
    assert main([str(arg) for arg in [*argv, "--layer", "0"]]) == 0
    result = json.loads((ideal / "relations.json").read_text())
    assert [row["layer"] for row in result["layers"]] == ["encoder.0", "encoder.1"]
    assert "kl" not in result and len(result["images"]) == 4


def test_analyze_command_errors_exit_2(tmp_path: Path, capsys) -> None:
    checkpoint = save_checkpoint_as(small_model(0), tmp_path / "last.pt", "mimkit")
    missing = tmp_path / "nowhere.png"
    code = main(["analyze", "--checkpoint", str(checkpoint), "--images", str(missing), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"image file or folder {missing} does not exist" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not a PNG")
    with pytest.warns(BadImageWarning, match="bad.png"):
        code = main(
            [
                "analyze",
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(tmp_path / "bad.png"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert code == 2
    assert "could be read" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_patch_saliency_is_class_attention_or_the_attention_each_patch_receives() -> None:
    from mimkit.masking.saliency import patch_saliency

    attention = torch.softmax(torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(0)), dim=-1)  # (B, T, T)
    assert torch.equal(patch_saliency(attention, 1), attention[:, 0, 1:])  # class token over the 4 patches
    received = patch_saliency(attention, 0)  # (B, 5): no class token (ConvMAE)
    torch.testing.assert_close(received, attention.mean(dim=1))
    torch.testing.assert_close(received.sum(dim=1), torch.ones(2))  # rows sum to 1, so their mean does too
