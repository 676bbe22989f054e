"""The part interfaces: every built-in part implements its protocol, capabilities are opt-in, and a part that
lacks a member is refused when the model is assembled, naming what it lacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mimkit.build import create_model
from mimkit.masking import MASKERS, create_masker
from mimkit.models import MaskedImageModel
from mimkit.models.protocols import (
    Decoder,
    Encoder,
    GridCheckedMasker,
    GuidedMasker,
    Masker,
    StatefulMasker,
    Target,
    TeacherTarget,
)

TINY = dict(img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro")


@pytest.mark.parametrize("kind", sorted(MASKERS))
def test_every_masker_implements_exactly_the_capabilities_it_uses(kind: str) -> None:
    masker = create_masker(kind, 0.75)
    assert isinstance(masker, Masker) and 0 < masker.ratio < 1
    assert isinstance(masker, GuidedMasker) == (kind in ("attention", "self_guided"))
    assert isinstance(masker, StatefulMasker) == (kind == "self_guided")
    assert isinstance(masker, GridCheckedMasker) == (kind == "grid")


@pytest.mark.parametrize(
    ("overrides", "decoder_prefix", "hidden_states"),
    [({}, 1, False), ({"encoder_sees": "all", "head": "linear"}, 1, False), ({"cls_enabled": True}, 1, True)],
)
def test_built_models_are_made_of_parts_that_implement_their_protocols(
    overrides: dict, decoder_prefix: int, hidden_states: bool
) -> None:
    model = create_model("vit_tiny", **TINY, **overrides)
    assert isinstance(model.encoder, Encoder) and isinstance(model.decoder, Decoder)
    assert isinstance(model.target, Target) and not isinstance(model.target, TeacherTarget)
    assert model.decoder.num_prefix_tokens == decoder_prefix and model.decoder.needs_hidden_states == hidden_states
    convmae = create_model("convmae_tiny", img_size=32, in_chans=1)
    assert isinstance(convmae.encoder, Encoder) and convmae.decoder.num_prefix_tokens == 0


class NoFlagDecoder(nn.Module):
    """A decoder that does not say whether it needs the encoder's hidden states."""

    num_prefix_tokens = 1
    blocks = nn.ModuleList()

    def forward(self, enc, mask):  # pragma: no cover - never called: the model refuses it
        raise AssertionError


def test_a_part_without_its_protocols_members_is_refused_by_name() -> None:
    model = create_model("vit_tiny", **TINY)
    with pytest.raises(TypeError, match="decoder NoFlagDecoder does not implement Decoder: it has no needs_hidden"):
        MaskedImageModel(model.encoder, NoFlagDecoder(), model.masker, model.target)
    with pytest.raises(TypeError, match=r"masker function does not implement Masker: it has no ratio"):
        MaskedImageModel(model.encoder, model.decoder, lambda *args, **kw: None, model.target)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encoder Linear does not implement Encoder"):
        MaskedImageModel(nn.Linear(2, 2), model.decoder, model.masker, model.target)
    rebuilt = MaskedImageModel(model.encoder, model.decoder, model.masker, model.target)
    images = torch.randn(2, 1, 32, 32)
    assert torch.isfinite(rebuilt(images, generator=torch.Generator().manual_seed(0)).loss)
