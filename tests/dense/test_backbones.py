"""Backbone feature shapes and strides, MIMDet's ConvStem input and token sampling, gradients, and layer-wise
lr decay."""

import pytest
import torch
import torch.nn.functional as F

from mimkit.build import create_model
from mimkit.dense.models.backbones import (
    ConvMAEBackbone,
    ConvStem,
    FPNBackbone,
    MIMDetBackbone,
    SideStem,
    ViTPyramid,
    sample_tokens,
)
from mimkit.eval.finetune import layer_decay_groups
from mimkit.masking import MaskSpec

VIT = dict(img_size=64, in_chans=3, depth=2, embed_dim=64, num_heads=2, decoder="micro")


def vit_model(patch_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("vit_tiny", patch_size=patch_size, **VIT)


def test_side_stem_of_the_patch_embed_ablation_gives_the_quarter_and_eighth_maps() -> None:
    x4, x8 = SideStem(3, (16, 32))(torch.randn(2, 3, 64, 48))
    assert x4.shape == (2, 16, 16, 12) and x8.shape == (2, 32, 8, 6)


@pytest.mark.parametrize("patch_size", [8, 16])
def test_conv_stem_tokens_have_the_patch_embedding_shape(patch_size: int) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", patch_size=patch_size, **{**VIT, "img_size": (64, 48)})
    stem = ConvStem(3, 64, patch_size)
    images = torch.randn(2, 3, 64, 48)  # non-square
    tokens, maps = stem(images)
    assert tokens.shape == model.encoder.patch_embed(images).shape == (2, (64 // patch_size) * (48 // patch_size), 64)
    # the channels double at every stride-2 stage up to the encoder's width
    assert stem.widths == [64 * 2**i * 2 // patch_size for i in range(len(stem.widths))] and stem.widths[-1] == 64
    assert {stride: tuple(m.shape[1:]) for stride, m in maps.items()} == {
        2**i: (stem.widths[i - 1], 64 // 2**i, 48 // 2**i) for i in range(1, len(stem.widths) + 1)
    }
    norms = [m for m in stem.modules() if m.__class__.__name__ == "LayerNorm2d"]
    gelus = [m for m in stem.modules() if isinstance(m, torch.nn.GELU)]
    convs = [m for m in stem.stages.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(norms) == len(gelus) == len(convs) == len(stem.widths)
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs)


def test_conv_stem_has_mimdets_size_at_vit_base_width() -> None:
    """MIMDet reports 4.1 M parameters, under 5 % of the ViT-Base encoder."""
    from mimkit.models.vit import VisionTransformer

    stem_params = sum(p.numel() for p in ConvStem(3, 768, 16).parameters())
    assert stem_params == 4_079_712
    encoder_params = sum(p.numel() for p in VisionTransformer(224, 16, 3, 768, 12, 12).parameters())
    assert stem_params < 0.05 * encoder_params


@pytest.mark.parametrize("patch_size", [8, 16])
@pytest.mark.parametrize("fill", ["decoder", "mask_token"])
@pytest.mark.parametrize("stem", ["conv", "patch_embed"])
def test_mimdet_levels_have_strides_4_8_16_32(patch_size: int, fill: str, stem: str) -> None:
    model = vit_model(patch_size)
    body = MIMDetBackbone(model.encoder, model.decoder, sample_ratio=0.5, fill=fill, stem=stem)
    width = 128 if fill == "decoder" else 64  # the micro decoder's width, or the encoder's
    c4, c8 = 64 * 4 // patch_size, 64 * 8 // patch_size  # the ConvStem's widths at 1/4 and 1/8 (both stems)
    assert body.channels == [c4, c8, width, width] and body.strides == [4, 8, 16, 32]
    for mode in (True, False):
        features = body.train(mode)(torch.randn(2, 3, 64, 64))
        shapes = [tuple(features[name].shape) for name in ("0", "1", "2", "3")]
        assert shapes == [(2, c4, 16, 16), (2, c8, 8, 8), (2, width, 4, 4), (2, width, 2, 2)]


@pytest.mark.parametrize("stem", ["conv", "patch_embed"])
def test_mimdet_takes_non_square_inputs_that_are_not_multiples_of_16(stem: str) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", patch_size=8, **{**VIT, "img_size": (40, 56)})  # 5x7 tokens
    body = MIMDetBackbone(model.encoder, model.decoder, sample_ratio=0.5, stem=stem)
    for mode in (True, False):
        features = body.train(mode)(torch.randn(2, 3, 40, 56))
        assert [tuple(f.shape[-2:]) for f in features.values()] == [(10, 14), (5, 7), (3, 4), (2, 2)]


def test_the_vit_never_calls_its_patch_embedding_behind_the_conv_stem() -> None:
    model = vit_model(8)
    calls: list[int] = []

    def refuse(_module, _args) -> None:
        calls.append(1)
        raise AssertionError("the pretrained patch embedding was called")

    handle = model.encoder.patch_embed.register_forward_pre_hook(refuse)
    for fill in ("decoder", "mask_token"):
        body = MIMDetBackbone(model.encoder, model.decoder, sample_ratio=0.25, fill=fill)
        for mode in (True, False):
            body.train(mode)(torch.randn(2, 3, 64, 64))
    assert calls == [] and not any(p.requires_grad for p in model.encoder.patch_embed.parameters())
    ablation = MIMDetBackbone(model.encoder, model.decoder, stem="patch_embed")
    with pytest.raises(AssertionError, match="patch embedding was called"):  # the hook fires when it is used
        ablation(torch.randn(1, 3, 64, 64))
    handle.remove()


@pytest.mark.parametrize("fill", ["decoder", "mask_token"])
def test_gradients_reach_the_conv_stem_through_the_vit(fill: str) -> None:
    model = vit_model(8)
    body = MIMDetBackbone(model.encoder, model.decoder, sample_ratio=0.5, fill=fill).train()
    body(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))["2"].square().mean().backward()
    assert isinstance(body.stem, ConvStem)
    # the 1x1 projection feeds nothing but the ViT, and the first stage reaches the 1/16 map only through it
    for param in (body.stem.proj.weight, body.stem.stages[0][0].weight, model.encoder.blocks[0].attn.qkv.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    with torch.no_grad():  # and the 1/16 map depends on the stem
        before = body.eval()(torch.ones(1, 3, 64, 64))["2"]
        body.stem.proj.weight.mul_(1.5)
        assert not torch.allclose(body(torch.ones(1, 3, 64, 64))["2"], before)


@pytest.mark.parametrize("size", [64, 96])  # 4x4 and 6x6 at 1/16
def test_p5_is_the_2x2_average_of_p4(size: int) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", patch_size=8, **{**VIT, "img_size": size})
    features = MIMDetBackbone(model.encoder, model.decoder).eval()(torch.randn(2, 3, size, size))
    p4, p5 = features["2"], features["3"]
    assert p5.shape[-2:] == (size // 32, size // 32)
    for i in range(p5.shape[-2]):
        for j in range(p5.shape[-1]):
            torch.testing.assert_close(p5[..., i, j], p4[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(-2, -1)))
    legacy = MIMDetBackbone(model.encoder, model.decoder, stem="patch_embed", p5_pool="max").eval()
    features = legacy(torch.randn(2, 3, size, size))
    torch.testing.assert_close(features["3"], F.max_pool2d(features["2"], 2))


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
    body = MIMDetBackbone(model.encoder, model.decoder, sample_ratio=0.25, fill="decoder")
    seen: list[int] = []
    handle = model.encoder.blocks[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    images = torch.randn(3, 3, 64, 64)
    body.train()(images)
    body.eval()(images)
    handle.remove()
    assert seen == [1 + 16, 1 + 64]  # class token + 25 % of 64 stem tokens, then all of them
    # at eval the 1/16 map is exactly the decoder's view of the unmasked encoder on the stem's tokens
    patches, _ = body.stem(images)
    enc = model.encoder.forward_patches(patches)
    dec = model.decoder(enc, MaskSpec.unmasked(3, 64, images.device), return_hidden=True)
    expected = model.decoder.norm(dec.hidden_states[-1])[:, 1:].transpose(1, 2).reshape(3, -1, 8, 8)
    torch.testing.assert_close(body.token_map(images, None, patches), expected)
    torch.testing.assert_close(body(images)["2"], F.adaptive_avg_pool2d(expected, 4))


def test_mask_token_fill_keeps_sampled_tokens_and_fills_the_rest() -> None:
    model = vit_model(8)
    body = MIMDetBackbone(model.encoder, None, sample_ratio=0.5, fill="mask_token")
    images = torch.randn(2, 3, 64, 64)
    spec = sample_tokens(2, (8, 8), 0.5, generator=torch.Generator().manual_seed(1))
    patches, _ = body.stem(images)
    tokens = body.token_map(images, spec, patches).flatten(2).transpose(1, 2)  # (B, L, D)
    visible = model.encoder.forward_patches(patches, spec).patch_tokens  # (B, Lk, D)
    fill = (body.mask_token + model.encoder.pos_embed[:, 1:])[0]  # (L, D)
    for row in range(2):
        torch.testing.assert_close(tokens[row, spec.ids_keep[row]], visible[row])
        hidden = spec.mask[row]
        torch.testing.assert_close(tokens[row, hidden], fill[hidden])


@pytest.mark.parametrize("fill", ["decoder", "mask_token"])
@pytest.mark.parametrize("stem", ["conv", "patch_embed"])
def test_every_trainable_backbone_parameter_receives_a_gradient(fill: str, stem: str) -> None:
    model = vit_model(8)
    backbone = FPNBackbone(MIMDetBackbone(model.encoder, model.decoder, fill=fill, stem=stem), 32)
    backbone.train()
    loss = sum(f.square().mean() for f in backbone(torch.randn(2, 3, 64, 64)).values())
    loss.backward()
    missing = [name for name, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    fixed = {"body.encoder.pos_embed"}  # sin-cos tables
    if stem == "conv":  # replaced by the ConvStem, never called
        fixed |= {"body.encoder.patch_embed.proj.weight", "body.encoder.patch_embed.proj.bias"}
    if fill == "decoder":  # the decoder's pixel head is not used
        fixed |= {"body.decoder.pos_embed", "body.decoder.pred.weight", "body.decoder.pred.bias"}
    assert frozen == fixed


def test_layer_decay_scales_each_encoder_block_and_leaves_new_parts_at_full_rate() -> None:
    model = vit_model(8)
    backbone = FPNBackbone(MIMDetBackbone(model.encoder, model.decoder), 32)
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
    with pytest.raises(ValueError, match=r"model\.stem must be one of"):
        MIMDetBackbone(model.encoder, model.decoder, stem="patches")
    with pytest.raises(ValueError, match=r"model\.p5_pool must be one of"):
        MIMDetBackbone(model.encoder, model.decoder, p5_pool="sum")
    with pytest.raises(ValueError, match=r"model\.stem_channels=.*model\.stem=patch_embed"):
        MIMDetBackbone(model.encoder, model.decoder, stem_channels=(16, 32))
    with pytest.raises(ValueError, match=r"power of two of at least 8 .*got 4; use model\.stem=patch_embed"):
        MIMDetBackbone(vit_model(4).encoder, None, fill="mask_token")
    body = MIMDetBackbone(model.encoder, model.decoder)
    with pytest.raises(ValueError, match="takes 64x64 images, got 32x32"):
        body(torch.randn(1, 3, 32, 32))
