import pytest
import torch

from mimkit.layers.patch_embed import patchify
from mimkit.masking import choose_foreground, ncut_bipartition, ncut_eigenvector, patch_affinity
from mimkit.masking.ncut import FOREGROUND_RULES, border_patches, ncut_split, similarity_to_mean

GRID = (8, 8)
PATCH = 4


def two_texture_image(layout: str, seed: int = 0, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 1, 32, 32) image with a vertical-stripe region on a checkerboard, plus Gaussian noise.

    Returns the image and the (64,) bool ground truth, True = stripe patch (raster order).
    """
    size = GRID[0] * PATCH
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    stripes = torch.where(cols % 2 == 0, 1.0, -1.0)  # (32, 32), vertical stripes of period 2
    checker = torch.where((rows + cols) % 2 == 0, 1.0, -1.0)  # (32, 32), orthogonal to the stripes per patch
    patch_rows, patch_cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    if layout == "left":
        truth = patch_cols < 3  # 24 of 64 patches
    elif layout == "center":
        truth = (patch_rows >= 2) & (patch_rows < 6) & (patch_cols >= 2) & (patch_cols < 6)  # 4x4 square
    elif layout == "edges":
        truth = (patch_cols == 0) | (patch_cols == GRID[1] - 1)  # 16 patches, every one on the border
    else:
        raise ValueError(layout)
    pixel_truth = truth.repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)  # (32, 32)
    image = torch.where(pixel_truth, stripes, checker)
    image = image + noise * torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    return image[None, None], truth.reshape(-1)


@pytest.mark.parametrize("binarize", [False, True], ids=["weighted", "binary"])
@pytest.mark.parametrize("layout", ["left", "center"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ncut_separates_two_textures(layout: str, seed: int, binarize: bool) -> None:
    image, truth = two_texture_image(layout, seed)
    features = patchify(image, PATCH)  # (1, 64, 16) raw pixels
    partition = ncut_bipartition(features, binarize=binarize)[0]  # (64,)
    agreement = (partition == truth).float().mean().item()
    assert max(agreement, 1 - agreement) >= 0.95  # up to label swap
    foreground = choose_foreground(partition[None], GRID)[0]
    if layout == "center":
        assert (foreground == truth).float().mean().item() >= 0.95


def object_sides(layout: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The object side under each rule for a synthetic object-on-background image, and the truth."""
    image, truth = two_texture_image(layout, seed)
    features = patchify(image, PATCH)  # (1, 64, 16)
    partition, eigenvector = ncut_split(patch_affinity(features))
    sides = {
        rule: choose_foreground(partition, GRID, how=rule, features=features, eigenvector=eigenvector)[0]
        for rule in FOREGROUND_RULES
    }
    return sides, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_side_rules_find_a_centred_object(seed: int) -> None:
    sides, truth = object_sides("center", seed)
    for rule, side in sides.items():
        assert (side == truth).float().mean().item() >= 0.95, rule


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_side_rules_on_an_object_along_the_border(seed: int) -> None:
    # The object (two edge columns, a quarter of the image) lies on the border: the border rule takes the
    # background for the object, the mean-patch and eigenvector rules still find the minority texture.
    sides, truth = object_sides("edges", seed)
    assert (sides["border"] == ~truth).float().mean().item() >= 0.95
    for rule in ("mean", "eigenvector"):
        assert (sides[rule] == truth).float().mean().item() >= 0.95, rule


def test_mean_rule_follows_similarity_to_the_mean_patch() -> None:
    features = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(7))
    partition = ncut_bipartition(features)
    object_side = choose_foreground(partition, GRID, how="mean", features=features)
    similarity = similarity_to_mean(features)  # (2, 64)
    for row in range(2):
        inside = similarity[row][object_side[row]].mean()
        outside = similarity[row][~object_side[row]].mean()
        assert inside < outside
    with pytest.raises(ValueError, match="needs the"):
        choose_foreground(partition, GRID, how="mean")
    with pytest.raises(ValueError, match="eigenvector"):
        choose_foreground(partition, GRID, how="eigenvector")


def test_pure_noise_is_not_separated_like_textures() -> None:
    # Control for the texture test: without structure the cut does not recover the layout.
    _, truth = two_texture_image("center")
    features = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0))
    partition = ncut_bipartition(features)[0]
    agreement = (partition == truth).float().mean().item()
    assert max(agreement, 1 - agreement) < 0.95


def test_choose_foreground_border_rule_on_either_label() -> None:
    border = border_patches(GRID)
    assert border.sum() == 28 and not border.view(GRID)[1:-1, 1:-1].any()
    interior = ~border  # 36 patches, the larger side, touching no border
    eigenvector = torch.where(border, 2.0, -1.0)[None]  # largest |y| on the border side
    for partition in (interior, border):  # either label of the same cut
        batch = partition[None]
        assert torch.equal(choose_foreground(batch, GRID, how="border")[0], interior)
        assert torch.equal(choose_foreground(batch, GRID, how="eigenvector", eigenvector=eigenvector)[0], border)


def test_choose_foreground_tie_on_border_goes_to_smaller_side() -> None:
    top = torch.zeros(GRID, dtype=torch.bool)
    top[:4] = True  # top half: 14 of the 28 border patches, like the bottom half
    top[1, 1] = False  # an interior patch moves to the other side: border still tied, top is smaller
    top = top.reshape(1, -1)
    border = border_patches(GRID)
    assert (top & border).sum() == (~top & border).sum() and top.sum() == 31
    assert torch.equal(choose_foreground(top, GRID), top)
    assert torch.equal(choose_foreground(~top, GRID), top)


