import pytest
import torch

from mimkit.masking import FineRandomMasker, MaskSpec, RandomMasker, create_masker, num_hidden_patches


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(8, 8), (7, 7), (3, 5)])
def test_exact_hidden_count_and_inverse_permutation(ratio: float, grid: tuple[int, int]) -> None:
    spec = RandomMasker(ratio)(16, grid, generator=torch.Generator().manual_seed(0))
    num_patches = grid[0] * grid[1]
    hidden = num_hidden_patches(num_patches, ratio)
    assert spec.mask.dtype == torch.bool
    assert (spec.mask.sum(1) == hidden).all()
    assert spec.ids_keep.shape == (16, num_patches - hidden)
    assert not spec.mask.gather(1, spec.ids_keep).any()  # kept patches are visible
    shuffle = torch.argsort(spec.ids_restore, dim=1)
    assert torch.equal(torch.argsort(shuffle, dim=1), spec.ids_restore)
    assert torch.equal(shuffle[:, : spec.num_visible], spec.ids_keep)
    assert (torch.sort(shuffle, 1).values == torch.arange(num_patches)).all()


def test_same_seed_same_mask_and_per_sample_independence() -> None:
    masker = RandomMasker(0.75)
    a = masker(8, (8, 8), generator=torch.Generator().manual_seed(3))
    b = masker(8, (8, 8), generator=torch.Generator().manual_seed(3))
    c = masker(8, (8, 8), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.mask, c.mask)
    assert len({tuple(row.tolist()) for row in a.mask}) == 8


def test_masks_are_uniform_over_positions() -> None:
    spec = RandomMasker(0.75)(4000, (4, 4), generator=torch.Generator().manual_seed(0))
    freq = spec.mask.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.03)


def test_from_noise_keeps_smallest_noise() -> None:
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    spec = MaskSpec.from_noise(noise, 2)
    assert spec.ids_keep.tolist() == [[1, 3]]
    assert spec.mask.tolist() == [[True, False, True, False]]


def test_from_mask_round_trip_and_errors() -> None:
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    spec = MaskSpec.from_mask(mask)
    assert spec.ids_keep.tolist() == [[1, 3], [0, 1]]
    assert torch.equal(spec.ids_restore >= 2, mask)
    with pytest.raises(ValueError, match="same number"):
        MaskSpec.from_mask(torch.tensor([[True, False], [True, True]]))


def test_bad_ratio_and_type() -> None:
    with pytest.raises(ValueError, match="mask ratio"):
        RandomMasker(1.0)
    with pytest.raises(ValueError, match=r"unknown mask\.type"):
        create_masker("nope", 0.5)


@pytest.mark.parametrize(("ratio", "factor"), [(0.75, 4), (0.5, 2), (0.9, 4), (0.6, 3)])
def test_fine_masks_hide_the_ratio_inside_every_patch(ratio: float, factor: int) -> None:
    grid = (3, 5)
    spec = FineRandomMasker(ratio, factor=factor)(6, grid, generator=torch.Generator().manual_seed(0))
    assert spec.fine_mask is not None and spec.fine_mask.shape == (6, 3 * factor, 5 * factor)
    cells = spec.fine_mask.reshape(6, 3, factor, 5, factor).permute(0, 1, 3, 2, 4).reshape(6, 15, -1)  # (B, L, f*f)
    hidden = round(ratio * factor * factor)
    assert (cells.sum(-1) == hidden).all() and hidden < factor * factor  # every patch stays partly visible
    assert not spec.mask.any() and spec.num_visible == 15  # so no patch is dropped
    assert torch.equal(spec.ids_keep, torch.arange(15).expand(6, -1))
    # the patch-grid view of the fine mask: nothing hidden at factor 1, the cells themselves at factor f
    assert not spec.hidden_map(grid, 1).any()
    assert torch.equal(spec.hidden_map(grid, factor)[:, 0], spec.fine_mask)
    assert torch.equal(spec.hidden_map(grid, 2 * factor)[:, 0, ::2, ::2], spec.fine_mask)


def test_fine_masks_are_seeded_independent_and_uniform() -> None:
    masker = create_masker("fine_random", 0.75, factor=4)
    a = masker(500, (2, 2), generator=torch.Generator().manual_seed(3))
    b = masker(500, (2, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.fine_mask, b.fine_mask)
    assert len({tuple(row.flatten().tolist()) for row in a.fine_mask[:20]}) == 20
    freq = a.fine_mask.float().mean(0)  # (8, 8): every cell hidden about 3/4 of the time
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.07)
    assert len(a.rows(slice(0, 3)).fine_mask) == 3


def test_fine_masks_refuse_a_ratio_that_hides_whole_patches() -> None:
    with pytest.raises(ValueError, match="hides all 16 cells"):
        FineRandomMasker(0.98, factor=4)
    with pytest.raises(ValueError, match="at least 2"):
        FineRandomMasker(0.75, factor=1)


def test_a_fine_mask_hides_a_patch_only_when_all_its_cells_are() -> None:
    fine = torch.zeros(1, 4, 4, dtype=torch.bool)
    fine[0, :2, :2] = True  # patch (0, 0) wholly hidden
    fine[0, 2, 3] = True  # one cell of patch (1, 1)
    spec = MaskSpec.from_fine_mask(fine, (2, 2))
    assert spec.mask.tolist() == [[True, False, False, False]] and spec.ids_keep.tolist() == [[1, 2, 3]]
    coarse = spec.hidden_map((2, 2), 1)[0, 0]  # a patch with any visible cell is visible
    assert coarse.tolist() == [[True, False], [False, False]]
    with pytest.raises(ValueError, match="does not refine"):
        MaskSpec.from_fine_mask(torch.zeros(1, 4, 5, dtype=torch.bool), (2, 2))
