"""MILAN's prompting decoder: visible tokens are prompts that no block changes."""

from __future__ import annotations

import pytest
import torch

from mimkit.build import create_model
from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
from mimkit.layers import Block
from mimkit.masking import RandomMasker
from mimkit.models import MAEDecoder, PromptingDecoder


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    raw, _ = load_fashion_mnist(split="test")
    return (resize_uint8(raw[:4], 32).float() / 255 - 0.286) / 0.353  # (4, 1, 32, 32)


def prompting_model():
    torch.manual_seed(0)
    model = create_model("vit_tiny", img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2)
    decoder = PromptingDecoder(model.grid, in_dim=64, out_dim=16, embed_dim=32, depth=3, num_heads=2)
    return model.encoder, decoder


def test_visible_prompts_leave_every_block_bit_identical(images) -> None:
    encoder, decoder = prompting_model()
    spec = RandomMasker(0.75)(4, encoder.grid, generator=torch.Generator().manual_seed(0))
    enc = encoder(images, spec)
    out = decoder(enc, spec, return_hidden=True)
    prefix, visible, _ = decoder.embed_tokens(enc, spec)
    prompts = torch.cat([visible, visible.new_zeros(4, 48, 32)], dim=1)  # (4, 64, 32) in [kept, hidden] order
    raster = torch.gather(prompts, 1, spec.ids_restore.unsqueeze(-1).expand(-1, -1, 32))  # (4, 64, 32)
    expected_visible = (raster + decoder.pos_embed[:, 1:])[~spec.mask]  # (4 * 16, 32)
    expected_prefix = prefix + decoder.pos_embed[:, :1]  # (4, 1, 32)
    assert len(out.hidden_states) == 3
    for hidden in out.hidden_states:  # (4, 1 + 64, 32) raster order
        assert torch.equal(hidden[:, 1:][~spec.mask], expected_visible)
        assert torch.equal(hidden[:, :1], expected_prefix)
    with torch.no_grad():
        decoder.mask_token.add_(1.0)  # another mask token changes what hidden patches become, not the prompts
    again = decoder(enc, spec, return_hidden=True).hidden_states[-1]
    assert torch.equal(again[:, 1:][~spec.mask], expected_visible)
    assert not torch.allclose(again[:, 1:][spec.mask], out.hidden_states[-1][:, 1:][spec.mask])
    with pytest.raises(ValueError, match="no square attention"):
        decoder(enc, spec, return_attn=True)


def test_mask_tokens_attend_exactly_as_in_full_self_attention() -> None:
    # One block: the mask-token rows of full self-attention see the same keys and values as the prompting
    # block's queries, so they must agree; the prompt rows differ (full attention would update them).
    torch.manual_seed(0)
    block = Block(32, 4)
    x = torch.randn(2, 10, 32)
    full, _ = block(x)
    prompted, _ = block(x, query_start=6)
    torch.testing.assert_close(prompted[:, 6:], full[:, 6:], rtol=0, atol=1e-6)
    assert torch.equal(prompted[:, :6], x[:, :6]) and not torch.allclose(full[:, :6], x[:, :6])
    _, attn = block(x, return_attn=True, query_start=6)
    assert attn is not None and attn.shape == (2, 4, 4, 10)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 4))


def test_prompting_decoder_has_the_mae_decoders_parameters() -> None:
    encoder, decoder = prompting_model()
    mae = MAEDecoder(encoder.grid, in_dim=64, out_dim=16, embed_dim=32, depth=3, num_heads=2)
    assert [(n, p.shape) for n, p in decoder.named_parameters()] == [(n, p.shape) for n, p in mae.named_parameters()]
