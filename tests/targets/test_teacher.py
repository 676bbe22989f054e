"""Frozen teachers: real pretrained EfficientNet-Lite0, mimkit checkpoints, timm and CLIP models from local files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.build import build_model, create_model
from mimkit.checkpoints.load import save_checkpoint_as
from mimkit.config import load_config
from mimkit.data.fashion_mnist import load_fashion_mnist
from mimkit.targets import Teacher, build_teacher
from mimkit.targets.teachers.base import resample_to_grid
from mimkit.targets.teachers.clip import CLIP_MEAN, CLIP_STD
from mimkit.targets.teachers.efficientnet import EFFICIENTNET_LITE0_STAGES, efficientnet_lite0_weights_path

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_VIT = dict(img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro")
# ImageNet classes of matplotlib's Grace Hopper photo (she wears a US Navy uniform and a tie).
MILITARY_UNIFORM, SUIT, WINDSOR_TIE = 652, 834, 906


@pytest.fixture(scope="module")
def fmnist() -> Tensor:
    """16 Fashion-MNIST test images as a 32x32 student sees them: (16, 1, 32, 32), normalized."""
    images, _ = load_fashion_mnist(split="test")
    pixels = F.interpolate(images[:16].float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    return (pixels - FMNIST_MEAN[0]) / FMNIST_STD[0]


@pytest.fixture(scope="module")
def lite0() -> Teacher:
    return build_teacher("efficientnet_lite0", student_mean=FMNIST_MEAN, student_std=FMNIST_STD)


@pytest.fixture
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def grace_hopper() -> Tensor:
    """matplotlib's sample photo as (1, 3, 600, 512) pixels in [0, 1]."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        photo = np.asarray(Image.open(handle).convert("RGB"))
    return torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float() / 255


def test_efficientnet_lite0_features_on_fashion_mnist(lite0: Teacher, fmnist: Tensor) -> None:
    features = lite0(fmnist, (8, 8))
    assert features.shape == (16, 64, 112) and lite0.dim == 112 and lite0.input_size == 128
    assert torch.isfinite(features).all() and features.std() > 0.1
    # Different garments give different features: not a constant map.
    assert (features[0] - features[1]).abs().mean() > 0.1 * features.abs().mean()


@pytest.mark.parametrize("stage", range(8))
def test_efficientnet_lite0_stage_table(stage: int, fmnist: Tensor) -> None:
    teacher = build_teacher(
        "efficientnet_lite0", student_mean=FMNIST_MEAN, student_std=FMNIST_STD, input_size=64, stage=stage
    )
    channels, stride = (1280, 32) if stage == 7 else EFFICIENTNET_LITE0_STAGES[stage][1:]
    feature_map = teacher.feature_map(teacher.preprocess(fmnist[:2]))
    assert feature_map.shape == (2, channels, math.ceil(64 / stride), math.ceil(64 / stride))
    assert teacher.dim == channels and teacher(fmnist[:2], (4, 4)).shape == (2, 16, channels)


def test_efficientnet_lite0_weights_are_the_pretrained_ones() -> None:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    teacher = build_teacher("efficientnet_lite0", student_mean=IMAGENET_MEAN, student_std=IMAGENET_STD, input_size=224)
    stored = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert teacher.backbone.state_dict().keys() == stored.keys()
    assert all(torch.equal(value, stored[key]) for key, value in teacher.backbone.state_dict().items())
    # The classifier on the teacher's own preprocessing recognizes a real photo.
    with torch.no_grad():
        probs = teacher.backbone(teacher.preprocess((grace_hopper() - mean) / std)).softmax(dim=-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == MILITARY_UNIFORM and probs[MILITARY_UNIFORM] > 0.3, top5
    assert {SUIT, WINDSOR_TIE} <= set(top5), top5


def test_teacher_is_frozen_through_a_student_update(lite0: Teacher, fmnist: Tensor) -> None:
    before = {key: value.clone() for key, value in lite0.state_dict().items()}
    student = nn.Conv2d(1, lite0.dim, kernel_size=4, stride=4)
    modules = nn.ModuleDict({"student": student, "teacher": lite0})
    modules.train()  # what a training loop does to the whole model
    assert not lite0.training and not any(module.training for module in lite0.modules())
    assert not any(parameter.requires_grad for parameter in lite0.parameters())
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-2, weight_decay=0.1)
    student_before = student.weight.detach().clone()

    targets = lite0(fmnist, (8, 8))  # (B, 64, D)
    assert not targets.requires_grad
    pred = student(fmnist).flatten(2).transpose(1, 2)  # (B, 64, D)
    F.mse_loss(pred, targets).backward()
    optimizer.step()

    assert not torch.equal(student.weight, student_before)
    assert all(parameter.grad is None for parameter in lite0.parameters())
    after = lite0.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())  # BN statistics included
    lite0.train(True)
    assert not lite0.training


