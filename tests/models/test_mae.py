import pytest
import torch

from mimkit.build import create_model
from mimkit.layers import patchify
from mimkit.models import model_args


def tiny(**kw):
    args = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, decoder="micro")
    args.update(kw)
    return create_model("vit_tiny", **args)


@pytest.mark.parametrize("chans", [1, 3])
def test_shapes_and_visible_only_encoder(chans: int) -> None:
    model = tiny(in_chans=chans)
    images = torch.randn(3, chans, 16, 16)
    out = model(images, generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (3, 16, 16 * chans)
    assert out.mask.shape == (3, 16) and (out.mask.sum(1) == 12).all()
    enc = model.encoder(images, out.spec)
    assert enc.tokens.shape == (3, 1 + 4, 32)  # class token + 4 visible patches
    assert model.encoder(images).tokens.shape == (3, 17, 32)


def test_every_parameter_gets_a_gradient() -> None:
    model = tiny()
    model(torch.randn(2, 1, 16, 16), generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.pos_embed", "decoder.pos_embed"}


def test_loss_only_on_hidden_patches() -> None:
    model = tiny(norm_pix=False)
    images = torch.randn(2, 1, 16, 16)
    noise = torch.rand(2, 16)
    out = model(images, noise)
    target = patchify(images, 4)
    per_patch = ((out.pred - target) ** 2).mean(-1)
    assert torch.allclose(out.loss, per_patch[out.mask].mean())
    # changing predictions of visible patches cannot change the loss
    pred = out.pred.detach().clone()
    pred[~out.mask] += 100.0
    assert torch.allclose(model.target(images, pred, out.spec), out.loss.detach())


def test_norm_pix_target_is_per_patch_standardised() -> None:
    model = tiny()
    targets = model.target.targets(torch.rand(2, 1, 16, 16) * 5 + 3)
    assert torch.allclose(targets.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(targets.std(-1), torch.ones(2, 16), atol=1e-3)


def test_noise_decides_mask_like_mae() -> None:
    model = tiny()
    noise = torch.rand(2, 16)
    out = model(torch.randn(2, 1, 16, 16), noise)
    keep = torch.argsort(noise, 1)[:, :4]
    assert torch.equal(out.spec.ids_keep, keep)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(2, 1, 16, 16), torch.rand(2, 15))


def test_registry_presets_and_errors() -> None:
    args = model_args("vit_base")
    assert (args["embed_dim"], args["depth"], args["num_heads"]) == (768, 12, 12)
    assert (args["decoder_embed_dim"], args["decoder_depth"], args["decoder_num_heads"]) == (512, 8, 16)
    assert model_args("vit_large")["embed_dim"] == 1024 and model_args("vit_huge")["patch_size"] == 14
    assert model_args("vit_tiny", decoder="tiny", decoder_depth=2)["decoder_depth"] == 2
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_gigantic")
    with pytest.raises(ValueError, match="unknown model argument"):
        create_model("vit_tiny", embed_dims=3)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_model("vit_tiny", img_size=30, patch_size=4)


@pytest.mark.parametrize("name", ["vit_tiny", "convmae_tiny"])
def test_a_resized_model_equals_one_built_at_that_size(name: str) -> None:
    """set_img_size (transfer at another resolution): the same weights, and position tables identical to a
    model constructed for the new grid, so outputs match it exactly."""
    kwargs = {"img_size": 32, "depth": 2, "patch_size": 8} if name == "vit_tiny" else {"img_size": 32}
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    model.set_img_size(64)
    built = create_model(name, **{**kwargs, "img_size": 64})
    built.load_state_dict(model.state_dict())  # shapes agree: the pos tables were resized
    assert model.config == built.config and model.grid == built.grid == (model.grid[0], model.grid[0])
    for part in ("encoder", "decoder"):
        mine, theirs = getattr(model, part).pos_embed, getattr(built, part).pos_embed
        assert torch.equal(mine, theirs) and not mine.requires_grad
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.encoder(images).tokens, built.encoder(images).tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not divisible"):
        model.set_img_size(60)
