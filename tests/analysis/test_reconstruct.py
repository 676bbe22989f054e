"""Reconstruction panels and PNG grids on real Fashion-MNIST images with a small real model."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.analysis.reconstruct import assemble_panels, fill_value, reconstruct, save_reconstruction_grid
from mimkit.build import create_model

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = (0.2860,), (0.3530,)
PATCH = 4


def read_idx(path: Path, limit: int) -> np.ndarray:
    """The first ``limit`` items of a gzipped idx file (big-endian dims after a 4-byte magic)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)[:limit]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    pixels = torch.from_numpy(read_idx(FMNIST / "t10k-images-idx3-ubyte.gz", 6).copy())  # (6, 28, 28) uint8
    return (pixels[:, None].float() / 255 - MEAN[0]) / STD[0]  # (6, 1, 28, 28)


def small_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=28, patch_size=PATCH, in_chans=1, depth=2, decoder="micro", mask_ratio=0.75)
    return create_model("vit_tiny", **{**args, **overrides})


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return small_model()


def pixel_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, L) patch mask -> (B, 1, H, W) pixel mask."""
    per_patch = mask.view(-1, *grid)  # (B, gh, gw)
    return per_patch.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)[:, None]


def test_panels_paste_and_grey_out_exactly(model, images):
    result = reconstruct(model, images, generator=torch.Generator().manual_seed(0), mean=MEAN, std=STD)
    hidden = pixel_mask(result["mask"], model.grid)  # (B, 1, H, W)
    visible = ~hidden
    assert result["mask"].sum(dim=1).tolist() == [37] * 6  # round(0.75 * 49)
    assert torch.equal(result["original"], images)
    assert torch.equal(result["pasted"][visible], images[visible])
    assert torch.equal(result["pasted"][hidden], result["reconstruction"][hidden])
    assert torch.equal(result["masked"][visible], images[visible])
    grey = fill_value(1, MEAN, STD)
    assert torch.equal(result["masked"][hidden], grey.expand(int(hidden.sum())))
    assert torch.allclose(result["masked"][hidden] * STD[0] + MEAN[0], torch.tensor(0.5), atol=1e-6)
    # An untrained model does not reproduce the hidden pixels, so the panels really differ there.
    assert not torch.allclose(result["reconstruction"][hidden], images[hidden], atol=1e-2)
    assert bool(result["norm_pix"])
    assert not any(value.requires_grad for value in result.values())


@pytest.mark.parametrize("norm_pix", [True, False])
def test_perfect_prediction_reconstructs_the_images(images, norm_pix):
    model = small_model(norm_pix=norm_pix)
    mask = model.make_mask(images.shape[0], generator=torch.Generator().manual_seed(1)).mask
    pred = model.target.targets(images)  # (B, L, p*p*C), per-patch normalized when norm_pix
    panels = assemble_panels(images, pred, mask, model.target, fill_value(1))
    assert torch.allclose(panels["reconstruction"], images, atol=1e-5)
    assert torch.allclose(panels["pasted"], images, atol=1e-5)
    hidden = pixel_mask(mask, model.grid)
    assert torch.equal(panels["masked"][hidden], torch.zeros(int(hidden.sum())))  # no mean/std: data mean


def test_reconstruction_error_equals_the_models_loss(images):
    """Same seed -> same mask and predictions as the training forward; its loss is the hidden-pixel MSE."""
    model = small_model(norm_pix=False).eval()
    result = reconstruct(model, images, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(result["mask"], out.mask)
    hidden = pixel_mask(result["mask"], model.grid)
    error = (result["reconstruction"] - images)[hidden].pow(2).mean()
    assert torch.allclose(error, out.loss, rtol=1e-5)


def test_mask_ratio_override_leaves_the_models_masker_alone(model, images):
    masker = model.masker
    result = reconstruct(model, images, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert result["mask"].sum(dim=1).tolist() == [24] * 6  # round(0.5 * 49)
    assert model.masker is masker and model.masker.ratio == 0.75
    assert reconstruct(model, images)["mask"].sum(dim=1).tolist() == [37] * 6


def test_runs_in_eval_mode_and_restores_the_training_flag(images):
    model = small_model(drop_path_rate=0.5).train()  # drop path would make train-mode outputs random
    first = reconstruct(model, images, generator=torch.Generator().manual_seed(0))
    second = reconstruct(model, images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first["reconstruction"], second["reconstruction"])
    assert all(module.training for module in model.modules())
    model.eval()
    reconstruct(model, images)
    assert not any(module.training for module in model.modules())


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_grid_png_has_one_row_per_image(model, images, tmp_path):
    result = reconstruct(model, images, generator=torch.Generator().manual_seed(0))
    few = {key: value[:2] if value.ndim else value for key, value in result.items()}
    wide = save_reconstruction_grid(few, tmp_path / "two.png", MEAN, STD, title="epoch 0")
    tall = save_reconstruction_grid(result, tmp_path / "deep" / "six.png", MEAN, STD)
    (wide_w, wide_h), (tall_w, tall_h) = png_size(wide), png_size(tall)
    assert wide_w == tall_w
    assert wide_w > wide_h  # 2 rows of 4 columns
    assert tall_h > tall_w  # 6 rows of 4 columns
    row_height = (tall_h - wide_h) / 4  # four more rows
    assert wide_w / 4 <= row_height <= 1.1 * wide_w / 4  # square cells for square images, plus a small gap
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "six.png", "two.png"]  # no temporary files


def test_grid_is_grey_for_one_channel_and_colour_for_three(tmp_path):
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 28, 28)
    rgb[:, 0] = 1.0  # red-saturated images cannot come out grey
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    normalized = (rgb - 0.5) / 0.25
    model = small_model(in_chans=3)
    grey_path = save_reconstruction_grid(reconstruct(small_model(), normalized[:, :1]), tmp_path / "g.png", MEAN, STD)
    rgb_path = save_reconstruction_grid(reconstruct(model, normalized), tmp_path / "rgb.png", mean, std)
    grey_png = np.asarray(Image.open(grey_path).convert("RGB"))  # (H, W, 3)
    rgb_png = np.asarray(Image.open(rgb_path).convert("RGB"))
    assert (grey_png[..., 0] == grey_png[..., 1]).all() and (grey_png[..., 1] == grey_png[..., 2]).all()
    assert (rgb_png[..., 0].astype(int) - rgb_png[..., 2].astype(int)).max() > 100


def test_failed_save_keeps_the_previous_picture(model, images, tmp_path):
    result = reconstruct(model, images[:2])
    path = save_reconstruction_grid(result, tmp_path / "recon.png", MEAN, STD)
    good = path.read_bytes()
    with pytest.raises(ValueError):
        # Invalid mathtext fails while the PNG is being rendered into the temporary file.
        save_reconstruction_grid(result, path, MEAN, STD, title=r"$\notacommand$")
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["recon.png"]
    with pytest.raises(OSError):
        save_reconstruction_grid(result, path / "inside_a_file.png", MEAN, STD)  # parent is a file
    assert path.read_bytes() == good


def test_rejects_images_it_cannot_draw(model, images, tmp_path):
    result = reconstruct(model, images[:1])
    two_channels = {**result, "original": result["original"].expand(-1, 2, -1, -1)}
    with pytest.raises(ValueError, match="1- or 3-channel"):
        save_reconstruction_grid(two_channels, tmp_path / "x.png", MEAN, STD)
    assert not (tmp_path / "x.png").exists()


def test_hidden_patches_are_mid_grey_in_every_channel():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # different per channel: catches a wrong fill order
    model = small_model(in_chans=3)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    result = reconstruct(model, images, mean=mean, std=std)
    hidden = pixel_mask(result["mask"], model.grid).expand(-1, 3, -1, -1)  # (B, 3, H, W)
    shown = result["masked"] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert torch.allclose(shown[hidden], torch.tensor(0.5), atol=1e-6)
    assert torch.equal(result["masked"][~hidden], images[~hidden])


def test_grid_draws_hidden_patches_mid_grey_even_without_mean_and_std(model, images, tmp_path):
    result = reconstruct(model, images[:1], generator=torch.Generator().manual_seed(0))  # fill: the data mean
    path = save_reconstruction_grid(result, tmp_path / "one.png", MEAN, STD, cell_inches=2.0)
    picture = np.asarray(Image.open(path).convert("L")).astype(int)  # (H, W)
    quarter = picture.shape[1] // 4
    mid_grey = [int((abs(picture[:, i * quarter : (i + 1) * quarter] - 127.5) < 1).sum()) for i in range(4)]
    cell_area = (2.0 * 100) ** 2
    assert mid_grey[1] > 0.5 * (37 / 49) * cell_area  # the masked column
    assert max(mid_grey[0], mid_grey[2], mid_grey[3]) < 0.05 * cell_area