def test_batched_equals_per_image() -> None:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 2, 32, generator=generator)  # two clusters per image
    labels = torch.rand(6, 64, generator=generator) < 0.4  # (B, L)
    features = centers.gather(1, labels.long()[:, :, None].expand(-1, -1, 32))  # (B, L, D)
    features = features + 0.8 * torch.randn(6, 64, 32, generator=generator)
    batched = ncut_bipartition(features)
    single = torch.cat([ncut_bipartition(features[i : i + 1]) for i in range(6)])
    assert torch.equal(batched, single)
    assert batched.any(1).all() and (~batched).any(1).all()  # every image is really split in two
    _, y_batched = ncut_eigenvector(patch_affinity(features))
    y_single = torch.cat([ncut_eigenvector(patch_affinity(features[i : i + 1]))[1] for i in range(6)])
    torch.testing.assert_close(y_batched, y_single, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("binarize", [True, False])
def test_solution_satisfies_generalized_eigen_equation(binarize: bool) -> None:
    features = torch.randn(4, 49, 24, generator=torch.Generator().manual_seed(3))
    affinity = patch_affinity(features, binarize=binarize)  # (B, L, L)
    assert torch.equal(affinity, affinity.transpose(1, 2)) and (affinity > 0).all()
    eigenvalue, y = ncut_eigenvector(affinity)
    weights = affinity.double()
    degree = torch.diag_embed(weights.sum(-1))  # (B, L, L)
    lhs = ((degree - weights) @ y[:, :, None])[..., 0]  # (D - W) y
    rhs = eigenvalue[:, None] * (degree @ y[:, :, None])[..., 0]  # lambda D y
    assert ((lhs - rhs).norm(dim=-1) / rhs.norm(dim=-1)).max() < 1e-9
    assert (eigenvalue > 1e-6).all()  # not the trivial constant solution (lambda = 0) ...
    ones_degree = weights.sum(-1)  # ... and D-orthogonal to it
    assert ((y * ones_degree).sum(-1).abs() / (y.abs() * ones_degree).sum(-1)).max() < 1e-9
    # It is the second-smallest: the D-normalized Rayleigh quotient of any D-orthogonal-to-1 vector is larger.
    probe = torch.randn(4, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    probe = probe - (probe * ones_degree).sum(-1, keepdim=True) / ones_degree.sum(-1, keepdim=True)
    laplacian_probe = ((degree - weights) @ probe[:, :, None])[..., 0]  # (B, L)
    quotient = (probe * laplacian_probe).sum(-1) / (probe * probe * ones_degree).sum(-1)
    assert (quotient >= eigenvalue - 1e-9).all()


def test_deterministic_and_sign_fixed() -> None:
    features = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(5))
    first = ncut_bipartition(features)
    assert torch.equal(first, ncut_bipartition(features.clone()))
    _, y = ncut_eigenvector(patch_affinity(features))
    top = y.abs().argmax(-1, keepdim=True)
    assert (y.gather(-1, top) > 0).all()
    assert first.gather(-1, top).all()  # True side holds the patch of largest |y|


def test_float32_solver_agrees_with_float64() -> None:
    image, _ = two_texture_image("center")
    features = patchify(image, PATCH)
    assert torch.equal(ncut_bipartition(features, dtype=torch.float32), ncut_bipartition(features))


def test_affinity_options() -> None:
    features = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]]])  # (1, 4, 2)
    binary = patch_affinity(features, tau=0.5, eps=1e-3, binarize=True)
    expected = torch.tensor([[1, 1, 1e-3, 1e-3], [1, 1, 1e-3, 1e-3], [1e-3, 1e-3, 1, 1e-3], [1e-3, 1e-3, 1e-3, 1]])
    torch.testing.assert_close(binary[0], expected)
    soft = patch_affinity(features, eps=1e-3)  # the default: the fully connected weighted graph
    assert soft[0, 0, 3] == pytest.approx(1e-3) and soft[0, 0, 1] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5)


def test_precomputed_affinity_equals_features_path() -> None:
    features = torch.randn(2, 36, 8, generator=torch.Generator().manual_seed(6))
    affinity = patch_affinity(features, tau=0.1)
    assert torch.equal(ncut_bipartition(affinity=affinity), ncut_bipartition(features, tau=0.1))


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        ncut_bipartition(torch.randn(64, 16))
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        patch_affinity(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        patch_affinity(torch.ones(1, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L, L\)"):
        ncut_bipartition(affinity=torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="exactly one"):
        ncut_bipartition()
    with pytest.raises(ValueError, match="exactly one"):
        ncut_bipartition(torch.randn(1, 4, 3), affinity=torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="eps must be positive"):
        patch_affinity(torch.randn(1, 4, 3), eps=0.0)
    partition = torch.zeros(1, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="holds 63 patches"):
        choose_foreground(partition, (7, 9))
    with pytest.raises(ValueError, match="bool"):
        choose_foreground(partition.float(), GRID)
    with pytest.raises(ValueError, match="unknown how"):
        choose_foreground(partition, GRID, how="largest")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    image, _ = two_texture_image("center")
    features = patchify(image, PATCH).repeat(4, 1, 1)
    on_cuda = ncut_bipartition(features.cuda())
    assert on_cuda.is_cuda
    assert torch.equal(on_cuda.cpu(), ncut_bipartition(features))
    assert torch.equal(choose_foreground(on_cuda, GRID).cpu(), choose_foreground(on_cuda.cpu(), GRID))
