"""Analytic FLOPs and parameter counts against PyTorch's own FLOP counter and ``numel``."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mimkit.analysis.complexity import (
    conv_flops,
    count_parameters,
    decoder_flops,
    encoder_flops,
    format_info,
    model_info,
)
from mimkit.build import create_model
from mimkit.masking import MaskSpec


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Non-square-ish widths (mlp_ratio 3, 3 heads) so a formula mixing up dims would not match by luck.
    return create_model(
        "vit_tiny", img_size=32, patch_size=4, in_chans=3, depth=2, decoder="micro", mlp_ratio=3.0, mask_ratio=0.75
    ).eval()


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_parameter_counts_equal_sum_of_numel(model):
    parts = {"encoder": model.encoder, "decoder": model.decoder}
    info = model_info(model)
    for name, part in parts.items():
        assert info[f"{name}_params"] == sum(p.numel() for p in part.parameters())
        assert info[f"{name}_trainable_params"] == sum(p.numel() for p in part.parameters() if p.requires_grad)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    # The fixed sin-cos position embeddings are parameters but not trainable.
    frozen = model.encoder.pos_embed.numel() + model.decoder.pos_embed.numel()
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == frozen
    assert info["trainable_params"] == info["total_params"] - frozen


def test_visible_tokens(model):
    info = model_info(model)
    assert info["num_patches"] == 64
    assert info["num_visible"] == 16
    assert model_info(model, mask_ratio=0.5)["num_visible"] == 32


@pytest.mark.parametrize("num_visible", [16, 64])
def test_encoder_flops_match_flop_counter_exactly(model, num_visible):
    images = torch.randn(2, 3, 32, 32)
    mask = MaskSpec.from_noise(torch.rand(2, 64, generator=torch.Generator().manual_seed(0)), num_visible)
    analytic = encoder_flops(model.encoder, num_visible)
    with torch.no_grad():
        # The math SDPA backend decomposes attention into the two matmuls FlopCounterMode counts.
        with sdpa_kernel(SDPBackend.MATH):
            counted = counted_flops(lambda: model.encoder(images, mask))
        explicit = counted_flops(lambda: model.encoder(images, mask, return_attn=True))
    assert counted == 2 * analytic["total"]
    assert explicit == 2 * analytic["total"]
    assert analytic["attention"] == 2 * 2 * 2 * (1 + num_visible) ** 2 * 192  # blocks * (QK^T + AV) * 2N^2D


def test_decoder_flops_match_flop_counter_exactly(model):
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        enc = model.encoder(images, mask := model.make_mask(3, generator=torch.Generator().manual_seed(1)))
        counted = counted_flops(lambda: model.decoder(enc, mask, return_attn=True))
    analytic = decoder_flops(model.decoder, 1 + mask.num_visible, 64)
    assert counted == 3 * analytic["total"]


def test_model_info_flops_match_a_whole_pretraining_forward(model):
    images = torch.randn(2, 3, 32, 32)
    info = model_info(model)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        counted = counted_flops(lambda: model(images, generator=torch.Generator().manual_seed(0)))
        full = counted_flops(lambda: model.encoder(images))
    assert counted == 2 * info["pretrain_flops"]
    assert full == 2 * info["encoder_full_flops"]
    assert info["encoder_visible_flops"] < info["encoder_full_flops"]


def test_format_info_lists_every_number(model):
    info = model_info(model)
    text = format_info(info)
    for key in ("encoder_params", "decoder_params", "pretrain_flops", "encoder_full_flops"):
        assert f"{info[key]:,}" in text
    assert "16 visible" in text


@pytest.mark.parametrize("fuse", [True, False])
def test_convmae_flops_match_a_whole_pretraining_forward(fuse):
    torch.manual_seed(0)
    model = create_model(
        "convmae_tiny", img_size=32, in_chans=3, patch_sizes=(2, 2, 2), depths=(1, 2, 2), kernel_size=7,
        fuse=fuse, decoder="micro", mlp_ratio=3.0,
    ).eval()  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    info = model_info(model)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        counted = counted_flops(lambda: model(images, generator=torch.Generator().manual_seed(0)))
        full = counted_flops(lambda: model.encoder(images))
    assert info["num_visible"] == 4  # a 4x4 grid at ratio 0.75
    assert counted == 2 * info["pretrain_flops"]
    assert full == 2 * info["encoder_full_flops"]
    # The convolution stages run on the whole image, masked or not: only stage 3 gets cheaper. The fusion
    # convolutions run only masked (the pretraining decoder's input).
    masked, unmasked = encoder_flops(model.encoder, 4), encoder_flops(model.encoder)
    fusion = sum(conv_flops(conv, model.grid) for conv in model.encoder.fusion_layers())
    assert (fusion > 0) == fuse and masked["mlp"] * 4 == unmasked["mlp"]
    assert masked["patch_embed"] == unmasked["patch_embed"] + fusion
