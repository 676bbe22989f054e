from collections import deque

import pytest
import torch

from mimkit.build import create_model
from mimkit.masking import BlockMasker, MaskSpec, RandomMasker, create_masker, num_hidden_patches


def check_spec(spec: MaskSpec, batch: int, num_patches: int, num_hidden: int) -> None:
    """Exact hidden count; ids_keep = visible patches in raster order; ids_restore inverts the shuffle."""
    assert spec.mask.dtype == torch.bool and spec.mask.shape == (batch, num_patches)
    assert (spec.mask.sum(1) == num_hidden).all()
    assert spec.ids_keep.shape == (batch, num_patches - num_hidden)
    assert not spec.mask.gather(1, spec.ids_keep).any()
    assert (spec.ids_keep[:, 1:] > spec.ids_keep[:, :-1]).all()  # raster order
    shuffle = torch.argsort(spec.ids_restore, dim=1)  # (B, L): [visible, hidden]
    assert (torch.sort(shuffle, 1).values == torch.arange(num_patches)).all()  # a permutation
    assert torch.equal(shuffle.gather(1, spec.ids_restore), torch.arange(num_patches).expand(batch, -1))
    assert torch.equal(shuffle[:, : spec.num_visible], spec.ids_keep)
    assert torch.equal(spec.ids_restore >= spec.num_visible, spec.mask)


def components_and_isolated(mask: torch.Tensor, grid: tuple[int, int]) -> tuple[float, float]:
    """Mean number of 4-connected hidden components per image, and fraction of hidden patches
    without a hidden 4-neighbour."""
    height, width = grid
    total_components, isolated, hidden = 0, 0, 0
    for image in mask.view(-1, height, width).tolist():
        seen = [[False] * width for _ in range(height)]
        for row in range(height):
            for col in range(width):
                if not image[row][col]:
                    continue
                hidden += 1
                neighbours = [(row + dr, col + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
                inside = [(r, c) for r, c in neighbours if 0 <= r < height and 0 <= c < width]
                isolated += not any(image[r][c] for r, c in inside)
                if seen[row][col]:
                    continue
                total_components += 1
                queue = deque([(row, col)])
                seen[row][col] = True
                while queue:
                    r, c = queue.popleft()
                    for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                        if 0 <= nr < height and 0 <= nc < width and image[nr][nc] and not seen[nr][nc]:
                            seen[nr][nc] = True
                            queue.append((nr, nc))
    return total_components / mask.shape[0], isolated / max(hidden, 1)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (7, 7), (3, 5)])
@pytest.mark.parametrize("batch", [1, 33])
def test_exact_hidden_count_and_inverse_permutation(ratio: float, grid: tuple[int, int], batch: int) -> None:
    spec = BlockMasker(ratio)(batch, grid, generator=torch.Generator().manual_seed(0))
    num_patches = grid[0] * grid[1]
    check_spec(spec, batch, num_patches, num_hidden_patches(num_patches, ratio))


def test_zero_ratio_hides_nothing_and_tiny_budget_is_exact() -> None:
    spec = BlockMasker(0.0)(4, (8, 8), generator=torch.Generator().manual_seed(0))
    assert not spec.mask.any() and spec.num_visible == 64
    # 3 hidden patches < min_num_patches=4: still exact, and mostly one block
    spec = BlockMasker(0.05, min_num_patches=4)(64, (8, 8), generator=torch.Generator().manual_seed(0))
    assert (spec.mask.sum(1) == 3).all()
    components, _ = components_and_isolated(spec.mask, (8, 8))
    assert components < 2.0


@pytest.mark.parametrize("ratio", [0.3, 0.4, 0.5])
@pytest.mark.parametrize("grid", [(8, 8), (14, 14)])
def test_block_masks_are_contiguous(ratio: float, grid: tuple[int, int]) -> None:
    batch = 128
    block = BlockMasker(ratio)(batch, grid, generator=torch.Generator().manual_seed(0))
    random = RandomMasker(ratio)(batch, grid, generator=torch.Generator().manual_seed(0))
    block_components, block_isolated = components_and_isolated(block.mask, grid)
    random_components, random_isolated = components_and_isolated(random.mask, grid)
    assert block_components < 0.3 * random_components, (block_components, random_components)
    assert block_components < 4.0
    # almost every hidden patch has a hidden 4-neighbour; random masks leave many isolated at these ratios
    assert block_isolated < 0.04, block_isolated
    assert block_isolated < 0.25 * random_isolated, (block_isolated, random_isolated)