def test_features_are_deterministic(lite0: Teacher, fmnist: Tensor) -> None:
    again = build_teacher("efficientnet_lite0", student_mean=FMNIST_MEAN, student_std=FMNIST_STD)
    first = lite0(fmnist[:4], (8, 8))
    assert torch.equal(first, lite0(fmnist[:4], (8, 8)))
    assert torch.equal(first, again(fmnist[:4], (8, 8)))


def test_grayscale_is_repeated_to_three_channels(lite0: Teacher, fmnist: Tensor) -> None:
    inputs = lite0.preprocess(fmnist[:4])
    assert inputs.shape == (4, 3, 128, 128)
    assert torch.equal(inputs[:, 0], inputs[:, 1]) and torch.equal(inputs[:, 0], inputs[:, 2])
    rgb_teacher = build_teacher("efficientnet_lite0", student_mean=FMNIST_MEAN * 3, student_std=FMNIST_STD * 3)
    rgb = rgb_teacher(fmnist[:4].repeat(1, 3, 1, 1), (8, 8))
    assert torch.allclose(lite0(fmnist[:4], (8, 8)), rgb, atol=1e-5, rtol=0)


def test_normalization_round_trip(lite0: Teacher, fmnist: Tensor) -> None:
    pixels = fmnist[:2] * FMNIST_STD[0] + FMNIST_MEAN[0]  # back to [0, 1]
    expected = F.interpolate(pixels, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(lite0.preprocess(fmnist[:2]), (expected.expand(-1, 3, -1, -1) - 0.5) / 0.5, atol=1e-5)


def test_resample_to_grid_pools_or_interpolates() -> None:
    feature_map = torch.randn(2, 5, 8, 8)
    assert resample_to_grid(feature_map, (8, 8)) is feature_map
    pooled = resample_to_grid(feature_map, (4, 4))
    assert torch.allclose(pooled[:, :, 1, 2], feature_map[:, :, 2:4, 4:6].mean(dim=(-1, -2)))
    upsampled = resample_to_grid(feature_map, (16, 12))
    assert upsampled.shape == (2, 5, 16, 12)
    assert torch.allclose(upsampled, F.interpolate(feature_map, size=(16, 12), mode="bilinear", align_corners=False))


def test_mimkit_checkpoint_teacher(tmp_path: Path, fmnist: Tensor) -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny", **TINY_VIT).eval()
    path = save_checkpoint_as(model, tmp_path / "teacher.pt", "mimkit")
    teacher = build_teacher(str(path), student_mean=FMNIST_MEAN, student_std=FMNIST_STD)
    assert teacher.dim == 64 and teacher.input_size == 32
    assert not hasattr(teacher.backbone, "decoder")  # the encoder only

    features = teacher(fmnist, (8, 8))
    with torch.no_grad():
        expected = model.encoder(fmnist).patch_tokens  # (B, 64, 64) final tokens, after the norm
    assert features.shape == (16, 64, 64)
    assert torch.allclose(features, expected, atol=1e-5, rtol=0)
    coarse = teacher(fmnist, (4, 4)).transpose(1, 2).reshape(16, 64, 4, 4)
    assert torch.allclose(coarse, F.avg_pool2d(expected.transpose(1, 2).reshape(16, 64, 8, 8), 2), atol=1e-5)
    assert teacher(fmnist, (16, 16)).shape == (16, 256, 64)

    own_normalization = build_teacher(
        str(path), student_mean=FMNIST_MEAN, student_std=FMNIST_STD, mean=[0.5], std=[0.5]
    )
    pixels = fmnist * FMNIST_STD[0] + FMNIST_MEAN[0]
    with torch.no_grad():
        expected = model.encoder((pixels - 0.5) / 0.5).patch_tokens
    assert torch.allclose(own_normalization(fmnist, (8, 8)), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"takes 32x32 images; input_size 64"):
        build_teacher(str(path), student_mean=FMNIST_MEAN, student_std=FMNIST_STD, input_size=64)


def test_checkpoint_teacher_uses_its_run_normalization(tmp_path: Path) -> None:
    config = load_config(
        None, ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "data.mean=[0.25]", "data.std=[0.4]"]
    )
    model = build_model(config)
    model.run_config = config
    path = save_checkpoint_as(model, tmp_path / "run.pt", "mimkit")
    teacher = build_teacher(str(path), student_mean=FMNIST_MEAN, student_std=FMNIST_STD)
    assert teacher.teacher_mean.flatten().tolist() == [0.25]
    assert teacher.teacher_std.flatten().tolist() == pytest.approx([0.4])


