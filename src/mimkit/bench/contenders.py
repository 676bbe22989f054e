"""What the benchmark times: the architectures (:data:`CONFIGS`), mimkit's pretraining model and HuggingFace
``ViTMAEForPreTraining`` of the same architecture, and one training step of each (forward, backward and an
AdamW update) with its analytic FLOPs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mimkit.bench.timing import Contender
from mimkit.build import create_model
from mimkit.models import MaskedImageModel

# The architectures the benchmark compares (``create_model`` arguments) and their batch.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(name="vit_tiny", img_size=32, patch_size=4, in_chans=3, decoder="tiny", batch=128),
    "base": dict(name="vit_base", img_size=224, patch_size=16, in_chans=3, decoder="mae", batch=32),
    "large": dict(name="vit_large", img_size=224, patch_size=16, in_chans=3, decoder="mae", batch=8),
    # ConvMAE-Small's widths on the tiny config's 8x8 grid of 32x32 images (no HF peer).
    "convmae": dict(name="convmae_small", img_size=32, patch_sizes=(1, 2, 2), in_chans=3, decoder="tiny", batch=128),
    "smoke_convmae": dict(
        name="convmae_tiny", img_size=16, patch_sizes=(1, 2, 2), in_chans=3, decoder="micro", batch=4
    ),
    # A few-second smoke test of the whole benchmark.
    "smoke": dict(
        name="vit_tiny",
        img_size=16,
        patch_size=4,
        in_chans=3,
        decoder="micro",
        depth=2,
        embed_dim=64,
        num_heads=2,
        batch=4,
    ),
}


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``create_model`` keyword arguments of a :data:`CONFIGS` entry (everything but name and batch)."""
    return {key: value for key, value in config.items() if key not in ("name", "batch")}


def step_flops(model: MaskedImageModel, batch: int, mask_ratio: float | None = None) -> float:
    """Analytic FLOPs of one training step: 3x the forward FLOPs (backward ~ 2x forward) times the batch."""
    from mimkit.analysis.complexity import model_info

    return 3.0 * model_info(model, mask_ratio)["pretrain_flops"] * batch


def build_mimkit(config: dict[str, Any], *, seed: int = 0, **overrides: Any) -> MaskedImageModel:
    """mimkit's pretraining model of a :data:`CONFIGS` entry, random init, train mode."""
    torch.manual_seed(seed)
    model = create_model(config["name"], **{**model_kwargs(config), **overrides})
    return model.train()


def build_hf(model: MaskedImageModel, *, copy_weights: bool = False) -> nn.Module:
    """HuggingFace ``ViTMAEForPreTraining`` of the same architecture as ``model`` (SDPA attention), random
    init, or with ``model``'s weights when ``copy_weights``."""
    from mimkit.checkpoints.load import import_transformers

    transformers = import_transformers("comparisons with HuggingFace ViTMAE")

    from mimkit.checkpoints.convert import from_mimkit, hf_config_from_args

    hf_config = hf_config_from_args(model.config)
    hf_config._attn_implementation = "sdpa"
    hf = transformers.ViTMAEForPreTraining(hf_config)
    if copy_weights:
        hf.load_state_dict(from_mimkit(model.state_dict(), "hf"), strict=True)
    return hf.train()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_images(config: dict[str, Any], batch: int | None = None, seed: int = 0) -> Tensor:
    """A fixed batch of normalized-looking images (B, C, H, W) for a config."""
    generator = torch.Generator().manual_seed(seed)
    size = config["img_size"]
    return torch.randn(batch or config["batch"], config["in_chans"], size, size, generator=generator)


def adamw(model: nn.Module, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (``foreach`` kernels, or the fused kernel when ``fused``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def mimkit_contender(
    label: str,
    model: MaskedImageModel,
    images: Tensor,
    *,
    fused_adamw: bool = False,
    flops: float | None = None,
    bf16: bool = False,
) -> Contender:
    """A step of a mimkit model: masks from a per-step seeded generator, as the training loop does; the
    forward under bf16 autocast when ``bf16`` (as ``train.precision=bf16``)."""
    optimizer = adamw(model, fused=fused_adamw)
    counter = iter(range(1 << 62))
    batch = images.shape[0]

    def step() -> Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(images, generator=torch.Generator().manual_seed(next(counter))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Contender(label, step, batch, step_flops(model, batch) if flops is None else flops, model)


def hf_contender(label: str, hf: nn.Module, images: Tensor, flops: float, *, bf16: bool = False) -> Contender:
    """A step of HF ``ViTMAEForPreTraining`` (it draws its own mask noise), under bf16 autocast when ``bf16``."""
    optimizer = adamw(hf)

    def step() -> Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf(pixel_values=images).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Contender(label, step, images.shape[0], flops, hf)
