"""Feature targets in the MAE frame: HOG and a real frozen teacher's features, on real Fashion-MNIST images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.build import create_model, load_checkpoint
from mimkit.checkpoints.load import save_checkpoint_as
from mimkit.config import ConfigError, load_config
from mimkit.data.fashion_mnist import load_fashion_mnist
from mimkit.engine.pretrain import Pretrainer
from mimkit.masking import MaskSpec, RandomMasker
from mimkit.models import PromptingDecoder
from mimkit.targets import TARGETS, HOGTarget, PixelTarget, TeacherTarget, patch_loss
from mimkit.tasks.tokenizer import TokenizerConfig, train_tokenizer

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
TINY = dict(img_size=32, patch_size=4, in_chans=1, depth=2, embed_dim=64, num_heads=2, decoder="micro")
# EfficientNet-Lite0 at 64x64 input: stage 4 (112 channels, stride 16) gives a 4x4 map, resampled to 8x8.
LITE0 = dict(target="maskdistill", teacher="efficientnet_lite0", teacher_options={"input_size": 64})
NORMALIZATION = dict(data_mean=FMNIST_MEAN, data_std=FMNIST_STD)
RECIPES = Path(__file__).parents[2] / "configs"


@pytest.fixture(scope="module")
def images() -> Tensor:
    """8 Fashion-MNIST test images as a 32x32 student sees them: (8, 1, 32, 32), normalized."""
    raw, _ = load_fashion_mnist(split="test")
    pixels = F.interpolate(raw[:8].float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    return (pixels - FMNIST_MEAN[0]) / FMNIST_STD[0]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A small VQ-KD tokenizer (64 codes) trained for 20 steps on Fashion-MNIST with the real teacher."""
    out = tmp_path_factory.mktemp("tokenizer")
    overrides = [
        "train.max_steps=20", "data.limit=320", "train.batch_size=16", "train.eval_images=64", "model.num_codes=64",
        "teacher.input_size=64", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
        "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2", f"train.output_dir={out}",
    ]  # fmt: skip
    train_tokenizer(load_config(RECIPES / "vqkd_fmnist.yaml", overrides, schema=TokenizerConfig), progress=False)
    return out / "tokenizer.pt"


@pytest.fixture(scope="module", autouse=True)
def _tokenizer_for_model_with(tokenizer_path: Path) -> None:
    TOKENIZER["path"] = str(tokenizer_path)


TOKENIZER: dict[str, str] = {}


def model_with(target: str, **extra):
    torch.manual_seed(0)
    if target in ("maskdistill", "milan"):
        extra = {**LITE0, **NORMALIZATION, "target": target, **extra}
    elif target == "vqkd":
        extra = {"target": "vqkd", "tokenizer": TOKENIZER["path"], **NORMALIZATION, **extra}
    else:
        extra = {"target": target, **extra}
    return create_model("vit_tiny", **TINY, **extra)


def test_each_target_sets_the_prediction_width() -> None:
    # HOG: 9 bins x 2x2 cells of 2 pixels; vqkd: the 64-code tokenizer's logits
    widths = {"pixel": 4 * 4 * 1, "hog": 9 * 2 * 2, "maskdistill": 112, "milan": 112, "vqkd": 64}
    assert set(widths) == set(TARGETS)
    for name, width in widths.items():
        model = model_with(name)
        assert model.target.dim == width and model.decoder.pred.out_features == width, name
    assert isinstance(model_with("hog").target, HOGTarget) and isinstance(model_with("pixel").target, PixelTarget)
    milan = model_with("milan")
    assert isinstance(milan.decoder, PromptingDecoder)
    assert not isinstance(model_with("maskdistill").decoder, PromptingDecoder)
    assert milan.target.loss == "cosine" and not milan.target.normalize  # MILAN: cosine, features as they come