def test_timm_cnn_teacher_from_a_safetensors_file(tmp_path: Path, fmnist: Tensor) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False).eval()
    save_file(source.state_dict(), tmp_path / "resnet10t.safetensors")
    spec = f"timm:resnet10t@{tmp_path / 'resnet10t.safetensors'}"
    teacher = build_teacher(spec, student_mean=FMNIST_MEAN, student_std=FMNIST_STD, input_size=64)
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in teacher.backbone.state_dict().items())
    assert teacher.teacher_mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert teacher.dim == 512
    inputs = teacher.preprocess(fmnist[:4])
    with torch.no_grad():
        last = source.forward_features(inputs)  # (4, 512, 2, 2): stride 32
    assert torch.allclose(teacher(fmnist[:4], (2, 2)), last.flatten(2).transpose(1, 2), atol=1e-5)
    assert teacher(fmnist[:4], (8, 8)).shape == (4, 64, 512)  # 2x2 map interpolated up

    stage2 = build_teacher(spec, student_mean=FMNIST_MEAN, student_std=FMNIST_STD, input_size=64, stage=2)
    assert stage2.dim == 128 and stage2(fmnist[:4], (8, 8)).shape == (4, 64, 128)  # stride 8: exactly 8x8

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"{missing} do not exist"):
        build_teacher(f"timm:resnet10t@{missing}", student_mean=FMNIST_MEAN, student_std=FMNIST_STD)
    with pytest.raises(ValueError, match=r"must read 'timm:NAME@FILE'"):
        build_teacher("timm:resnet10t", student_mean=FMNIST_MEAN, student_std=FMNIST_STD)


def test_timm_vit_teacher_gives_patch_tokens(tmp_path: Path, fmnist: Tensor) -> None:
    import timm

    model_kwargs = dict(img_size=32, patch_size=4, depth=2)
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **model_kwargs).eval()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "vit.pth")
    teacher = build_teacher(
        f"timm:vit_tiny_patch16_224@{tmp_path / 'vit.pth'}",
        student_mean=FMNIST_MEAN,
        student_std=FMNIST_STD,
        model_kwargs=model_kwargs,
    )
    assert teacher.dim == 192 and teacher.input_size == 32
    with torch.no_grad():
        tokens = source.forward_features(teacher.preprocess(fmnist))  # (B, 1 + 64, 192), after the norm
    assert torch.allclose(teacher(fmnist, (8, 8)), tokens[:, source.num_prefix_tokens :], atol=1e-5, rtol=0)


def test_hf_clip_teacher(tmp_path: Path, fmnist: Tensor, offline: None) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4
    )
    torch.manual_seed(0)
    source = CLIPVisionModel(config).eval()
    source.save_pretrained(tmp_path / "clip")
    teacher = build_teacher(f"hf_clip:{tmp_path / 'clip'}", student_mean=FMNIST_MEAN, student_std=FMNIST_STD)
    assert teacher.dim == 32 and teacher.input_size == 32
    assert teacher.teacher_mean.flatten().tolist() == pytest.approx(CLIP_MEAN)
    assert teacher.teacher_std.flatten().tolist() == pytest.approx(CLIP_STD)
    with torch.no_grad():
        hidden = source(pixel_values=teacher.preprocess(fmnist)).last_hidden_state  # (B, 1 + 64, 32)
    assert torch.allclose(teacher(fmnist, (8, 8)), hidden[:, 1:], atol=1e-5, rtol=0)

    CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(tmp_path / "clip")
    larger = build_teacher(
        f"hf_clip:{tmp_path / 'clip'}", student_mean=FMNIST_MEAN, student_std=FMNIST_STD, input_size=64
    )
    assert larger.teacher_mean.flatten().tolist() == [0.5] * 3 and larger.teacher_std.flatten().tolist() == [0.25] * 3
    assert larger.feature_map(larger.preprocess(fmnist[:2])).shape == (2, 32, 16, 16)  # interpolated positions
    assert larger(fmnist[:2], (8, 8)).shape == (2, 64, 32)

    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nowhere'} does not exist"):
        build_teacher(f"hf_clip:{tmp_path / 'nowhere'}", student_mean=FMNIST_MEAN, student_std=FMNIST_STD)


def test_bad_specs_and_options_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"unknown teacher 'resnet50'.*efficientnet_lite0.*timm:NAME@FILE.*hf_clip:DIR"
    ):
        build_teacher("resnet50", student_mean=FMNIST_MEAN, student_std=FMNIST_STD)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['layer'\].*accepted: \['stage'\]"):
        build_teacher("efficientnet_lite0", student_mean=FMNIST_MEAN, student_std=FMNIST_STD, layer=3)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 7\], got 9"):
        build_teacher("efficientnet_lite0", student_mean=FMNIST_MEAN, student_std=FMNIST_STD, stage=9)
