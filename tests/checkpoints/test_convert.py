import importlib

import pytest
import timm
import torch
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import PatchEmbed as TimmPatchEmbed
from torch import nn

from mimkit.build import create_model
from mimkit.checkpoints.convert import (
    LAYOUTS,
    args_from_hf_config,
    detect_layout,
    encoder_to_timm,
    from_mimkit,
    hf_config_from_args,
    infer_args_from_mae_state_dict,
    load_into,
    to_mimkit,
)

ARCH_KEYS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
)


@pytest.fixture
def transformers():
    return importlib.import_module("transformers")  # a dev dependency: `make setup` installs it


def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every weight so a swapped pair (two LayerNorms, q/k blocks) cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return module


def small_model(**overrides):
    args = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=96, depth=2, num_heads=3, decoder="micro")
    args.update(overrides)
    return perturb(create_model("vit_tiny", **args))


def hf_pretraining_model(transformers, **overrides):
    config = dict(
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=384,
        image_size=32,
        patch_size=4,
        num_channels=1,
        decoder_hidden_size=128,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=512,
        mask_ratio=0.75,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,
    )
    config.update(overrides)
    return perturb(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**config)).eval(), seed=1)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_channels=1, layer_norm_eps=1e-6, norm_pix_loss=True, attn_implementation="sdpa"),
        dict(num_channels=3, layer_norm_eps=1e-12, norm_pix_loss=False, attn_implementation="eager"),
    ],
    ids=["mae-eps-normpix-sdpa", "hf-eps-pixels-eager"],
)
def test_matches_hf_vitmae_given_same_weights_and_noise(transformers, overrides) -> None:
    hf = hf_pretraining_model(transformers, **overrides)
    args = args_from_hf_config(hf.config)
    assert (args["norm_eps"], args["norm_pix"], args["in_chans"]) == (
        overrides["layer_norm_eps"],
        overrides["norm_pix_loss"],
        overrides["num_channels"],
    )
    model = create_model(**args).eval()
    assert load_into(model, hf.state_dict()) == []

    chans = overrides["num_channels"]
    images = torch.randn(4, chans, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 + 1
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(pixel_values=images, noise=noise)
        out = model(images, noise)
    assert torch.equal(out.mask, expected.mask.bool())
    assert torch.allclose(out.pred, expected.logits, atol=1e-5, rtol=0)
    assert torch.allclose(out.loss, expected.loss, atol=1e-5, rtol=0)
    assert expected.logits.abs().mean() > 0.1  # outputs are not trivially small, so atol means something


def test_noise_mask_count_matches_hf_for_fractional_keep(transformers) -> None:
    # r=0.6, L=64: MAE and HF keep int(64 * 0.4) = 25 patches, one fewer than 64 - round(38.4)
    hf = hf_pretraining_model(transformers, mask_ratio=0.6)
    model = create_model(**args_from_hf_config(hf.config))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(pixel_values=torch.randn(2, 1, 32, 32), noise=noise).mask.bool()
        got = model(torch.randn(2, 1, 32, 32), noise).mask
    assert torch.equal(got, expected)


def test_hf_legacy_names_are_the_ones_transformers_loads(transformers, tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = small_model(in_chans=1)
    weights = model.state_dict()
    hf_config_from_args(model.config).save_pretrained(tmp_path)
    save_file(from_mimkit(weights, "hf_legacy"), tmp_path / "model.safetensors")

    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path)  # renames 4.x keys itself
    loaded = hf.state_dict()
    expected = from_mimkit(weights, "hf")
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("layout", ["mae", "hf", "hf_legacy"])
def test_round_trips_are_bit_identical(layout: str) -> None:
    weights = small_model().state_dict()
    converted = from_mimkit(weights, layout)
    back = to_mimkit(converted)  # layout detected
    assert list(back) == list(weights)
    for key, value in weights.items():
        assert torch.equal(back[key], value), key
    again = from_mimkit(back, layout)
    assert again.keys() == converted.keys()
    assert all(torch.equal(again[key], converted[key]) for key in converted)


def test_hf_split_qkv_blocks_are_q_k_v_rows() -> None:
    weights = small_model().state_dict()
    hf = from_mimkit(weights, "hf")
    qkv = weights["encoder.blocks.1.attn.qkv.weight"]  # (3 * 96, 96)
    assert torch.equal(hf["vit.layers.1.attention.q_proj.weight"], qkv[:96])
    assert torch.equal(hf["vit.layers.1.attention.k_proj.weight"], qkv[96:192])
    assert torch.equal(hf["vit.layers.1.attention.v_proj.weight"], qkv[192:])
    assert hf["vit.layers.1.attention.v_proj.weight"].untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()


def test_detect_layout_of_each_layout_and_of_checkpoints() -> None:
    weights = small_model().state_dict()
    for layout in LAYOUTS:
        converted = from_mimkit(weights, layout)
        assert detect_layout(converted) == layout
        assert detect_layout({"model": converted, "epoch": 3}) == layout  # MAE's checkpoint form
    with pytest.raises(ValueError, match=r"cannot tell the layout.*conv1\.weight"):
        detect_layout({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown layout"):
        from_mimkit(weights, "keras")


def test_mae_layout_loads_into_a_model_built_like_models_mae() -> None:
    """facebookresearch/mae's MaskedAutoencoderViT is built from timm parts with these attribute names."""
    model = small_model(in_chans=3)
    peer = nn.Module()
    peer.patch_embed = TimmPatchEmbed(32, 4, 3, 96)
    peer.cls_token = nn.Parameter(torch.zeros(1, 1, 96))
    peer.pos_embed = nn.Parameter(torch.zeros(1, 65, 96), requires_grad=False)
    peer.blocks = nn.ModuleList(TimmBlock(96, 3, 4.0, qkv_bias=True) for _ in range(2))
    peer.norm = nn.LayerNorm(96, eps=1e-6)
    peer.decoder_embed = nn.Linear(96, 128)
    peer.mask_token = nn.Parameter(torch.zeros(1, 1, 128))
    peer.decoder_pos_embed = nn.Parameter(torch.zeros(1, 65, 128), requires_grad=False)
    peer.decoder_blocks = nn.ModuleList(TimmBlock(128, 4, 4.0, qkv_bias=True) for _ in range(2))
    peer.decoder_norm = nn.LayerNorm(128, eps=1e-6)
    peer.decoder_pred = nn.Linear(128, 4 * 4 * 3)
    mae = from_mimkit(model.state_dict(), "mae")
    peer.load_state_dict(mae, strict=True)
    assert torch.equal(peer.decoder_blocks[1].attn.qkv.weight, model.decoder.blocks[1].attn.qkv.weight)


def timm_vit_tiny(**overrides):
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        in_chans=1,
        num_classes=0,
        global_pool="token",
        **overrides,
    ).eval()


def test_timm_export_gives_the_same_class_token_features() -> None:
    model = perturb(create_model("vit_tiny", img_size=32, patch_size=4, in_chans=1, decoder="micro")).eval()
    peer = timm_vit_tiny()
    peer.load_state_dict(encoder_to_timm(model.state_dict()), strict=True)
    images = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.encoder.forward_features(images, pool="cls")  # (B, D)
        theirs = peer.forward_features(images)[:, 0]  # timm applies its final norm in forward_features
        pooled = peer(images)  # num_classes=0: the pre-logits class token
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert torch.allclose(ours, pooled, atol=1e-5, rtol=0)
    assert encoder_to_timm(from_mimkit(model.state_dict(), "hf")).keys() == peer.state_dict().keys()


def test_encoder_only_mae_checkpoint_loads_into_the_encoder() -> None:
    peer = perturb(timm_vit_tiny(depth=2))  # a timm ViT state dict is MAE's released encoder-only layout
    checkpoint = {"model": peer.state_dict()}
    assert detect_layout(checkpoint) == "mae"
    model = create_model("vit_tiny", img_size=32, patch_size=4, in_chans=1, depth=2, decoder="micro").eval()
    decoder_before = model.decoder.pred.weight.clone()

    with pytest.warns(UserWarning, match="encoder-only checkpoint"):
        left_out = load_into(model, checkpoint)
    assert left_out == [key for key in model.state_dict() if key.startswith("decoder.")]
    assert torch.equal(model.decoder.pred.weight, decoder_before)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encoder.forward_features(images), peer(images), atol=1e-5, rtol=0)

    encoder = create_model("vit_tiny", img_size=32, patch_size=4, in_chans=1, depth=2).encoder
    assert load_into(encoder, checkpoint) == []
    assert torch.equal(encoder.blocks[1].mlp.fc2.weight, peer.blocks[1].mlp.fc2.weight)


def test_other_architectures_are_refused_naming_the_keys() -> None:
    model = small_model()
    wider = create_model("vit_tiny", img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=2, decoder="micro")
    with pytest.raises(ValueError, match=r"shape mismatches: encoder\.cls_token \(1, 1, 192\) vs model \(1, 1, 96\)"):
        load_into(model, from_mimkit(wider.state_dict(), "mae"))
    deeper = small_model(depth=3)
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.blocks\.2\.norm1\.weight"):
        load_into(model, from_mimkit(deeper.state_dict(), "hf"))
    incomplete = dict(model.state_dict())
    del incomplete["encoder.norm.bias"], incomplete["decoder.pred.weight"]
    with pytest.raises(ValueError, match=r"missing keys: encoder\.norm\.bias, decoder\.pred\.weight"):
        load_into(model, incomplete)
    classifier = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10)
    with pytest.raises(ValueError, match=r"not keys of an MAE pretraining model in the 'mae' layout: head\.weight"):
        load_into(model, classifier.state_dict())
    hf = from_mimkit(model.state_dict(), "hf")
    del hf["decoder.decoder_layers.0.attention.k_proj.bias"]
    with pytest.raises(ValueError, match=r"decoder\.blocks\.0\.attn\.qkv\.bias needs q, k and v"):
        to_mimkit(hf)


