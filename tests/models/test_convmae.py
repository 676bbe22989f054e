from pathlib import Path

import pytest
import torch

from mimkit.build import create_model, load_checkpoint
from mimkit.checkpoints.load import save_checkpoint_as
from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
from mimkit.layers import ConvBlock, patchify, upsample_mask
from mimkit.masking import BlockMasker, MaskSpec, RandomMasker
from mimkit.models import MAEDecoder, model_args
from mimkit.models.convvit import ConvViT
from mimkit.models.mim import MaskedImageModel

SMALL = dict(img_size=32, in_chans=1, decoder="micro")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """16 real Fashion-MNIST test images at 32x32, standardised: (16, 1, 32, 32)."""
    raw, _ = load_fashion_mnist(split="test")
    pixels = resize_uint8(raw[:16], 32).float() / 255.0  # (16, 1, 32, 32)
    return (pixels - 0.286) / 0.353


def tiny(patch_sizes: tuple[int, int, int] = (2, 2, 2), **overrides) -> MaskedImageModel:
    return create_model("convmae_tiny", patch_sizes=patch_sizes, **{**SMALL, **overrides})


@pytest.mark.parametrize(
    ("name", "img_size", "patch_sizes", "dims", "grid"),
    [
        ("convmae_tiny", 32, (2, 2, 2), (32, 64, 128), (4, 4)),
        ("convmae_tiny", 32, (1, 2, 2), (32, 64, 128), (8, 8)),
        ("convmae_small", 64, (4, 2, 2), (128, 256, 384), (4, 4)),
        ("convmae_base", 224, (4, 2, 2), (256, 384, 768), (14, 14)),
    ],
)
def test_stage_shapes(name, img_size, patch_sizes, dims, grid) -> None:
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = create_model(name, img_size=img_size, patch_sizes=patch_sizes, in_chans=3)
        images = torch.empty(2, 3, img_size, img_size)
        enc = model.encoder(images)
        spec = RandomMasker(0.75)(2, model.grid, generator=torch.Generator().manual_seed(0)).to("meta")
        out = model(images, mask=spec)
    side1 = img_size // patch_sizes[0]
    side2 = side1 // patch_sizes[1]
    assert model.grid == grid and model.target.patch_size == img_size // grid[0]
    assert [tuple(f.shape) for f in enc.stage_features] == [
        (2, dims[0], side1, side1),
        (2, dims[1], side2, side2),
        (2, dims[2], *grid),
    ]
    length = grid[0] * grid[1]
    assert enc.num_prefix_tokens == 0 and enc.tokens.shape == (2, length, dims[2])
    assert out.pred.shape == (2, length, model.target.patch_size**2 * 3)
    assert model.encoder(images, spec).tokens.shape == (2, spec.num_visible, dims[2])


def test_registry_arguments_and_errors() -> None:
    args = model_args("convmae_base")
    assert (args["embed_dims"], args["depths"], args["num_heads"], args["patch_sizes"]) == (
        (256, 384, 768),
        (2, 2, 11),
        12,
        (4, 2, 2),
    )
    assert (args["kernel_size"], args["fuse"]) == (5, True)
    assert model_args("convmae_tiny", patch_sizes=[1, 2, 2])["patch_sizes"] == (1, 2, 2)
    with pytest.raises(ValueError, match="unknown model argument"):
        create_model("convmae_tiny", patch_size=4)
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        create_model("convmae_tiny", img_size=40)
    with pytest.raises(ValueError, match="one value per stage"):
        create_model("convmae_tiny", patch_sizes=(2, 2))
    with pytest.raises(ValueError, match="must be odd"):
        ConvBlock(8, kernel_size=4)


def test_upsampled_masks_align_with_the_stage3_mask() -> None:
    spec = BlockMasker(0.5)(3, (4, 5), generator=torch.Generator().manual_seed(1))
    for factor in (1, 2, 4):
        fine = upsample_mask(spec.mask, (4, 5), factor)  # (B, 1, 4f, 5f)
        assert fine.shape == (3, 1, 4 * factor, 5 * factor)
        rows = torch.arange(4 * factor)[:, None] // factor
        cols = torch.arange(5 * factor)[None, :] // factor
        assert torch.equal(fine[:, 0], spec.mask[:, rows * 5 + cols])
        # every factor x factor cell of the fine mask is uniform and equals its coarse patch
        cells = patchify(fine.float(), factor)  # (B, L, f*f)
        assert torch.equal(cells.amin(-1), spec.mask.float()) and torch.equal(cells.amax(-1), spec.mask.float())
    encoder = tiny(patch_sizes=(1, 2, 2)).encoder
    visible1, visible2 = encoder.visibility_maps(spec_on(encoder, seed=2))
    assert visible1.shape == (3, 1, 32, 32) and visible2.shape == (3, 1, 16, 16)
    assert torch.equal(visible1, visible2.repeat_interleave(2, 2).repeat_interleave(2, 3))


