"""Every alternative path gives what the plain path gives: plain-op attention against SDPA,
activation checkpointing against keeping activations, and ``torch.compile`` against eager."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mimkit.build import create_model
from mimkit.layers import Attention, Block, set_attention_impl
from mimkit.models import MaskedImageModel

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=3, decoder="micro")
CONV = dict(img_size=16, patch_sizes=(1, 2, 2), in_chans=3, decoder="micro")


def assert_norm_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "") -> None:
    """``|actual - expected| <= rel * |expected|`` in the L2 norm over the whole tensor: rounding differences
    of a sum over many tokens are compared with the size of the tensor, not element by element."""
    error, scale = (actual - expected).norm().item(), expected.norm().item()
    assert error <= rel * scale + 1e-12, f"{name}: |difference| {error:.3e} > {rel:g} x |expected| {scale:.3e}"


def loss_and_grads(model: MaskedImageModel, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every parameter's gradient of one forward/backward on fixed images and mask noise."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 16, 16, generator=generator)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop path
    mask = model.make_mask(3, generator=generator)
    loss = model(images, mask=mask).loss
    loss.backward()
    grads = {  # torch.compile's wrapper adds "_orig_mod." to the names
        name.replace("_orig_mod.", ""): p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
    }
    return loss.detach(), grads


def twin(name: str, **kwargs: Any) -> tuple[MaskedImageModel, MaskedImageModel]:
    """Two models with the same weights, the second built with ``kwargs``."""
    base = {**(CONV if name.startswith("convmae") else TINY)}
    plain = create_model(name, **base)
    other = create_model(name, **{**base, **kwargs})
    other.load_state_dict(plain.state_dict())
    return plain, other


def assert_same(
    a: tuple[torch.Tensor, dict[str, torch.Tensor]], b: tuple[torch.Tensor, dict[str, torch.Tensor]], rel: float
) -> None:
    """Same loss and same gradient for every parameter, up to ``rel`` (see :func:`assert_norm_close`)."""
    assert_norm_close(a[0], b[0], rel, "loss")
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        assert_norm_close(a[1][name], b[1][name], rel, name)


def test_attention_impl_is_checked() -> None:
    assert Attention(48, 3).attn_impl == "sdpa"
    with pytest.raises(ValueError, match="attn_impl"):
        Attention(48, 3, attn_impl="flash")


@pytest.mark.parametrize("length", [5, 17, 65, 80])
@pytest.mark.parametrize("query_start", [0, 3])
def test_math_attention_equals_sdpa_in_outputs_and_gradients(length: int, query_start: int) -> None:
    """Tolerance: 1e-5 relative and absolute (float32 rounding of two summation orders)."""
    torch.manual_seed(0)
    block = Block(48, 3)
    x = torch.randn(4, length, 48)
    results = []
    for impl in ("sdpa", "math"):
        set_attention_impl(block, impl)
        block.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        out, _ = block(inputs, query_start=query_start)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [inputs.grad] + [p.grad for p in block.parameters()]
        results.append((out.detach(), grads))
    assert_norm_close(results[1][0], results[0][0], 1e-5, "output")
    for index, (sdpa_grad, math_grad) in enumerate(zip(results[0][1], results[1][1], strict=True)):
        assert_norm_close(math_grad, sdpa_grad, 1e-5, f"gradient {index}")


@pytest.mark.parametrize("name", ["vit_tiny", "convmae_tiny"])
def test_whole_model_math_attention_equals_sdpa(name: str) -> None:
    plain, math = twin(name)
    set_attention_impl(math, "math")
    assert_same(loss_and_grads(math), loss_and_grads(plain), rel=1e-5)


@pytest.mark.parametrize("name", ["vit_tiny", "convmae_tiny"])
@pytest.mark.parametrize("drop_path_rate", [0.0, 0.2])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name: str, drop_path_rate: float) -> None:
    """Tolerance 1e-5 relative, in the norm (the recomputation runs the very same ops; drop path replays its RNG)."""
    plain, checkpointed = twin(name, grad_checkpointing=True, drop_path_rate=drop_path_rate)
    plain.encoder.set_drop_path_rate(drop_path_rate)  # type: ignore[operator]
    assert checkpointed.encoder.grad_checkpointing and checkpointed.decoder.grad_checkpointing
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    assert_same(loss_and_grads(checkpointed), loss_and_grads(plain), rel=1e-5)


def test_grad_checkpointing_keeps_fewer_tensors_for_backward() -> None:
    """What checkpointing is for: the tensors autograd saves during the forward pass shrink."""
    plain, checkpointed = twin("vit_tiny", grad_checkpointing=True)
    images = torch.randn(3, 3, 16, 16)
    saved = []
    for model in (plain, checkpointed):
        count = [0]

        def pack(tensor: torch.Tensor, count: list[int] = count) -> torch.Tensor:
            count[0] += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(images, generator=torch.Generator().manual_seed(0)).loss.backward()
        saved.append(count[0])
    assert saved[1] < 0.6 * saved[0]


def test_grad_checkpointing_is_off_in_eval_and_without_gradients() -> None:
    plain, checkpointed = twin("vit_tiny", grad_checkpointing=True)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            checkpointed.encoder.forward_features(images), plain.encoder.forward_features(images), rtol=0, atol=0
        )


def test_create_model_accepts_grad_checkpointing_and_keeps_it_in_the_config() -> None:
    model = create_model("vit_tiny", **TINY, grad_checkpointing=True)
    assert model.config["grad_checkpointing"] is True
    assert create_model("vit_tiny", **TINY).config["grad_checkpointing"] is False


@pytest.mark.slow
def test_torch_compile_of_a_tiny_model_equals_eager() -> None:
    """Inductor on the CPU (C++ code built with the system compiler). Tolerance 1e-4 relative, in the norm:
    fused kernels sum in another order than eager."""
    torch._dynamo.reset()
    small = {**TINY, "embed_dim": 24, "depth": 1, "decoder_depth": 1}
    plain = create_model("vit_tiny", **small)
    compiled = create_model("vit_tiny", **small)
    compiled.load_state_dict(plain.state_dict())
    try:
        compiled.encoder = torch.compile(compiled.encoder)  # type: ignore[assignment]
        compiled.decoder = torch.compile(compiled.decoder)  # type: ignore[assignment]
        result = loss_and_grads(compiled)
    except Exception as err:  # say why, rather than fail, on a machine without a working C++ compiler
        if "CppCompileError" in type(err).__name__ or "compiler" in str(err).lower():
            pytest.skip(f"inductor cannot compile C++ here: {type(err).__name__}: {str(err)[:200]}")
        raise
    assert_same(result, loss_and_grads(plain), rel=1e-4)
