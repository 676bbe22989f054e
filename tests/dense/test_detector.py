"""Mask R-CNN on mimkit backbones: it learns (overfits a few images), saves, reloads and evaluates."""

import json
from pathlib import Path

import pytest
import torch

from mimkit.build import create_model
from mimkit.checkpoints.load import save_checkpoint_as
from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.dense.data.coco import CocoDetection
from mimkit.dense.data.shapes import generate_shapes
from mimkit.dense.evaluation.coco_ap import coco_evaluate, predict
from mimkit.tasks.detect import (
    DetectConfig,
    build_detection_model,
    load_detector,
    load_pretrained,
    pretrained_for,
    run_detect_train,
    train_detector,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_coco_evaluation_scores_the_ground_truth_as_perfect(shapes_root: Path) -> None:
    dataset = CocoDetection(shapes_root)
    outputs = []
    for index in range(len(dataset)):
        target = dataset.target(index)
        count = len(target["labels"])
        outputs.append(
            {
                "boxes": target["boxes"],
                "labels": target["labels"],
                "scores": torch.linspace(0.9, 0.8, count),
                "masks": target["masks"][:, None].float(),
            }
        )
    results = coco_evaluate(dataset, outputs)
    assert results["box"]["AP"] == pytest.approx(100.0) and results["mask"]["AP"] == pytest.approx(100.0)
    outputs[0] = {key: value[:0] for key, value in outputs[0].items()}  # miss every object of one image
    assert coco_evaluate(dataset, outputs)["box"]["AP50"] < 100.0


def test_detections_of_a_crowd_region_are_ignored_not_false_positives(shapes_root: Path, tmp_path: Path) -> None:
    data = json.loads((shapes_root / "annotations.json").read_text())
    first = data["images"][0]
    # a crowd of category 1 in the image's top-left corner (a 10x10 square: box and polygon)
    crowd = {"id": 10_000, "image_id": first["id"], "category_id": data["categories"][0]["id"], "iscrowd": 1,
             "bbox": [0, 0, 10, 10], "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]], "area": 100}  # fmt: skip

    def scores_with(annotations: list) -> dict:
        root = tmp_path / f"set{len(annotations)}"
        root.mkdir()
        (root / "images").symlink_to(shapes_root / "images")
        (root / "annotations.json").write_text(json.dumps({**data, "annotations": annotations}))
        dataset = CocoDetection(root)
        outputs = []
        for index in range(len(dataset)):
            target = dataset.target(index)
            scores = torch.full((len(target["labels"]),), 0.8)
            out = {"boxes": target["boxes"], "labels": target["labels"], "scores": scores,
                   "masks": target["masks"][:, None].float()}  # fmt: skip
            if index == 0:  # the most confident detection of the set lies on the crowd
                square = torch.zeros(1, 1, 32, 32)
                square[..., :10, :10] = 1.0
                out = {"boxes": torch.cat([torch.tensor([[0.0, 0.0, 10.0, 10.0]]), out["boxes"]]),
                       "labels": torch.cat([torch.tensor([1]), out["labels"]]),
                       "scores": torch.cat([torch.tensor([0.99]), out["scores"]]),
                       "masks": torch.cat([square, out["masks"]])}  # fmt: skip
            outputs.append(out)
        return coco_evaluate(dataset, outputs)

    with_crowd = scores_with([*data["annotations"], crowd])
    assert with_crowd["box"]["AP"] == pytest.approx(100.0) and with_crowd["mask"]["AP"] == pytest.approx(100.0)
    without = scores_with(data["annotations"])  # the same detection, no crowd to excuse it: a false positive
    assert without["box"]["AP"] < 99.0 and without["mask"]["AP"] < 99.0


@pytest.mark.slow
def test_a_tiny_mimdet_mask_rcnn_overfits_four_images(tmp_path: Path, tiny_config) -> None:
    """100 steps on 4 shapes images (32x32, 1-2 objects each), random init, token sampling 0.5 in training:
    measured box and mask AP50 1.00 on those images (about 40 s on one CPU thread); the bar is 0.8. The
    randomly initialized ConvStem in front of the ViT needs more steps than the patch embedding did: at 60
    steps it reached box AP50 0.77 (mask 0.95)."""
    root = generate_shapes(tmp_path / "four", 4, size=32, max_objects=2, seed=3)
    config = tiny_config
    config.train.max_steps, config.train.lr = 100, 2e-3
    torch.manual_seed(0)
    dataset = CocoDetection(root, img_size=32)
    detector = build_detection_model(pretrained_for(config), config, len(dataset.classes))
    summary = train_detector(detector, dataset, config, out_dir=tmp_path / "run", progress=False)
    assert summary["steps"] == 100 and (tmp_path / "run" / "last.pt").is_file()
    results = coco_evaluate(dataset, predict(detector, dataset))
    assert results["box"]["AP50"] > 80.0, results
    assert results["mask"]["AP50"] > 80.0, results


def test_detect_train_and_detect_eval_run_end_to_end_from_a_checkpoint(
    shapes_root: Path, tmp_path: Path, capsys
) -> None:
    torch.manual_seed(0)
    mae = create_model(
        "vit_tiny", img_size=32, patch_size=8, in_chans=3, depth=2, embed_dim=64, num_heads=2, decoder="micro"
    )
    checkpoint = save_checkpoint_as(mae, tmp_path / "mae.pt", "mae")  # the original MAE layout
    out = tmp_path / "run"
    args = [
        "detect-train", "--no-progress", f"model.checkpoint={checkpoint}", f"data.train={shapes_root}",
        f"data.val={shapes_root}", "data.val_limit=4", "train.max_steps=2", "train.batch_size=4",
        "train.tensorboard=false", f"train.output_dir={out}", "model.fpn_channels=16",
        "model.box_head_dim=32",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "box AP" in printed and "mask AP" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["pretrained"] == str(checkpoint) and results["train"]["steps"] == 2
    assert (out / "predictions.png").is_file() and (out / "config.yaml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "train/loss_mask" in records[-1]
    # the reloaded detector reproduces the run's own evaluation
    assert main(["detect-eval", "--no-progress", "--checkpoint", str(out / "last.pt"), "--data", str(shapes_root),
                 "--limit", "4", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert again["box"] == results["val"]["box"] and again["mask"] == results["val"]["mask"]
    _, config, state = load_detector(out / "last.pt")
    assert state["classes"] == ["ellipse", "triangle", "rectangle"] and config.model.sample_ratio == 0.5
    assert state["config"]["model"]["stem"] == "conv" and results["stem"] == "conv"  # recorded in the checkpoint
    assert main(args) == 2  # a finished run is not overwritten
    assert "choose a new train.output_dir" in capsys.readouterr().err


def test_a_detector_trains_and_reloads_at_a_larger_input_than_its_pretraining(
    shapes_root: Path, tmp_path: Path, tiny_config
) -> None:
    from mimkit.layers import sincos_2d
    from mimkit.tasks.detect import run_detect_eval

    torch.manual_seed(0)
    mae = create_model("vit_tiny", img_size=32, patch_size=8, in_chans=3, depth=2, embed_dim=64, num_heads=2,
                       decoder="micro")  # fmt: skip
    config = tiny_config
    config.model.checkpoint = str(save_checkpoint_as(mae, tmp_path / "mae.pt", "mimkit"))
    config.model.img_size, config.train.max_steps = 48, 2  # 4x4 pretraining grid -> 6x6
    config.data.train = config.data.val = str(shapes_root)
    config.train.output_dir = str(tmp_path / "run")
    results = run_detect_train(config)
    detector, _, state = load_detector(tmp_path / "run" / "last.pt")
    encoder = detector.backbone.body.encoder
    assert state["encoder_config"]["img_size"] == 48 and encoder.grid == (6, 6)
    assert torch.equal(encoder.pos_embed[0], sincos_2d(64, (6, 6), 1))  # recomputed, not interpolated
    assert detector.transform.min_size == (48,) and CocoDetection(shapes_root, img_size=48)[0][0].shape == (3, 48, 48)
    again = run_detect_eval(tmp_path / "run" / "last.pt", shapes_root, out_dir=tmp_path / "eval", progress=False)
    assert again["box"] == results["val"]["box"] and again["mask"] == results["val"]["mask"]
    with pytest.raises(ConfigError, match=r"model\.img_size: .*not divisible"):
        load_pretrained(config.model.checkpoint, img_size=50)


def test_a_detector_of_the_layout_before_the_conv_stem_still_loads_and_evaluates(
    shapes_root: Path, tmp_path: Path, tiny_config
) -> None:
    """Checkpoints written before ``model.stem`` existed: pretrained patch embedding, side stem (64, 128),
    max-pooled 1/32 level. Their config has no ``stem`` or ``p5_pool`` key."""
    from mimkit.tasks.detect import run_detect_eval

    config = tiny_config
    config.model.stem, config.model.p5_pool, config.model.stem_channels = "patch_embed", "max", (64, 128)
    config.data.train = config.data.val = str(shapes_root)
    config.train.max_steps, config.train.output_dir = 2, str(tmp_path / "run")
    results = run_detect_train(config)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert {"backbone.body.stem.stride4.0.weight", "backbone.body.stem.stride8.0.weight"} <= set(state["model"])
    for key in ("stem", "p5_pool"):
        del state["config"]["model"][key]
    torch.save(state, tmp_path / "old.pt")
    _, loaded, _ = load_detector(tmp_path / "old.pt")
    assert (loaded.model.stem, loaded.model.p5_pool) == ("patch_embed", "max")
    again = run_detect_eval(tmp_path / "old.pt", shapes_root, out_dir=tmp_path / "eval", progress=False)
    assert again["box"] == results["val"]["box"] and again["mask"] == results["val"]["mask"]
    # read with today's defaults instead, the same weights do not fit the ConvStem detector
    from mimkit.config import from_dict
    from mimkit.tasks.detect import DetectConfig

    today = from_dict(DetectConfig, state["config"])
    assert today.model.stem == "conv"
    with pytest.raises(ConfigError, match=r"model\.stem_channels"):
        today.validate()


def test_convmae_backbone_trains_a_step(shapes_root: Path, tmp_path: Path, tiny_config) -> None:
    config = tiny_config
    e = config.encoder
    e.name, e.patch_sizes, e.embed_dims, e.depths, e.num_heads = "convmae_tiny", (2, 2, 2), (16, 32, 64), (1, 1, 1), 2
    config.model.backbone, config.train.max_steps, config.train.warmup_steps = "convmae", 1, 0
    dataset = CocoDetection(shapes_root, img_size=32)
    detector = build_detection_model(pretrained_for(config), config, 3)
    assert detector.backbone.strides == [2, 4, 8, 16]
    before = detector.backbone.body.encoder.blocks3[0].attn.qkv.weight.detach().clone()
    train_detector(detector, dataset, config, out_dir=tmp_path, progress=False)
    assert not torch.equal(before, detector.backbone.body.encoder.blocks3[0].attn.qkv.weight)


def test_bad_settings_are_reported_before_any_compute(shapes_root: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"model\.sample_ratio"):
        load_config(None, ["model.sample_ratio=0"], schema=DetectConfig)
    with pytest.raises(ConfigError, match=r"model\.fill"):
        load_config(None, ["model.fill=zeros"], schema=DetectConfig)
    with pytest.raises(ConfigError, match=r"model\.stem: must be one of"):
        load_config(None, ["model.stem=vit"], schema=DetectConfig)
    with pytest.raises(ConfigError, match=r"model\.p5_pool"):
        load_config(None, ["model.p5_pool=sum"], schema=DetectConfig)
    with pytest.raises(ConfigError, match=r"model\.stem_channels: sets the side stem of model\.stem=patch_embed"):
        load_config(None, ["model.stem_channels=[16,32]"], schema=DetectConfig)
    code = main(["detect-train", "encoder.img_size=32", "encoder.patch_size=4", "encoder.in_chans=3",
                 f"data.train={shapes_root}", f"train.output_dir={tmp_path / 'p4'}"])  # fmt: skip
    assert code == 2 and "model.stem=conv needs a patch_size" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["model.samples=3"], schema=DetectConfig)
    code = main(["detect-train", "encoder.img_size=30", "encoder.patch_size=8", f"train.output_dir={tmp_path}"])
    assert code == 2 and "not divisible" in capsys.readouterr().err
    code = main(["detect-train", "model.checkpoint=/nonexistent.pt", f"train.output_dir={tmp_path}"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["detect-train", "model.backbone=convmae", "encoder.in_chans=3", "encoder.img_size=32",
                 "encoder.patch_size=8", f"train.output_dir={tmp_path}", f"data.train={tmp_path}"])  # fmt: skip
    assert code == 2 and "no annotation file" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["mimkit", "mae", "hf"])
def test_pretrained_weights_load_from_every_checkpoint_layout(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    mae = create_model("vit_tiny", img_size=32, patch_size=8, in_chans=3, depth=2, embed_dim=64, num_heads=2)
    path = save_checkpoint_as(mae, tmp_path / ("hf" if layout == "hf" else "mae.pt"), layout)
    pretrained = load_pretrained(str(path))
    for name, value in mae.encoder.state_dict().items():
        torch.testing.assert_close(pretrained.model.encoder.state_dict()[name], value, msg=name)
    for name, value in mae.decoder.state_dict().items():  # the MAE decoder fills MIMDet's unsampled positions
        torch.testing.assert_close(pretrained.model.decoder.state_dict()[name], value, msg=name)
    untrained = load_pretrained(str(path), random_init=True, seed=1).model.encoder
    assert not torch.equal(untrained.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)


def test_box_only_data_trains_a_faster_rcnn_and_scores_boxes(shapes_root: Path, tmp_path: Path, tiny_config) -> None:
    coco = json.loads((shapes_root / "annotations.json").read_text())
    for ann in coco["annotations"]:
        del ann["segmentation"]  # as imported from Pascal-VOC XML
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    config = tiny_config
    config.model.masks, config.train.max_steps = False, 2
    config.data.train, config.data.train_annotations = str(shapes_root), str(tmp_path / "boxes.json")
    config.data.val, config.data.val_annotations = config.data.train, config.data.train_annotations
    config.train.output_dir = str(tmp_path / "run")
    results = run_detect_train(config)
    assert "mask" not in results["val"] and 0.0 <= results["val"]["box"]["AP"] <= 100.0
    assert results["train"]["losses"].keys() >= {"loss_classifier", "loss_box_reg"}
    assert "loss_mask" not in results["train"]["losses"]


def test_a_detection_run_killed_mid_way_resumes_to_the_same_weights(
    shapes_root: Path, tmp_path: Path, tiny_config, monkeypatch
) -> None:
    from torchvision.models.detection import MaskRCNN

    config = tiny_config
    config.data.hflip = True  # the flips' random stream must resume too
    config.data.train, config.train.max_steps, config.train.save_every_steps = str(shapes_root), 7, 2
    config.train.output_dir = str(tmp_path / "full")
    run_detect_train(config)  # 7 steps of 4 images: an epoch of 8 images is 2 steps, so 3.5 epochs
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]

    config.train.output_dir = str(tmp_path / "killed")
    real_forward = MaskRCNN.forward
    calls = {"n": 0}

    def dies_at_step_six(self, *args, **kwargs):  # the process dies during step 6 (its 6th forward pass)
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "forward", dies_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        run_detect_train(config)
    monkeypatch.undo()
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 4  # the last save
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_detect_train(config)
    torch.manual_seed(1234)  # whatever the global RNG holds, the resume restores it
    resumed = run_detect_train(config, resume=True)
    assert resumed["train"]["resumed_at"] == 4 and resumed["train"]["steps"] == 7
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["model"]
    for key, value in full.items():
        assert torch.equal(state[key], value), key
    config.train.lr = 1.0
    with pytest.raises(ValueError, match=r"train.lr: 0.0003 in the checkpoint, 1.0 here"):
        run_detect_train(config, resume=True)


def test_prediction_pictures_draw_confident_detections_and_caption_the_rest() -> None:
    import numpy as np

    from mimkit.dense.evaluation.coco_ap import PALETTE, draw_detections

    image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    output = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0], [2.0, 2.0, 30.0, 30.0]]),
              "labels": torch.tensor([2, 1]), "scores": torch.tensor([0.9, 0.2])}  # fmt: skip
    picture = np.asarray(draw_detections(image, output, ["ellipse", "triangle"], score_threshold=0.5, scale=4))
    assert picture.shape == (128, 128, 3)
    assert (picture[16, 16:80] == PALETTE[1]).all()  # the top edge of the 0.9 "triangle" box, 4x upscaled
    assert not (picture == PALETTE[0]).all(axis=-1).any()  # the 0.2 "ellipse" box is not drawn
    caption = picture[-16:, :100]
    assert (caption.max(-1) == 0).any() and (caption.min(-1) > 200).any()  # light text on black
    nothing = np.asarray(draw_detections(image, {**output, "scores": torch.tensor([0.3, 0.2])}, ["e", "t"]))
    assert (nothing[-16:, :100].min(-1) > 200).any() and (nothing[:100] == 128).all()  # only the caption
