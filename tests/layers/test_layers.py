import math

import pytest
import torch

from mimkit.layers import (
    Block,
    PatchEmbed,
    check_patch_grid,
    patchify,
    resize_pos_embed,
    sincos_1d,
    sincos_2d,
    unpatchify,
)


def mae_reference_sincos(embed_dim: int, grid_size: int) -> torch.Tensor:
    """The formula of MAE's util/pos_embed.py written out with plain loops (float64)."""

    def one_d(dim: int, pos: float) -> list[float]:
        omega = [1.0 / 10000 ** (i / (dim / 2)) for i in range(dim // 2)]
        return [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]

    rows = []
    for h in range(grid_size):
        for w in range(grid_size):
            rows.append(one_d(embed_dim // 2, w) + one_d(embed_dim // 2, h))  # w first, as MAE
    return torch.tensor(rows, dtype=torch.float64)


def test_sincos_2d_matches_mae_formula() -> None:
    emb = sincos_2d(16, (4, 4), num_prefix_tokens=1)
    assert emb.shape == (17, 16)
    assert torch.equal(emb[0], torch.zeros(16))
    torch.testing.assert_close(emb[1:].double(), mae_reference_sincos(16, 4), atol=1e-6, rtol=0)


def test_sincos_rejects_bad_width() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(18, (2, 2))
    with pytest.raises(ValueError, match="even"):
        sincos_1d(3, torch.arange(2.0))


@pytest.mark.parametrize("chans", [1, 3])
def test_patchify_round_trip_and_layout(chans: int) -> None:
    images = torch.randn(2, chans, 12, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 16 * chans)
    # patch (row 1, col 0) holds pixels [4:8, 0:4] flattened as (p, p, C)
    expected = images[0, :, 4:8, 0:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 2], expected)
    assert torch.equal(unpatchify(patches, 4, (3, 2), chans), images)


def test_patch_grid_errors_name_sizes() -> None:
    with pytest.raises(ValueError, match="30 is not divisible by patch_size 4"):
        check_patch_grid(30, 4)
    embed = PatchEmbed(32, 4, 1, 8)
    with pytest.raises(ValueError, match="expected images of size"):
        embed(torch.zeros(1, 1, 28, 28))


def test_block_attention_paths_agree() -> None:
    torch.manual_seed(0)
    block = Block(32, 4)
    x = torch.randn(2, 9, 32)
    fast, none = block(x)
    explicit, attn = block(x, return_attn=True)
    assert none is None and attn is not None
    assert attn.shape == (2, 4, 9, 9)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 9))
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def test_resize_pos_embed_recomputes_sincos_and_resamples_learned_tables() -> None:
    table = sincos_2d(64, (4, 4), 1)[None]  # (1, 1 + 16, 64), a fixed table with a class row
    assert torch.equal(resize_pos_embed(table, (4, 4), (6, 8), 1), sincos_2d(64, (6, 8), 1)[None])
    assert resize_pos_embed(table, (4, 4), (4, 4), 1) is table
    learned = torch.randn(1, 1 + 16, 64)
    learned[:, 1:] = learned[:, 1:2]  # every patch row equal: interpolation must keep it
    resized = resize_pos_embed(learned, (4, 4), (6, 8), 1)
    assert resized.shape == (1, 1 + 48, 64) and torch.equal(resized[:, :1], learned[:, :1])
    torch.testing.assert_close(resized[:, 1:], learned[:, 1:2].expand(1, 48, 64))
    with pytest.raises(ValueError, match="17 rows is not 0 \\+ 4x4"):
        resize_pos_embed(table, (4, 4), (6, 6), 0)