def test_teacher_targets_are_normalized_per_patch(images) -> None:
    target = model_with("maskdistill").target
    assert isinstance(target, TeacherTarget)
    features = target.targets(images)  # (8, 64, 112)
    assert features.shape == (8, 64, 112) and not features.requires_grad
    torch.testing.assert_close(features.mean(dim=-1), torch.zeros(8, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(features.var(dim=-1, unbiased=False), torch.ones(8, 64), atol=1e-3, rtol=0)
    raw = target.features(images)
    assert raw.mean(dim=-1).abs().max() > 0.01  # the teacher's own features are not normalized already


@pytest.mark.parametrize("kind", ["hog", "maskdistill", "vqkd"])
def test_the_loss_sees_hidden_patches_only(images, kind) -> None:
    model = model_with(kind)
    spec = RandomMasker(0.75)(8, model.grid, generator=torch.Generator().manual_seed(0))
    pred = torch.randn(8, 64, model.target.dim, generator=torch.Generator().manual_seed(1))
    loss = model.target(images, pred, spec)
    visible = (~spec.mask).unsqueeze(-1)  # (8, 64, 1)
    assert torch.equal(model.target(images, torch.where(visible, pred + 5.0, pred), spec), loss)
    assert not torch.equal(model.target(images, torch.where(visible, pred, pred + 5.0), spec), loss)
    if kind == "vqkd":  # cross-entropy of the logits against each hidden patch's code
        codes = model.target.targets(images)  # (8, 64)
        expected = F.cross_entropy(pred[spec.mask], codes[spec.mask])
    else:
        expected = patch_loss(pred, model.target.targets(images), model.target.loss)[spec.mask].mean()
    torch.testing.assert_close(loss, expected)


def test_cosine_loss_is_one_minus_cosine_similarity() -> None:
    pred, target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]), torch.tensor([[[0.0, 2.0], [3.0, 3.0]]])
    torch.testing.assert_close(patch_loss(pred, target, "cosine"), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="unknown loss 'huber'"):
        patch_loss(pred, target, "huber")


@pytest.mark.parametrize("kind", ["pixel", "hog", "maskdistill", "milan", "vqkd"])
def test_each_target_overfits_eight_images(images, kind) -> None:
    # One fixed mask on eight real images: the loss on the hidden patches must fall 10x (pixels: raw, as in
    # the MAE test; per-patch normalized 4x4 patches are near noise for so small a model).
    model = model_with(kind, **({"norm_pix": False} if kind == "pixel" else {}))
    spec: MaskSpec = RandomMasker(0.75)(8, model.grid, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = model(images, mask=spec).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (kind, losses[0], losses[-1])


def test_teacher_stays_frozen_and_out_of_checkpoints(tmp_path: Path) -> None:
    overrides = [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder=micro", "data.limit=64",
        "train.batch_size=16", "train.max_steps=3", "train.progress=false", "log.tensorboard=false",
        "eval.reconstruct=true", "eval.knn=false", "target.type=maskdistill", "target.teacher.spec=efficientnet_lite0",
        "target.teacher.input_size=64", f"train.output_dir={tmp_path}",
    ]  # fmt: skip
    trainer = Pretrainer(load_config(None, overrides))
    teacher = trainer.model.target.teacher
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    student = {key: value.clone() for key, value in trainer.model.encoder.state_dict().items()}
    trainer.fit()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(value, before[key]) for key, value in teacher.state_dict().items())
    assert any(not torch.equal(v, student[k]) for k, v in trainer.model.encoder.state_dict().items())  # it learned
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    assert not any(".teacher." in key for key in saved)  # the student only: the teacher is rebuilt from its spec
    restored = load_checkpoint(tmp_path / "last.pt")
    assert isinstance(restored.target, TeacherTarget) and restored.config["teacher"] == "efficientnet_lite0"
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value.cpu(), restored.state_dict()[key]), key
    again = save_checkpoint_as(restored, tmp_path / "again.pt", "mimkit")
    assert load_checkpoint(again).config == restored.config