def spec_on(encoder: ConvViT, seed: int, batch: int = 3) -> MaskSpec:
    return BlockMasker(0.5)(batch, encoder.grid, generator=torch.Generator().manual_seed(seed))


def test_stage3_random_masks_hide_exactly_the_pixels_of_hidden_tokens() -> None:
    encoder = tiny(patch_sizes=(4, 2, 2), img_size=64).encoder  # ConvMAE's strides on a 4x4 grid
    spec = RandomMasker(0.75)(5, encoder.grid, generator=torch.Generator().manual_seed(0))
    assert spec.mask.sum(1).tolist() == [12] * 5
    hidden_pixels = spec.hidden_map(encoder.grid, encoder.patch_size)  # (B, 1, 64, 64)
    per_token = patchify(hidden_pixels.float(), encoder.patch_size)  # (B, L, 16*16)
    assert torch.equal(per_token.amin(-1), spec.mask.float()) and torch.equal(per_token.amax(-1), spec.mask.float())
    assert int(hidden_pixels.sum()) == 5 * 12 * 16 * 16
    visible1, visible2 = encoder.visibility_maps(spec)  # stage 1 at stride 4, stage 2 at stride 8
    assert torch.equal(visible1, 1.0 - hidden_pixels[:, :, ::4, ::4].float())
    assert torch.equal(visible2, 1.0 - hidden_pixels[:, :, ::8, ::8].float())


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("patch_sizes", [(2, 2, 2), (1, 2, 2)])
@pytest.mark.parametrize("masker", [RandomMasker(0.75), BlockMasker(0.5)], ids=["stage3_random", "beit_block"])
def test_hidden_pixels_never_reach_visible_outputs(images, fuse, patch_sizes, masker) -> None:
    encoder = tiny(patch_sizes=patch_sizes, fuse=fuse).encoder.eval()
    batch = images[:4]
    spec = masker(4, encoder.grid, generator=torch.Generator().manual_seed(3))
    hidden_pixels = upsample_mask(spec.mask, encoder.grid, encoder.patch_size)  # (B, 1, 32, 32)
    assert 0 < hidden_pixels.float().mean() < 1
    changed = torch.where(hidden_pixels, torch.randn_like(batch) * 5.0, batch)
    assert not torch.equal(changed, batch)
    with torch.no_grad():
        before = encoder(batch, spec)
        after = encoder(changed, spec)
        unmasked = encoder(batch)
    assert torch.equal(before.tokens, after.tokens)  # stage-3 (fused) visible tokens
    for factor, map_before, map_after in zip(
        encoder.stage_factors, before.stage_features, after.stage_features, strict=True
    ):
        visible = ~upsample_mask(spec.mask, encoder.grid, factor)  # (B, 1, H_i, W_i)
        assert torch.equal(map_before * visible, map_after * visible)
        assert torch.equal(map_before, map_after)  # hidden positions are zeroed, so equal too
        assert (map_before.masked_fill(visible, 0) == 0).all()
    # without a mask, the hidden pixels do matter: the test above is not vacuous
    assert not torch.equal(unmasked.stage_features[1], encoder(changed).stage_features[1])


def test_no_hidden_patch_equals_the_unmasked_pass(images) -> None:
    encoder = tiny(fuse=False).encoder.eval()
    spec = MaskSpec.from_mask(torch.zeros(4, encoder.num_patches, dtype=torch.bool))
    with torch.no_grad():
        masked, full = encoder(images[:4], spec), encoder(images[:4])
    assert torch.equal(masked.tokens, full.tokens)
    for map_masked, map_full in zip(masked.stage_features, full.stage_features, strict=True):
        assert torch.equal(map_masked, map_full)
    assert torch.allclose(encoder.forward_features(images[:4]), full.tokens.mean(1))
    with pytest.raises(ValueError, match="no class token"):
        encoder.forward_features(images[:4], pool="cls")


