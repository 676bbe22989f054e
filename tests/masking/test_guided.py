"""Attention-guided and self-guided maskers: exact counts, what they hide, the switch and its schedule."""

from __future__ import annotations

import pytest
import torch

from mimkit.build import create_model
from mimkit.data.fashion_mnist import load_fashion_mnist, resize_uint8
from mimkit.data.transforms import EvalTransform
from mimkit.masking import AttentionMasker, RandomMasker, SelfGuidedMasker, informed_mask, num_hidden_patches

GRID = (8, 8)
TINY = dict(img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Eight real Fashion-MNIST test images, 32x32, normalized."""
    raw = resize_uint8(load_fashion_mnist(split="test")[0][:8], 32)
    return EvalTransform(32, mean=(0.286,), std=(0.353,))(raw)


def test_informed_mask_hides_the_foreground_first_and_keeps_hints_visible() -> None:
    foreground = torch.zeros(4, 64, dtype=torch.bool)
    foreground[:, :20] = True  # 20 foreground patches, budget 48
    mask = informed_mask(foreground, 48, num_hints=3, generator=generator())
    assert mask.sum(1).tolist() == [48] * 4
    assert (mask & foreground).sum(1).tolist() == [17] * 4  # every foreground patch but the 3 hints
    assert ((~mask) & foreground).sum(1).tolist() == [3] * 4
    big = torch.ones(2, 64, dtype=torch.bool)
    big[:, 60:] = False  # foreground larger than the budget: only foreground is hidden
    mask = informed_mask(big, 48, num_hints=torch.tensor([0, 10]), generator=generator())
    assert mask.sum(1).tolist() == [48, 48] and not (mask & ~big).any()
    same, other = (informed_mask(foreground, 48, 3, generator(seed)) for seed in (5, 6))
    assert torch.equal(same, informed_mask(foreground, 48, 3, generator(5))) and not torch.equal(same, other)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("mode", ["hide", "keep"])
def test_attention_masker_exact_count_and_direction(ratio: float, mode: str) -> None:
    attention = torch.rand(3, 64, generator=generator(1)).softmax(dim=1)  # (B, L)
    masker = AttentionMasker(ratio, mode=mode, temperature=0.0)
    spec = masker(3, GRID, generator=generator(), context={"cls_attention": attention})
    hidden = num_hidden_patches(64, ratio)
    assert spec.mask.sum(1).tolist() == [hidden] * 3
    ranked = attention.argsort(dim=1, descending=True)  # most attended first
    expected = torch.zeros_like(spec.mask)
    if mode == "hide":
        expected.scatter_(1, ranked[:, :hidden], True)
    else:
        expected.scatter_(1, ranked[:, 64 - hidden :], True)  # the least attended are hidden
    assert torch.equal(spec.mask, expected)


def test_attention_temperature_moves_from_deterministic_towards_uniform() -> None:
    attention = torch.linspace(1, 2, 64).repeat(200, 1).softmax(dim=1)  # later patches attended more
    top = torch.zeros(200, 64, dtype=torch.bool)
    top[:, 16:] = True  # the 48 most attended
    overlap = {}
    for temperature in (0.0, 0.05, 100.0):
        spec = AttentionMasker(0.75, temperature=temperature)(
            200, GRID, generator=generator(), context={"cls_attention": attention}
        )
        overlap[temperature] = (spec.mask & top).sum().item() / spec.mask.sum().item()
    assert overlap[0.0] == 1.0 and 0.8 < overlap[0.05] < 1.0 and overlap[100.0] < 0.8  # uniform: 0.75


def test_guided_maskers_through_a_real_model(images) -> None:
    for kind, options in (("attention", {}), ("self_guided", {"trigger": "epoch", "start_epoch": 0})):
        torch.manual_seed(0)
        model = create_model("vit_tiny", **TINY, mask_type=kind, mask_ratio=0.75, mask_options=options)
        if kind == "self_guided":
            assert model.masker.guidance is None  # random until the switch: no extra pass
            model.masker.update(step=0, total_steps=10, epoch=0.0)
            assert model.masker.guidance == "encoder_features"  # the ideal setting by default
        with pytest.raises(ValueError, match="pass images="):
            model.make_mask(8, generator=generator())
        spec = model.make_mask(8, generator=generator(), images=images)
        again = model.make_mask(8, generator=generator(), images=images)
        assert spec.mask.sum(1).tolist() == [48] * 8 and torch.equal(spec.mask, again.mask), kind
        assert model.training  # the guidance pass restores the training flag
        assert torch.equal(model(images, generator=generator()).mask, spec.mask)  # forward guides its own mask


def test_self_guided_hides_the_ncut_foreground_of_real_features(images) -> None:
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny",
        **TINY,
        mask_type="self_guided",
        mask_options={"setting": "ideal", "trigger": "epoch", "start_epoch": 0},
    )
    masker = model.masker
    assert masker.update(step=0, total_steps=100, epoch=0.0)
    assert masker.informed and masker.switch_step == 0 and masker.guidance == "encoder_features"
    features = model.guidance(images, "encoder_features")  # (8, 64, 64)
    assert features.shape == (8, 64, 64)
    from mimkit.masking import choose_foreground, ncut_bipartition

    foreground = choose_foreground(ncut_bipartition(features), GRID)
    spec = masker(8, GRID, generator=generator(), context={"encoder_features": features})
    hints = torch.round(foreground.sum(1) * 0.1)
    budget_in_foreground = torch.minimum(foreground.sum(1) - hints, torch.tensor(48.0))
    assert torch.equal((spec.mask & foreground).sum(1).float(), budget_in_foreground)


def test_similarity_ranked_hints_are_the_object_patches_nearest_the_mean(images) -> None:
    torch.manual_seed(0)
    options = {"setting": "ideal", "trigger": "epoch", "start_epoch": 0, "hint_ratio": 0.3}
    model = create_model("vit_tiny", **TINY, mask_type="self_guided", mask_options=options)
    features = model.guidance(images, "encoder_features")  # (8, 64, 64)
    from mimkit.masking import choose_foreground, ncut_bipartition
    from mimkit.masking.ncut import similarity_to_mean

    foreground = choose_foreground(ncut_bipartition(features), GRID)  # (8, 64)
    similarity = similarity_to_mean(features)  # (8, 64)
    masks = {}
    for choice in ("random", "similarity"):
        masker = SelfGuidedMasker(
            0.75, hint_ratio=0.3, trigger="epoch", start_epoch=0, setting="ideal", hint_choice=choice
        )
        masker.update(step=0, total_steps=10, epoch=0.0)
        masks[choice] = masker(8, GRID, generator=generator(), context={"encoder_features": features}).mask
    for row in range(8):
        hints = foreground[row] & ~masks["similarity"][row]
        assert hints.sum() == round(float(foreground[row].sum()) * 0.3)
        hidden_object = foreground[row] & masks["similarity"][row]
        if hints.any() and hidden_object.any():  # every hint is nearer the mean patch than every hidden object patch
            assert similarity[row][hints].min() >= similarity[row][hidden_object].max()
    assert torch.equal(masks["random"].sum(1), masks["similarity"].sum(1))  # exactly 48 hidden either way
    assert not torch.equal(masks["random"], masks["similarity"])


def test_self_guided_is_random_masking_until_the_switch() -> None:
    masker = SelfGuidedMasker(0.75)
    assert not masker.informed and masker.wants_exploitation
    ours = masker(4, GRID, generator=generator(3))
    assert torch.equal(ours.mask, RandomMasker(0.75)(4, GRID, generator=generator(3)).mask)


def checks(masker: SelfGuidedMasker, mask_shares: list[float], epochs: list[float] | None = None) -> list[bool]:
    """Feed one check per value of ``Rhat_{M->O}`` (visible share ``1 - value``); what each returned."""
    epochs = epochs or [float(index) for index in range(len(mask_shares))]
    return [
        masker.update(step=10 * (index + 1), total_steps=1000, epoch=epoch, exploitation=(1.0 - share, share))
        for index, (share, epoch) in enumerate(zip(mask_shares, epochs, strict=True))
    ]


def test_trigger_ignores_a_curve_that_starts_above_and_stays_above() -> None:
    masker = SelfGuidedMasker(0.75)
    assert checks(masker, [0.6, 0.7, 0.8, 0.55, 0.9]) == [False] * 5
    assert masker.switch_step is None and len(masker.curve) == 5 and masker.wants_exploitation


def test_trigger_fires_once_where_the_curve_crosses_from_below() -> None:
    masker = SelfGuidedMasker(0.75)
    assert checks(masker, [0.3, 0.4, 0.45, 0.6, 0.7, 0.4, 0.8]) == [False, False, False, True, False, False, False]
    assert masker.switch_step == 40 and not masker.wants_exploitation
    assert masker.curve[-1] == [40.0, 3.0, pytest.approx(0.4), 0.6]  # checks stop being recorded at the switch
    starts_above = SelfGuidedMasker(0.75)
    assert checks(starts_above, [0.6, 0.4, 0.7]) == [False, False, True]  # it fires after it has dipped
    assert not SelfGuidedMasker(0.75).update(step=5, total_steps=10, epoch=0.5)  # no check, nothing measured


def test_trigger_respects_patience_and_the_earliest_epoch() -> None:
    patient = SelfGuidedMasker(0.75, trigger_patience=3)
    # a 2-check excursion above does not count; the 3rd consecutive check of the next one fires
    assert checks(patient, [0.3, 0.6, 0.7, 0.4, 0.6, 0.6, 0.6, 0.6]) == [False] * 6 + [True, False]
    assert patient.switch_step == 70
    late = SelfGuidedMasker(0.75, start_epoch=4)
    fired = checks(late, [0.3, 0.6, 0.7, 0.8, 0.9, 0.9], epochs=[0, 1, 2, 3, 4, 5])
    assert fired == [False, False, False, False, True, False] and late.switch_step == 50
    by_epoch = SelfGuidedMasker(0.75, trigger="epoch", start_epoch=1)
    assert not by_epoch.update(step=9, total_steps=50, epoch=0.9, exploitation=(0.1, 0.9))
    assert by_epoch.update(step=10, total_steps=50, epoch=1.0) and by_epoch.switch_step == 10


def test_trigger_state_round_trips_mid_streak() -> None:
    masker = SelfGuidedMasker(0.75, trigger_patience=2)
    checks(masker, [0.3, 0.6])
    restored = SelfGuidedMasker(0.75, trigger_patience=2)
    restored.load_state_dict(masker.state_dict())
    assert restored.curve == masker.curve and restored.streak == 1 and restored.seen_below
    assert restored.update(step=30, total_steps=1000, epoch=2.0, exploitation=(0.3, 0.7))


def test_hint_ratio_decays_linearly_and_state_round_trips() -> None:
    masker = SelfGuidedMasker(0.75, hint_ratio=0.2, hint_ratio_end=0.05, trigger="epoch", start_epoch=0)
    masker.update(step=20, total_steps=120, epoch=0.0)
    ratios = []
    for step in (20, 70, 120):
        masker.update(step=step, total_steps=120, epoch=step / 10)
        ratios.append(masker.current_hint_ratio())
    assert ratios == pytest.approx([0.2, 0.125, 0.05])
    restored = SelfGuidedMasker(0.75, hint_ratio=0.2, hint_ratio_end=0.05, trigger="epoch", start_epoch=0)
    restored.load_state_dict(masker.state_dict())
    restored.update(step=70, total_steps=120, epoch=7.0)
    assert restored.switch_step == 20 and restored.current_hint_ratio() == pytest.approx(0.125)


def test_bad_options_are_clear() -> None:
    with pytest.raises(ValueError, match="needs start_epoch"):
        SelfGuidedMasker(trigger="epoch")
    with pytest.raises(ValueError, match="hint_ratio"):
        SelfGuidedMasker(hint_ratio=0.1, hint_ratio_end=0.2)
    for option, value in (
        ("trigger", "utilization"),
        ("graph", "knn"),
        ("foreground", "smaller"),
        ("hint_choice", "x"),
    ):
        with pytest.raises(ValueError, match=option):
            SelfGuidedMasker(**{option: value})
    with pytest.raises(ValueError, match="trigger_patience"):
        SelfGuidedMasker(trigger_patience=0)
    with pytest.raises(ValueError, match="mode"):
        AttentionMasker(mode="sometimes")
    with pytest.raises(ValueError, match="needs context"):
        AttentionMasker()(2, GRID, generator=generator())


def test_default_guidance_layer_is_the_middle_block(images) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", **{**TINY, "depth": 4}, mask_type="self_guided", mask_options={"setting": "ideal"})
    model.eval()
    hidden = model.encoder(images, return_hidden=True).hidden_states  # 4 blocks
    assert torch.allclose(model.guidance(images, "encoder_features"), hidden[1][:, 1:])
    model.masker.layer = -1
    assert torch.allclose(model.guidance(images, "encoder_features"), hidden[-1][:, 1:])


def test_the_masker_keeps_its_exploitation_window_and_checks_at_its_own_schedule() -> None:
    every_4 = SelfGuidedMasker(0.75, trigger_every_steps=4)
    fired = []
    for step in range(13):
        fired.append(every_4.advance(step=step, total_steps=100, steps_per_epoch=10))
        share = 0.3 if step < 4 else 0.7  # mask tokens above visible from step 4 on
        every_4.observe_exploitation(1.0 - share, share)
    # checks at steps 4 (mean of steps 0-3: below), 8 (steps 4-7: above, after a check below: fires)
    assert [
        point == pytest.approx(expected)
        for point, expected in zip(every_4.curve, [[4, 0.4, 0.7, 0.3], [8, 0.8, 0.3, 0.7]], strict=True)
    ] == [True, True]
    assert fired.index(True) == 8 and fired.count(True) == 1 and every_4.switch_step == 8
    per_epoch = SelfGuidedMasker(0.75)  # no trigger_every_steps: one check at every epoch start
    for step in range(21):
        per_epoch.advance(step=step, total_steps=100, steps_per_epoch=10)
        per_epoch.observe_exploitation(0.2, 0.6, count=2.0)  # two ranks' measurements arrive summed
    assert [point[:2] for point in per_epoch.curve] == [[10.0, 1.0], [20.0, 2.0]]
    assert per_epoch.curve[0][2:] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert per_epoch.window == [pytest.approx(0.2), pytest.approx(0.6), 2.0]  # step 20's measurement, not checked
    restored = SelfGuidedMasker(0.75)
    restored.load_state_dict(per_epoch.state_dict())
    assert restored.window == per_epoch.window and restored.curve == per_epoch.curve
    with pytest.raises(ValueError, match="trigger_every_steps"):
        SelfGuidedMasker(0.75, trigger_every_steps=0)
