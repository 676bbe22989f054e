import pytest
import torch

from mimkit.config import ConfigError, load_config
from mimkit.masking import MASKERS, GridMasker, create_masker


def visible_offsets(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H/2, W/2, 2, 2) visibility of each 2x2 cell, from a (B, L) mask."""
    height, width = grid
    visible = ~mask.view(-1, height // 2, 2, width // 2, 2)  # (B, H/2, 2, W/2, 2)
    return visible.permute(0, 1, 3, 2, 4)


@pytest.mark.parametrize("grid", [(2, 2), (8, 8), (14, 14), (4, 6)])
@pytest.mark.parametrize("batch", [1, 5])
def test_top_left_of_every_cell_is_kept(grid: tuple[int, int], batch: int) -> None:
    spec = GridMasker()(batch, grid, generator=torch.Generator().manual_seed(0))
    num_patches = grid[0] * grid[1]
    assert spec.mask.shape == (batch, num_patches) and spec.mask.dtype == torch.bool
    assert (spec.mask.sum(1) == 3 * num_patches // 4).all()
    cells = visible_offsets(spec.mask, grid)
    assert (cells.sum((-1, -2)) == 1).all()  # exactly one visible patch per 2x2 cell
    assert cells[..., 0, 0].all()  # ... the top-left one
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    expected_keep = (rows * grid[1] + cols)[(rows % 2 == 0) & (cols % 2 == 0)]  # raster order
    assert torch.equal(spec.ids_keep, expected_keep.expand(batch, -1))
    shuffle = torch.argsort(spec.ids_restore, dim=1)
    assert torch.equal(shuffle.gather(1, spec.ids_restore), torch.arange(num_patches).expand(batch, -1))
    assert torch.equal(shuffle[:, : spec.num_visible], spec.ids_keep)
    assert torch.equal(spec.ids_restore >= spec.num_visible, spec.mask)


def test_random_offset_is_one_position_per_image_and_reproducible() -> None:
    masker = GridMasker(random_offset=True)
    grid = (8, 8)
    a = masker(400, grid, generator=torch.Generator().manual_seed(1))
    b = masker(400, grid, generator=torch.Generator().manual_seed(1))
    c = masker(400, grid, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.mask, c.mask)
    cells = visible_offsets(a.mask, grid)  # (B, 4, 4, 2, 2)
    assert (cells.sum((-1, -2)) == 1).all()
    assert (cells == cells[:, :1, :1]).all()  # the same offset in every cell of an image
    offset_counts = cells[:, 0, 0].reshape(-1, 4).float().sum(0)  # how often each of the 4 offsets appears
    assert (offset_counts > 60).all(), offset_counts
    assert (a.mask.sum(1) == 48).all()
    assert (a.ids_keep[:, 1:] > a.ids_keep[:, :-1]).all()


def test_default_is_deterministic_without_offset() -> None:
    a = GridMasker()(3, (8, 8), generator=torch.Generator().manual_seed(1))
    b = GridMasker()(3, (8, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.0, 0.9])
def test_rejects_other_ratios(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"ratio is 0\.75"):
        GridMasker(ratio)
    with pytest.raises(ValueError, match=r"ratio is 0\.75"):
        create_masker("grid", ratio)


@pytest.mark.parametrize("grid", [(7, 7), (8, 7), (7, 8), (1, 2)])
def test_rejects_odd_grids(grid: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=f"even patch grid.*{grid[0]}x{grid[1]}"):
        GridMasker()(2, grid)


def test_registry_and_config() -> None:
    assert MASKERS["grid"] is GridMasker
    masker = create_masker("grid", 0.75, random_offset=True)
    assert isinstance(masker, GridMasker) and masker.random_offset
    assert load_config(None, ["mask.type=grid"]).mask.type == "grid"
    assert load_config(None, ["mask.type=block", "mask.ratio=0.4"]).mask.type == "block"
    with pytest.raises(ConfigError, match=r"^mask\.ratio: .*ratio is 0.75; got 0.5"):
        load_config(None, ["mask.type=grid", "mask.ratio=0.5"])
    with pytest.raises(ConfigError, match=r"^mask\.type: .*even patch grid.*7x7"):
        load_config(None, ["mask.type=grid", "model.img_size=28"])