@pytest.mark.parametrize("fuse", [True, False])
def test_every_parameter_gets_a_gradient(images, fuse) -> None:
    model = tiny(fuse=fuse)
    model(images[:4], generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    assert frozen == {"encoder.pos_embed", "decoder.pos_embed"}
    fusion = {name for name, _ in model.named_parameters() if "output_decode" in name}
    assert bool(fusion) == fuse
    assert model.decoder.pos_embed.shape == (1, model.encoder.num_patches, model.decoder.embed_dim)


def test_decoder_refuses_a_prefix_mismatch(images) -> None:
    model = tiny()
    spec = spec_on(model.encoder, seed=0, batch=2)
    vit_style = MAEDecoder(model.grid, in_dim=128, out_dim=64, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="num_prefix_tokens=0"):
        vit_style(model.encoder(images[:2], spec), spec)


def test_tiny_convmae_overfits_eight_images(images) -> None:
    torch.manual_seed(0)
    model = tiny(depths=(1, 1, 2), decoder_depth=1)
    batch = images[:8]
    spec = RandomMasker(0.5)(8, model.grid, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = model(batch, mask=spec).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_checkpoint_round_trip(images, tmp_path) -> None:
    model = tiny(patch_sizes=(1, 2, 2), fuse=False, kernel_size=3).eval()
    path = save_checkpoint_as(model, tmp_path / "convmae.pt", "mimkit")
    loaded = load_checkpoint(path)
    assert isinstance(loaded.encoder, ConvViT) and loaded.config == model.config
    assert loaded.encoder.patch_sizes == (1, 2, 2) and not loaded.encoder.fuse
    spec = spec_on(model.encoder, seed=4, batch=4)
    with torch.no_grad():
        assert torch.equal(model(images[:4], mask=spec).pred, loaded(images[:4], mask=spec).pred)
        assert torch.equal(model.encoder(images[:4]).tokens, loaded.encoder(images[:4]).tokens)


def test_self_guided_masking_and_exploitation_rate_run_on_convmae() -> None:
    torch.manual_seed(0)
    images = torch.randn(4, 1, 32, 32)
    model = create_model(
        "convmae_tiny",
        img_size=32,
        in_chans=1,
        patch_sizes=(1, 2, 2),
        mask_type="self_guided",
        mask_options={"trigger": "epoch", "start_epoch": 0},
    )
    model.masker.update(step=0, total_steps=1, epoch=0.0)
    features = model.guidance(images, "decoder_features")
    assert features.shape[:2] == (4, 64)  # every patch, no class slot dropped by mistake
    spec = model.make_mask(4, generator=torch.Generator().manual_seed(0), images=images)
    assert spec.mask.sum(1).tolist() == [48] * 4
    rate = model.exploitation(images, spec)
    assert rate.per_layer.shape[1:] == (2, 2) and rate.visible > 0
    assert abs(rate.visible + rate.mask - 1.0) < 1e-6


@pytest.mark.parametrize("patch_sizes", [(1, 2, 2), (2, 2, 2)])
def test_fine_masks_leave_every_token_partly_visible_and_leak_nothing(images, patch_sizes) -> None:
    model = tiny(patch_sizes=patch_sizes, mask_type="fine_random", mask_ratio=0.75)
    encoder = model.encoder.eval()
    spec = model.make_mask(4, generator=torch.Generator().manual_seed(5))
    assert spec.fine_mask is not None and spec.fine_mask.shape[-1] == 32 // patch_sizes[0]
    # every stage-3 token keeps 4 of its 16 stage-1 cells, so the transformer sees all of them
    cells = patchify(spec.fine_mask[:, None].float(), 4)  # (B, L, 16) stage-1 cells per token
    assert (cells.sum(-1) == 12).all() and spec.num_visible == encoder.num_patches
    visible1, visible2 = encoder.visibility_maps(spec)
    assert torch.equal(visible1[:, 0], (~spec.fine_mask).float())
    # a stage-2 cell is visible when any of its 2x2 stage-1 cells is
    assert torch.equal(visible2, torch.nn.functional.max_pool2d(visible1, 2))
    assert visible2.mean() > visible1.mean()
    batch = images[:4]
    hidden_pixels = spec.hidden_map(encoder.grid, encoder.patch_size)  # (B, 1, 32, 32)
    assert float(hidden_pixels.float().mean()) == 0.75
    changed = torch.where(hidden_pixels, torch.randn_like(batch) * 5.0, batch)
    with torch.no_grad():
        before, after = encoder(batch, spec), encoder(changed, spec)
    assert before.tokens.shape == (4, encoder.num_patches, encoder.embed_dim)
    assert torch.equal(before.tokens, after.tokens)
    for map_before, map_after, visible in zip(
        before.stage_features[:2], after.stage_features[:2], (visible1, visible2), strict=True
    ):
        assert torch.equal(map_before, map_after) and (map_before * (1 - visible) == 0).all()
    with torch.no_grad():  # not vacuous: unmasked, the hidden pixels change the tokens
        assert not torch.equal(encoder(batch).tokens, encoder(changed).tokens)


def test_fine_mask_loss_is_taken_on_hidden_pixels_only(images) -> None:
    model = tiny(patch_sizes=(1, 2, 2), mask_type="fine_random").eval()
    target = model.target
    batch = images[:4]
    spec = model.make_mask(4, generator=torch.Generator().manual_seed(6))
    hidden = target.hidden_values(batch, spec)  # (B, L, 16)
    assert float(hidden.float().mean()) == 0.75
    pred = torch.randn(4, model.encoder.num_patches, target.dim)
    loss = target(batch, pred, spec)
    expected = ((pred - target.targets(batch)) ** 2)[hidden].mean()
    torch.testing.assert_close(loss, expected)
    # predictions of visible pixels do not count, those of hidden pixels do
    assert torch.equal(target(batch, torch.where(hidden, pred, pred + 3.0), spec), loss)
    assert not torch.equal(target(batch, torch.where(hidden, pred + 3.0, pred), spec), loss)
    # a stage-3 mask seen pixel by pixel gives the per-patch loss
    coarse = RandomMasker(0.75)(4, model.grid, generator=torch.Generator().manual_seed(7))
    per_pixel = ((pred - target.targets(batch)) ** 2)[target.hidden_values(batch, coarse)].mean()
    torch.testing.assert_close(target(batch, pred, coarse), per_pixel)
    # and training on it runs: every parameter but the decoder's mask token (no patch is dropped) learns
    model.train()
    model(batch, mask=spec).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad and name != "decoder.mask_token":
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_fine_masks_are_refused_where_they_cannot_be_scored() -> None:
    with pytest.raises(ValueError, match="needs ConvMAE"):
        create_model("vit_tiny", img_size=32, patch_size=4, in_chans=1, mask_type="fine_random")
    with pytest.raises(ValueError, match="cosine"):
        model = tiny(mask_type="fine_random", loss="cosine")
        model(torch.randn(2, 1, 32, 32), generator=torch.Generator().manual_seed(0))


def perturb_fusion(encoder: ConvViT) -> None:
    with torch.no_grad():
        for module in encoder.fusion_layers():
            for param in module.parameters():
                param.add_(torch.randn_like(param))


def test_fusion_feeds_only_the_pretraining_decoder(images) -> None:
    from mimkit.dense import ConvMAEBackbone
    from mimkit.eval.finetune import Classifier

    torch.manual_seed(0)
    model = tiny(patch_sizes=(1, 2, 2), depths=(1, 1, 2)).eval()
    encoder = model.encoder
    batch = images[:4]
    spec = RandomMasker(0.75)(4, model.grid, generator=torch.Generator().manual_seed(0))
    classifiers = [Classifier(encoder, 10).eval(), Classifier(encoder, 10, trainable_blocks=1).eval()]
    backbone = ConvMAEBackbone(encoder)

    def downstream() -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                encoder.forward_features(batch),
                *encoder(batch).stage_features,
                encoder.stem(batch),
                *(classifier(batch) for classifier in classifiers),
                *backbone(batch).values(),
            ]

    def pretraining() -> torch.Tensor:
        with torch.no_grad():
            return model(batch, mask=spec).pred

    down, pred = downstream(), pretraining()
    perturb_fusion(encoder)
    for before, after in zip(down, downstream(), strict=True):
        assert torch.equal(before, after)
    assert not torch.allclose(pred, pretraining(), atol=1e-3)
    for module in encoder.fusion_layers():  # frozen downstream, so every trained parameter gets a gradient
        assert not any(param.requires_grad for param in module.parameters())


def test_checkpoints_written_before_the_fusion_split_still_load(images) -> None:
    """A checkpoint written by mimkit at commit c5b0b4c, when the fusion also ran downstream: it loads
    strictly, reproduces its pretraining output exactly, and its downstream features are now the stage-3
    tokens without the fusion."""
    data = Path(__file__).parent / "data"
    model = load_checkpoint(data / "convmae_fused_c5b0b4c.pt").eval()
    saved = torch.load(data / "convmae_fused_c5b0b4c_outputs.pt", weights_only=True)
    assert model.encoder.fuse and len(model.encoder.fusion_layers()) == 2
    spec = MaskSpec.from_mask(saved["mask"])
    with torch.no_grad():
        out = model(saved["images"], mask=spec)
        features = model.encoder.forward_features(saved["images"])
    torch.testing.assert_close(out.pred, saved["pred"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, saved["loss"], rtol=0, atol=1e-6)
    assert not torch.allclose(features, saved["fused_features"], atol=1e-3)
    perturb_fusion(model.encoder)
    with torch.no_grad():
        assert torch.equal(model.encoder.forward_features(saved["images"]), features)