def test_target_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"target\.teacher\.spec: target\.type=maskdistill needs a teacher"):
        load_config(None, ["target.type=maskdistill"])
    with pytest.raises(
        ConfigError, match=r"target\.teacher\.spec: only target\.type maskdistill or milan takes a teacher"
    ):
        load_config(None, ["target.teacher.spec=efficientnet_lite0"])
    with pytest.raises(ConfigError, match=r"target\.type: unknown 'clip'"):
        load_config(None, ["target.type=clip"])
    config = load_config(None, ["target.type=maskdistill", "target.teacher.spec=efficientnet_lite0"])
    assert config.target.resolved_loss() == "smooth_l1" and load_config(None).target.resolved_loss() == "mse"


def test_semantic_aware_masking_keeps_what_the_teacher_attends_to(images, tmp_path: Path) -> None:
    # A transformer teacher: a mimkit checkpoint; its saliency is its class token's last-block attention.
    torch.manual_seed(1)
    teacher_model = create_model("vit_tiny", **TINY)
    path = save_checkpoint_as(teacher_model, tmp_path / "teacher.pt", "mimkit")
    model = create_model(
        "vit_tiny", **TINY, target="milan", teacher=str(path), mask_type="attention",
        mask_options={"mode": "keep", "temperature": 0.0, "source": "teacher"}, **NORMALIZATION,
    )  # fmt: skip
    saliency = model.guidance(images, "teacher_attention")  # (8, 64)
    expected = teacher_model.encoder(images, return_attn=True).attentions[-1].mean(dim=1)[:, 0, 1:]
    torch.testing.assert_close(saliency, expected)
    spec = model.make_mask(8, images=images, generator=torch.Generator().manual_seed(0))
    top = saliency.topk(spec.num_visible, dim=1).indices.sort(dim=1).values  # (8, 16) the most attended
    assert torch.equal(spec.ids_keep.sort(dim=1).values, top)  # MILAN keeps them visible
    # A convolutional teacher: the norm of each patch's feature vector.
    lite0 = model_with("maskdistill").target.teacher
    torch.testing.assert_close(lite0.saliency(images, (8, 8)), lite0(images, (8, 8)).norm(dim=-1))


def test_milan_recipe_trains_with_teacher_guided_masks(tmp_path: Path) -> None:
    overrides = [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder=micro", "data.limit=32",
        "train.batch_size=16", "train.max_steps=2", "train.progress=false", "log.tensorboard=false",
        "eval.knn=false", "target.type=milan", "target.teacher.spec=efficientnet_lite0", "target.teacher.input_size=64",
        "mask.type=attention", "mask.attention.mode=keep", "mask.attention.source=teacher",
        f"train.output_dir={tmp_path}",
    ]  # fmt: skip
    summary_steps = Pretrainer(load_config(None, overrides)).fit()
    assert summary_steps.steps == 2 and 0.0 < summary_steps.final_loss < 2.0  # cosine loss lies in [0, 2]
    with pytest.raises(ConfigError, match=r"mask\.attention\.source=teacher needs a teacher target"):
        load_config(None, ["mask.type=attention", "mask.attention.source=teacher"])


