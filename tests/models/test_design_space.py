"""MaskDistill's design space: BEiT's encoder with a mask embedding, the FC head, MAE's loss switch, MILAN's
separable parts, and checkpoints of each mode."""

from __future__ import annotations

import timm
import torch

from mimkit.build import build_model, create_model, load_checkpoint
from mimkit.checkpoints.convert import encoder_to_timm
from mimkit.checkpoints.load import save_checkpoint_as
from mimkit.config import config_from_dict, load_config
from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
from mimkit.masking import AttentionMasker, MaskSpec, RandomMasker
from mimkit.models import MAEDecoder, PromptingDecoder
from mimkit.models.cls_pretraining import ClassTokenBlocks, ClassTokenPretraining
from mimkit.models.linear_head import LinearHead
from mimkit.targets import patch_loss

SMALL = dict(img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro")
RECIPE = "configs/mae_vit_tiny_fmnist.yaml"
TEACHER = ["target.teacher.spec=efficientnet_lite0", "target.teacher.input_size=128"]


def fmnist(count: int = 4) -> torch.Tensor:
    raw, _ = load_fashion_mnist(split="test")
    return (resize_uint8(raw[:count], 32).float() / 255 - 0.286) / 0.353  # (B, 1, 32, 32)


def beit_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vit_tiny", **{**SMALL, "encoder_sees": "all", "head": "linear", **overrides}).eval()


def patch_pixels(images: torch.Tensor, index: int, value: float) -> torch.Tensor:
    """A copy of ``images`` with patch ``index`` of the 8x8 grid (4x4 pixels) set to ``value``."""
    row, col = divmod(index, 8)
    out = images.clone()
    out[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = value
    return out


def test_beit_encoder_output_at_a_hidden_patch_ignores_its_pixels_and_follows_the_mask_embedding() -> None:
    model = beit_model()
    images = fmnist(2)
    spec = RandomMasker(0.5)(2, model.grid, generator=torch.Generator().manual_seed(1))
    hidden = int(spec.mask[0].nonzero()[0])
    visible = int((~spec.mask[0]).nonzero()[0])
    with torch.no_grad():
        base = model.encoder(images, spec).patch_tokens  # (B, L, D): every patch, raster order
        changed_hidden = model.encoder(patch_pixels(images, hidden, 3.0), spec).patch_tokens
        changed_visible = model.encoder(patch_pixels(images, visible, 3.0), spec).patch_tokens
        model.encoder.mask_token.add_(torch.randn(64, generator=torch.Generator().manual_seed(2)))
        new_embedding = model.encoder(images, spec).patch_tokens
    assert base.shape == (2, 64, 64)
    assert torch.equal(base[0], changed_hidden[0])  # nothing in image 0 depends on a pixel it hides
    assert not torch.allclose(base[0, visible], changed_visible[0, visible], atol=1e-3)
    assert not torch.allclose(base[0, hidden], new_embedding[0, hidden], atol=1e-3)


def test_beit_encoder_unmasked_is_the_plain_vit() -> None:
    model = beit_model()
    plain = create_model("vit_tiny", **SMALL).eval()
    plain.encoder.load_state_dict(
        {key: value for key, value in model.encoder.state_dict().items() if key != "mask_token"}
    )
    images = fmnist(3)
    with torch.no_grad():
        assert torch.equal(model.encoder.forward_features(images), plain.encoder.forward_features(images))


def test_linear_head_has_one_fc_layer_and_predicts_every_patch() -> None:
    model = beit_model()
    target_dim = 16  # 4x4 pixels of one channel
    assert isinstance(model.decoder, LinearHead)
    assert sum(p.numel() for p in model.decoder.parameters()) == 64 * target_dim + target_dim
    out = model.train()(fmnist(4), generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (4, 64, target_dim)
    out.loss.backward()
    assert model.encoder.mask_token.grad is not None and model.encoder.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_linear_head_after_a_visible_only_encoder_is_refused() -> None:
    model = create_model("vit_tiny", **SMALL)
    head = LinearHead(64, 16)
    spec = RandomMasker(0.75)(2, model.grid)
    try:
        head(model.encoder(fmnist(2), spec), spec)
    except ValueError as err:
        assert "encoder_sees" in str(err)
    else:
        raise AssertionError("a linear head on 16 of 64 tokens must be refused")


def test_loss_on_all_is_the_mean_over_every_patch() -> None:
    images = fmnist(4)
    spec = RandomMasker(0.75)(4, (8, 8), generator=torch.Generator().manual_seed(0))
    for sees in ("visible", "all"):
        torch.manual_seed(0)
        model = create_model("vit_tiny", **SMALL, encoder_sees=sees, loss_on="all").eval()
        with torch.no_grad():
            out = model(images, mask=spec)
            per_patch = patch_loss(out.pred, model.target.targets(images), "mse")  # (B, L)
            model.loss_on = "hidden"
            hidden = model(images, mask=spec).loss
        assert torch.allclose(out.loss, per_patch.mean(), atol=1e-6)
        assert torch.allclose(hidden, per_patch[spec.mask].mean(), atol=1e-6)
        assert not torch.allclose(out.loss, hidden)


def test_mask_token_in_the_encoder_with_the_mae_decoder() -> None:
    """MAE's ablation: the encoder sees every patch ([M] in the encoder); the decoder adds no mask tokens."""
    torch.manual_seed(0)
    model = create_model("vit_tiny", **SMALL, encoder_sees="all").eval()
    assert isinstance(model.decoder, MAEDecoder)
    images = fmnist(2)
    spec = RandomMasker(0.75)(2, model.grid, generator=torch.Generator().manual_seed(3))
    hidden = int(spec.mask[0].nonzero()[0])
    with torch.no_grad():
        out = model(images, mask=spec)
        again = model(patch_pixels(images, hidden, 3.0), mask=spec)
    assert out.pred.shape == (2, 64, 16)
    assert torch.equal(out.pred[0], again.pred[0])  # the hidden pixels of image 0 reach none of its predictions
    assert torch.equal(model.decoder_mask(spec).mask, torch.zeros_like(spec.mask))


def test_class_token_head_on_the_beit_encoder_shares_the_fc_layer() -> None:
    model = beit_model(cls_enabled=True, cls_layer=0).train()
    assert isinstance(model.decoder, ClassTokenPretraining)
    assert isinstance(model.decoder.head, ClassTokenBlocks)
    assert model.decoder.head.pred is model.decoder.decoder.pred
    assert model.decoder.head.blocks[0].attn.num_heads == 2  # the encoder's heads (BEiT v2: encoder blocks)
    out = model(fmnist(4), generator=torch.Generator().manual_seed(0))
    assert set(out.extras) == {"main_loss", "aux_loss"}
    assert torch.allclose(out.loss, out.extras["main_loss"] + out.extras["aux_loss"])
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.head.blocks.parameters())
    assert model.encoder.cls_token.grad.abs().sum() > 0  # only the class-token head reads the final class token


def test_recipes_resolve_their_design_and_old_run_configs_keep_theirs() -> None:
    def design(*overrides: str) -> tuple[str | None, str | None]:
        config = load_config(RECIPE, list(overrides))
        return config.model.encoder_sees, config.model.head

    assert design() == ("visible", "mae")
    assert design("target.type=maskdistill", *TEACHER) == ("all", "linear")
    assert design("target.type=milan", *TEACHER) == ("visible", "prompting")
    assert design("target.type=maskdistill", *TEACHER, "model.head=mae") == ("visible", "mae")
    assert design("target.type=maskdistill", *TEACHER, "model.encoder_sees=visible") == ("visible", "mae")
    old = load_config(RECIPE, ["target.type=maskdistill", *TEACHER]).to_dict()
    del old["model"]["head"], old["model"]["encoder_sees"]  # a run saved before the switches existed
    rebuilt = config_from_dict(old)
    assert (rebuilt.model.encoder_sees, rebuilt.model.head) == ("visible", "mae")
    for bad, key in (("model.head=linear", "model.head"), ("model.encoder_sees=everything", "model.encoder_sees")):
        try:
            load_config(RECIPE, [bad, "model.encoder_sees=visible"] if "head" in bad else [bad])
        except ValueError as err:
            assert key in str(err)
        else:
            raise AssertionError(f"{bad} must be refused")


def test_each_milan_switch_changes_exactly_its_part() -> None:
    milan = [
        "target.type=milan",
        *TEACHER,
        "mask.type=attention",
        "mask.attention.mode=keep",
        "mask.attention.source=teacher",
    ]

    def parts(*overrides: str) -> tuple[type, type, str, str]:
        model = build_model(load_config(RECIPE, [*milan, *overrides]))
        return type(model.decoder), type(model.masker), model.target.loss, model.config["target"]

    recipe = parts()
    assert recipe == (PromptingDecoder, AttentionMasker, "cosine", "milan")
    assert parts("model.head=mae") == (MAEDecoder, *recipe[1:])
    assert parts("mask.type=random") == (recipe[0], RandomMasker, *recipe[2:])
    assert parts("target.loss=smooth_l1") == (*recipe[:2], "smooth_l1", recipe[3])


def test_checkpoints_of_either_mode_round_trip_and_export_to_timm(tmp_path) -> None:
    images = fmnist(3)
    spec = RandomMasker(0.75)(3, (8, 8), generator=torch.Generator().manual_seed(0))
    peer = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64,
        num_heads=2, num_classes=0, global_pool="token",
    ).eval()  # fmt: skip
    for name, overrides in (("mae", {}), ("beit", {"encoder_sees": "all", "head": "linear"})):
        torch.manual_seed(0)
        model = create_model("vit_tiny", **SMALL, **overrides).eval()
        path = save_checkpoint_as(model, tmp_path / f"{name}.pt", "mimkit")
        loaded = load_checkpoint(path).eval()
        with torch.no_grad():
            assert torch.equal(model(images, mask=spec).pred, loaded(images, mask=spec).pred)
            peer.load_state_dict(encoder_to_timm(loaded.state_dict()), strict=True)
            theirs = peer.forward_features(images)[:, 0]
            assert torch.allclose(theirs, loaded.encoder.forward_features(images), atol=1e-5)


def test_masks_in_beit_mode_are_the_masker_s() -> None:
    """The frame masks a BEiT-style encoder with the configured masker, and a spec built from a boolean mask
    gives the same predictions as the masker's own spec with the same hidden patches."""
    model = beit_model()
    images = fmnist(2)
    spec = RandomMasker(0.6)(2, model.grid, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = model(images, mask=spec).pred
        b = model(images, mask=MaskSpec.from_mask(spec.mask)).pred
    assert torch.allclose(a, b, atol=1e-6)  # BEiT's encoder depends on which patches are hidden, not their order


def test_norm_features_switches_maskdistill_s_layernorm_only() -> None:
    images = fmnist(2)
    maskdistill = ["target.type=maskdistill", *TEACHER]
    normalized = build_model(load_config(RECIPE, maskdistill)).target
    raw = build_model(load_config(RECIPE, [*maskdistill, "target.norm_features=false"])).target
    assert normalized.normalize and not raw.normalize and raw.loss == normalized.loss == "smooth_l1"
    with torch.no_grad():
        features = raw.targets(images)  # (B, L, 112) as the teacher gives them
        expected = torch.nn.functional.layer_norm(features, (features.shape[-1],), eps=normalized.eps)
        assert torch.allclose(normalized.targets(images), expected, atol=1e-5)
    assert not features.mean(dim=-1).abs().lt(1e-3).all()  # the raw features are not already normalized
    try:
        load_config(RECIPE, ["target.norm_features=true"])
    except ValueError as err:
        assert "target.norm_features" in str(err)
    else:
        raise AssertionError("norm_features on pixels must be refused")


def test_mimdet_drops_the_tokens_it_does_not_sample_from_a_beit_encoder() -> None:
    from mimkit.dense.models.backbones import MIMDetBackbone

    model = beit_model()
    backbone = MIMDetBackbone(model.encoder, None, sample_ratio=0.5, fill="mask_token", stem="patch_embed").train()
    assert not any(key.endswith("encoder.mask_token") for key in backbone.state_dict())
    lengths = []
    hook = backbone.encoder.blocks[0].register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    maps = backbone(fmnist(2), generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert lengths == [1 + 32]  # the class token and half of the 64 patches: the others are dropped
    assert len(maps) == 4 and all(torch.isfinite(m).all() for m in maps.values())