def test_masks_cover_every_position_and_differ_per_image() -> None:
    spec = BlockMasker(0.4)(2000, (8, 8), generator=torch.Generator().manual_seed(0))
    freq = spec.mask.float().mean(0)  # (L,)
    assert (freq > 0.05).all() and (freq < 0.7).all(), freq.view(8, 8)  # blocks favour the centre, as in BEiT
    assert len({tuple(row.tolist()) for row in spec.mask[:64]}) == 64


def test_squares_only_with_unit_aspect() -> None:
    # with aspect fixed to 1 and a budget of exactly one 3x3 square, the mask is a 3x3 square
    spec = BlockMasker(9 / 64, min_num_patches=9, min_aspect=1.0, max_aspect=1.0)(
        32, (8, 8), generator=torch.Generator().manual_seed(0)
    )
    for image in spec.mask.view(-1, 8, 8):
        rows = image.any(1).nonzero().flatten()
        cols = image.any(0).nonzero().flatten()
        assert len(rows) == 3 and len(cols) == 3 and int(image.sum()) == 9
        assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2


def test_same_seed_same_mask_different_seed_different_mask() -> None:
    masker = BlockMasker(0.75)
    a = masker(16, (14, 14), generator=torch.Generator().manual_seed(3))
    b = masker(16, (14, 14), generator=torch.Generator().manual_seed(3))
    c = masker(16, (14, 14), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert torch.equal(a.ids_restore, b.ids_restore)
    assert not torch.equal(a.mask, c.mask)


def test_bad_arguments_and_registry() -> None:
    with pytest.raises(ValueError, match="mask ratio"):
        BlockMasker(1.0)
    with pytest.raises(ValueError, match="min_num_patches"):
        BlockMasker(0.5, min_num_patches=0)
    with pytest.raises(ValueError, match="min_aspect"):
        BlockMasker(0.5, min_aspect=2.0, max_aspect=1.0)
    with pytest.raises(ValueError, match="min_aspect"):
        BlockMasker(0.5, min_aspect=0.0)
    with pytest.raises(ValueError, match="grid"):
        BlockMasker(0.5)(2, (0, 4))
    masker = create_masker("block", 0.4, min_num_patches=8)
    assert isinstance(masker, BlockMasker)
    assert (masker.ratio, masker.min_num_patches, masker.max_aspect) == (0.4, 8, pytest.approx(1 / 0.3))


@pytest.mark.parametrize("mask_type", ["block", "grid"])
def test_pretraining_forward_with_masker(mask_type: str) -> None:
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny",
        img_size=32,
        patch_size=4,
        in_chans=1,
        depth=2,
        embed_dim=64,
        num_heads=2,
        decoder="micro",
        mask_type=mask_type,
    )
    assert type(model.masker).__name__ == {"block": "BlockMasker", "grid": "GridMasker"}[mask_type]
    images = torch.randn(4, 1, 32, 32)
    out = model(images, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert (out.mask.sum(1) == 48).all() and out.pred.shape == (4, 64, 16)
    again = model(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.mask, again.mask) and torch.allclose(out.loss, again.loss)
    # the loss reads only hidden patches: its gradient w.r.t. predictions is zero exactly at visible ones
    pred = out.pred.detach().requires_grad_(True)
    loss = model.target(images, pred, out.spec)
    assert torch.allclose(loss, out.loss)
    loss.backward()
    assert pred.grad is not None
    grad_norm = pred.grad.abs().sum(-1)  # (B, L)
    assert (grad_norm[~out.mask] == 0).all()
    assert (grad_norm[out.mask] > 0).all()


def test_masker_settings_come_from_the_config_and_reach_the_model() -> None:
    from mimkit.build import build_model
    from mimkit.config import ConfigError, load_config

    cfg = load_config(
        None, ["mask.type=block", "mask.ratio=0.5", "mask.block.min_num_patches=9", "mask.block.min_aspect=1.0"]
    )
    model = build_model(cfg)
    assert isinstance(model.masker, BlockMasker)
    assert model.config["mask_options"] == {"min_num_patches": 9, "min_aspect": 1.0, "max_aspect": None}
    spec = model.make_mask(4, generator=torch.Generator().manual_seed(0))
    assert int(spec.mask.sum(dim=1)[0]) == 32
    grid_cfg = load_config(None, ["mask.type=grid", "mask.grid.random_offset=true"])
    assert build_model(grid_cfg).config["mask_options"] == {"random_offset": True}
    with pytest.raises(ConfigError, match="mask"):
        load_config(None, ["mask.type=block", "mask.block.min_num_patches=0"])
