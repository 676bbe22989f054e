"""Backbone feature shapes and strides, MIMDet's token sampling, gradients, and layer-wise lr decay."""

import pytest
import torch

from mimkit.detection.backbones import (
    ConvMAEBackbone,
    ConvStem,
    FPNBackbone,
    MIMDetBackbone,
    ViTPyramid,
    sample_tokens,
)
from mimkit.eval.finetune import layer_decay_groups
from mimkit.models import create_model

VIT = dict(img_size=64, in_chans=3, depth=2, embed_dim=64, num_heads=2, decoder="micro")


def vit_model(patch_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("vit_tiny", patch_size=patch_size, **VIT)


def test_conv_stem_gives_the_quarter_and_eighth_maps() -> None:
    x4, x8 = ConvStem(3, (16, 32))(torch.randn(2, 3, 64, 48))
    assert x4.shape == (2, 16, 16, 12) and x8.shape == (2, 32, 8, 6)


@pytest.mark.parametrize("patch_size", [8, 16])
@pytest.mark.parametrize("fill", ["decoder", "mask_token"])
def test_mimdet_levels_have_strides_4_8_16_32(patch_size: int, fill: str) -> None:
    model = vit_model(patch_size)
    body = MIMDetBackbone(model.encoder, model.decoder, sample_ratio=0.5, fill=fill, stem_channels=(16, 32))
    width = 128 if fill == "decoder" else 64  # the micro decoder's width, or the encoder's
    assert body.channels == [16, 32, width, width] and body.strides == [4, 8, 16, 32]
    for mode in (True, False):
        features = body.train(mode)(torch.randn(2, 3, 64, 64))
        shapes = [tuple(features[name].shape) for name in ("0", "1", "2", "3")]
        assert shapes == [(2, 16, 16, 16), (2, 32, 8, 8), (2, width, 4, 4), (2, width, 2, 2)]


def test_convmae_levels_are_its_stages_and_a_pooled_fourth() -> None:
    torch.manual_seed(0)
    model = create_model("convmae_tiny", img_size=64, in_chans=3, patch_sizes=(4, 2, 2), decoder="micro")
    body = ConvMAEBackbone(model.encoder)
    assert body.strides == [4, 8, 16, 32] and body.channels == [32, 64, 128, 128]
    features = body(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features.values()] == [
        (2, 32, 16, 16),
        (2, 64, 8, 8),
        (2, 128, 4, 4),
        (2, 128, 2, 2),
    ]
    stages = model.encoder(torch.randn(1, 3, 64, 64)).stage_features
    assert [s.shape[-1] for s in stages] == [16, 8, 4]


def test_vit_simple_pyramid_upsamples_and_pools_the_last_map() -> None:
    pyramid = ViTPyramid(vit_model(8).encoder, out_channels=24)
    features = pyramid(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features.values()] == [(2, 24, 16, 16), (2, 24, 8, 8), (2, 24, 4, 4), (2, 24, 2, 2)]
    with pytest.raises(ValueError, match="power-of-two"):
        ViTPyramid(vit_model(8).encoder, strides=(4, 12))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.3])
def test_token_sampling_keeps_the_requested_ratio(ratio: float) -> None:
    spec = sample_tokens(5, (8, 8), ratio, generator=torch.Generator().manual_seed(0))
    expected = 64 - round((1 - ratio) * 64)
    assert spec.ids_keep.shape == (5, expected)
    assert (~spec.mask).sum(dim=1).tolist() == [expected] * 5
    for row in range(5):  # the kept tokens are exactly the unmasked ones, each once
        assert sorted(spec.ids_keep[row].tolist()) == torch.nonzero(~spec.mask[row]).flatten().tolist()
    assert not torch.equal(spec.mask[0], spec.mask[1])  # independent per image


