import pytest
import torch

from mimkit.masking import MaskSpec, RandomMasker, create_masker, num_hidden_patches


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
    with pytest.raises(ValueError, match="unknown mask.type"):
        create_masker("nope", 0.5)
