"""BEiT v2's vector quantizer: nearest code by cosine, straight-through gradient, commitment loss, the EMA
codebook step and dead-code restarts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.layers import VectorQuantizer


def unit(rows: int, dim: int, seed: int) -> Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_nearest_code_is_the_brute_force_argmax_of_cosine() -> None:
    quantizer = VectorQuantizer(64, 8, kmeans_init=False).eval()
    z = unit(500, 8, seed=1).view(5, 100, 8)
    out = quantizer(z)
    cosine = F.cosine_similarity(z[..., None, :], quantizer.codebook, dim=-1)  # (5, 100, 64)
    expected = cosine.argmax(dim=-1)
    assert out.codes.shape == (5, 100) and out.codes.dtype == torch.int64
    assert torch.equal(out.codes, expected)
    torch.testing.assert_close(out.quantized, quantizer.codebook[expected])
    # the ranking is by cosine: scaling an input does not change its code
    assert torch.equal(quantizer.nearest(3.0 * z), expected)


def test_straight_through_gradient_and_commitment_loss() -> None:
    quantizer = VectorQuantizer(16, 4, beta=1.0, kmeans_init=False).eval()
    z = unit(10, 4, seed=2).requires_grad_()
    out = quantizer(z)
    out.quantized.retain_grad()
    upstream = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    (out.quantized * upstream).sum().backward()
    assert out.quantized.grad is not None and z.grad is not None
    torch.testing.assert_close(z.grad, out.quantized.grad, rtol=0, atol=0)
    torch.testing.assert_close(z.grad, upstream, rtol=0, atol=0)
    # the commitment loss pulls z towards its (fixed) code: d/dz beta * mean((z - q)^2) = 2 beta (z - q) / numel
    z.grad = None
    quantizer(z).loss.backward()
    chosen = quantizer.codebook[quantizer.nearest(z.detach())]
    torch.testing.assert_close(z.grad, 2 * (z.detach() - chosen) / z.numel())


def test_ema_update_matches_a_hand_computed_step_and_only_in_training() -> None:
    decay, eps, num_codes = 0.9, 1e-5, 4
    quantizer = VectorQuantizer(num_codes, 3, decay=decay, eps=eps, kmeans_init=False)
    codebook = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, -1.0, -1.0]]), dim=-1)
    quantizer.codebook.copy_(codebook)
    quantizer.embed_sum.copy_(codebook)
    z = F.normalize(
        torch.tensor([[1.0, 0.2, 0], [1.0, -0.1, 0.3], [0.1, 1.0, 0], [0.2, 0.1, 1.0], [0, 0.3, 1.0]]), dim=-1
    )
    codes = torch.tensor([0, 0, 1, 2, 2])  # code 3 gets nothing
    sums = torch.stack([z[codes == k].sum(0) if (codes == k).any() else torch.zeros(3) for k in range(num_codes)])
    counts = torch.tensor([2.0, 1.0, 2.0, 0.0])
    sizes = (1 - decay) * counts  # the sizes start at zero
    embed_sum = decay * codebook + (1 - decay) * sums
    total = sizes.sum()
    smoothed = (sizes + eps) / (total + num_codes * eps) * total
    expected = F.normalize(embed_sum / smoothed[:, None], dim=-1)

    quantizer.eval()
    quantizer(z)
    torch.testing.assert_close(quantizer.codebook, codebook, rtol=0, atol=0)  # eval mode: no update
    quantizer.train()
    out = quantizer(z)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.quantized, codebook[codes])  # the codes before this step's update
    torch.testing.assert_close(quantizer.cluster_size, sizes)
    torch.testing.assert_close(quantizer.embed_sum, embed_sum)
    torch.testing.assert_close(quantizer.codebook, expected)
    torch.testing.assert_close(quantizer.codebook[3], codebook[3])  # an unused code keeps its direction
    torch.testing.assert_close(quantizer.codebook.norm(dim=-1), torch.ones(num_codes))
    before = quantizer.codebook.clone()
    with torch.no_grad():
        quantizer.eval()(unit(50, 3, seed=4))
    assert torch.equal(quantizer.codebook, before)


def test_codes_stay_unit_norm_and_dead_codes_restart_at_inputs() -> None:
    quantizer = VectorQuantizer(8, 4, decay=0.9, kmeans_init=False, dead_code_threshold=0.5).train()
    target = quantizer.codebook[0].clone()
    z = F.normalize(target + 0.05 * torch.randn(20, 4, generator=torch.Generator().manual_seed(5)), dim=-1)
    assert (quantizer.nearest(z) == 0).all()
    quantizer(z)  # code 0: EMA size 0.1 * 20 = 2 >= 0.5; codes 1-7: 0 < 0.5, restarted at inputs
    torch.testing.assert_close(quantizer.codebook.norm(dim=-1), torch.ones(8))
    restarted = quantizer.codebook[1:]  # (7, 4)
    distance = torch.cdist(restarted, z).min(dim=1).values  # each restarted code is one of the inputs
    torch.testing.assert_close(distance, torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(quantizer.cluster_size[1:], torch.full((7,), 0.5))
    assert quantizer.cluster_size[0] == pytest.approx(2.0)