def test_mimdet_samples_in_training_and_sees_every_token_at_eval() -> None:
    model = vit_model(8)
    body = MIMDetBackbone(model.encoder, model.decoder, sample_ratio=0.25, fill="decoder", stem_channels=(16, 32))
    seen: list[int] = []
    handle = model.encoder.blocks[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    images = torch.randn(3, 3, 64, 64)
    body.train()(images)
    body.eval()(images)
    handle.remove()
    assert seen == [1 + 16, 1 + 64]  # class token + 25 % of 64 patches, then all of them
    # at eval the 1/16 map is exactly the decoder's view of the unmasked encoder: no token is dropped
    enc = model.encoder(images)
    from mimkit.detection.backbones import all_tokens

    dec = model.decoder(enc, all_tokens(3, 64, images.device), return_hidden=True)
    expected = model.decoder.norm(dec.hidden_states[-1])[:, 1:].transpose(1, 2).reshape(3, -1, 8, 8)
    torch.testing.assert_close(body.token_map(images, None), expected)


def test_mask_token_fill_keeps_sampled_tokens_and_fills_the_rest() -> None:
    model = vit_model(8)
    body = MIMDetBackbone(model.encoder, None, sample_ratio=0.5, fill="mask_token", stem_channels=(16, 32))
    images = torch.randn(2, 3, 64, 64)
    spec = sample_tokens(2, (8, 8), 0.5, generator=torch.Generator().manual_seed(1))
    tokens = body.token_map(images, spec).flatten(2).transpose(1, 2)  # (B, L, D)
    visible = model.encoder(images, spec).patch_tokens  # (B, Lk, D)
    fill = (body.mask_token + model.encoder.pos_embed[:, 1:])[0]  # (L, D)
    for row in range(2):
        torch.testing.assert_close(tokens[row, spec.ids_keep[row]], visible[row])
        hidden = spec.mask[row]
        torch.testing.assert_close(tokens[row, hidden], fill[hidden])


@pytest.mark.parametrize("fill", ["decoder", "mask_token"])
def test_every_trainable_backbone_parameter_receives_a_gradient(fill: str) -> None:
    model = vit_model(8)
    backbone = FPNBackbone(MIMDetBackbone(model.encoder, model.decoder, fill=fill, stem_channels=(16, 32)), 32)
    backbone.train()
    loss = sum(f.square().mean() for f in backbone(torch.randn(2, 3, 64, 64)).values())
    loss.backward()
    missing = [name for name, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    fixed = {"body.encoder.pos_embed"}  # sin-cos tables
    if fill == "decoder":  # the decoder's pixel head is not used
        fixed |= {"body.decoder.pos_embed", "body.decoder.pred.weight", "body.decoder.pred.bias"}
    assert frozen == fixed


def test_layer_decay_scales_each_encoder_block_and_leaves_new_parts_at_full_rate() -> None:
    model = vit_model(8)
    backbone = FPNBackbone(MIMDetBackbone(model.encoder, model.decoder, stem_channels=(16, 32)), 32)
    groups = layer_decay_groups(backbone, weight_decay=0.05, layer_decay=0.5, encoder=model.encoder)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    depth = 2
    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            assert id(param) not in scale_of
            continue
        if name.startswith("body.encoder.blocks."):
            block = int(name.split(".")[3])
            assert scale_of[id(param)] == 0.5 ** (depth - block), name
        elif name.startswith("body.encoder.norm."):
            assert scale_of[id(param)] == 1.0
        elif name.startswith("body.encoder."):  # patch embedding and class token: layer 0
            assert scale_of[id(param)] == 0.5 ** (depth + 1), name
        else:  # stem, decoder, FPN
            assert scale_of[id(param)] == 1.0, name
        no_decay = param.ndim <= 1 or name.split(".")[-1] in ("cls_token", "mask_token")
        assert decay_of[id(param)] == (0.0 if no_decay else 0.05), name


def test_backbones_refuse_the_wrong_encoder_and_image_size() -> None:
    model = vit_model(8)
    with pytest.raises(ValueError, match="ConvMAEBackbone"):
        MIMDetBackbone(create_model("convmae_tiny", img_size=64, decoder="micro").encoder)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask_token"):
        MIMDetBackbone(model.encoder, None, fill="decoder")
    body = MIMDetBackbone(model.encoder, model.decoder)
    with pytest.raises(ValueError, match="takes 64x64 images, got 32x32"):
        body(torch.randn(1, 3, 32, 32))