def test_vqkd_target_keeps_its_tokenizer_frozen_and_out_of_the_state_dict(images, tokenizer_path: Path) -> None:
    model = model_with("vqkd")
    tokenizer = model.target.tokenizer
    codebook = tokenizer.quantizer.codebook.clone()
    model.train()
    assert not tokenizer.training  # a training student never moves the tokenizer's codebook
    loss = model(images, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert torch.equal(tokenizer.quantizer.codebook, codebook) and all(p.grad is None for p in tokenizer.parameters())
    assert 0.5 * math.log(64) < loss.item() < 2 * math.log(64)  # untrained: about uniform over 64 codes
    assert not any("tokenizer." in key for key in model.state_dict())
    with pytest.raises(ValueError, match="normalized with mean"):
        create_model(
            "vit_tiny", **TINY, target="vqkd", tokenizer=str(tokenizer_path), data_mean=(0.5,), data_std=(0.5,)
        )
    with pytest.raises(ConfigError, match=r"target\.tokenizer: target\.type=vqkd needs target\.tokenizer"):
        load_config(None, ["target.type=vqkd"])


def test_class_token_pretraining_adds_a_second_prediction_of_the_hidden_codes(images) -> None:
    model = model_with("vqkd", cls_enabled=True, cls_depth=1)
    assert model.decoder.layer == 1 and model.decoder.head.pred is model.decoder.decoder.pred  # 3/4 of 2 blocks
    out = model(images, generator=torch.Generator().manual_seed(0))
    main_loss, aux_loss = out.extras["main_loss"], out.extras["aux_loss"]
    torch.testing.assert_close(out.loss.detach(), main_loss + aux_loss.detach())
    out.loss.backward()
    head_block = model.decoder.head.blocks[0].attn.qkv.weight
    assert head_block.grad is not None and head_block.grad.abs().sum() > 0
    # The head sees the final class token and block 1's tokens: every encoder block gets its gradient.
    assert all(block.mlp.fc2.weight.grad.abs().sum() > 0 for block in model.encoder.blocks)
    plain = model_with("vqkd")
    assert "aux_loss" not in plain(images, generator=torch.Generator().manual_seed(0)).extras
    with pytest.raises(ConfigError, match=r"target\.cls\.enabled: needs an encoder with a class token"):
        load_config(RECIPES / "convmae_tiny_fmnist.yaml", ["target.cls.enabled=true"])


def test_a_guided_milan_step_runs_the_teacher_once(images) -> None:
    model = model_with("milan", mask_type="attention", mask_options={"mode": "keep", "source": "teacher"})
    calls = []
    stem = next(m for m in model.target.teacher.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    stem.register_forward_hook(lambda *_: calls.append(1))  # the teacher's first convolution
    model(images, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert len(calls) == 1  # the mask's saliency and the loss's targets share one teacher forward
    model(images.clone(), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2  # another batch: a fresh forward


def test_teacher_feature_cache_serves_repeated_images_from_disk(images, tmp_path: Path) -> None:
    cached = model_with("maskdistill", teacher_cache=str(tmp_path / "cache")).target
    plain = model_with("maskdistill").target
    calls = []
    stem = next(m for m in cached.teacher.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    stem.register_forward_hook(lambda *_: calls.append(1))
    first = cached.targets(images.clone())
    assert (cached.cache.misses, cached.cache.hits, len(calls)) == (8, 0, 1)
    again = cached.targets(torch.cat([images[4:], images[:4]]))  # the same images, another order and tensor
    assert (cached.cache.misses, cached.cache.hits, len(calls)) == (8, 8, 1)  # no teacher forward
    assert torch.equal(again, torch.cat([first[4:], first[:4]]))
    torch.testing.assert_close(first, plain.targets(images))
    reopened = model_with("maskdistill", teacher_cache=str(tmp_path / "cache")).target  # a new run: from disk
    assert torch.equal(reopened.targets(images.clone()), first) and reopened.cache.hits == 8
    with pytest.raises(ValueError, match="holds features of"):
        model_with("maskdistill", teacher_cache=str(tmp_path / "cache"), teacher_options={"input_size": 96})


def test_unaugmented_training_reads_the_teacher_from_the_cache_after_one_epoch(tmp_path: Path) -> None:
    overrides = [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder=micro", "data.limit=32",
        "train.batch_size=16", "train.epochs=2", "train.progress=false", "log.tensorboard=false", "eval.knn=false",
        "eval.reconstruct=false", "target.type=maskdistill", "target.teacher.spec=efficientnet_lite0",
        "target.teacher.input_size=64", f"target.teacher.cache={tmp_path / 'cache'}", "data.crop_scale=[1,1]",
        "data.crop_ratio=[1,1]", "data.hflip=false", f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    trainer = Pretrainer(load_config(None, overrides))
    trainer.fit()
    cache = trainer.model.target.cache
    assert (cache.misses, cache.hits) == (32, 32)  # epoch 1 computes every image, epoch 2 reads them all
    with pytest.raises(ConfigError, match=r"target\.teacher\.cache"):
        load_config(None, [f"target.teacher.cache={tmp_path}"])