def test_hf_config_round_trip_and_unsupported_settings(transformers) -> None:
    model = small_model(norm_eps=1e-12, mask_ratio=0.5, norm_pix=False)
    config = hf_config_from_args(model.config)
    assert (config.hidden_size, config.intermediate_size, config.decoder_intermediate_size) == (96, 384, 512)
    assert (config.layer_norm_eps, config.mask_ratio, config.norm_pix_loss) == (1e-12, 0.5, False)
    args = args_from_hf_config(config)
    assert {key: args[key] for key in ARCH_KEYS} == {key: model.config[key] for key in ARCH_KEYS}
    assert (args["norm_eps"], args["mask_ratio"], args["norm_pix"]) == (1e-12, 0.5, False)
    transformers.ViTMAEForPreTraining(config).load_state_dict(from_mimkit(model.state_dict(), "hf"), strict=True)

    base = model.config
    with pytest.raises(ValueError, match="decoder_intermediate_size 256 != decoder_hidden_size 128"):
        args_from_hf_config(transformers.ViTMAEConfig(**{**config.to_dict(), "decoder_intermediate_size": 256}))
    with pytest.raises(ValueError, match="exact GELU"):
        args_from_hf_config(transformers.ViTMAEConfig(**{**config.to_dict(), "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="qkv_bias=False"):
        args_from_hf_config(transformers.ViTMAEConfig(**{**config.to_dict(), "qkv_bias": False}))
    with pytest.raises(ValueError, match="only has an MSE loss"):
        hf_config_from_args({**base, "loss": "l1"})
    with pytest.raises(ValueError, match="stochastic depth"):
        hf_config_from_args({**base, "drop_path_rate": 0.1})


def test_infer_args_from_mae_state_dict() -> None:
    model = small_model(embed_dim=192, num_heads=3, depth=2, decoder="micro", in_chans=1, patch_size=8)
    checkpoint = {"model": from_mimkit(model.state_dict(), "mae")}
    args = infer_args_from_mae_state_dict(checkpoint)
    assert {key: args[key] for key in ARCH_KEYS} == {key: model.config[key] for key in ARCH_KEYS}
    rebuilt = create_model(**args)
    assert load_into(rebuilt, checkpoint) == []

    encoder_only = {key: value for key, value in checkpoint["model"].items() if not key.startswith("decoder")}
    args = infer_args_from_mae_state_dict(encoder_only)
    assert (args["depth"], args["decoder_embed_dim"], args["decoder_depth"]) == (2, 512, 8)  # MAE's decoder

    odd = from_mimkit(small_model(embed_dim=96).state_dict(), "mae")
    with pytest.raises(ValueError, match="no registry encoder is 96 wide; pass num_heads"):
        infer_args_from_mae_state_dict(odd)
    assert infer_args_from_mae_state_dict(odd, num_heads=3)["num_heads"] == 3
