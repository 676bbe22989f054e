"""MAE's linear probe: the head, LARS against a hand computation, and training on real Fashion-MNIST pixels."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data.fashion_mnist import DEFAULT_ROOT, FASHION_MNIST_CLASSES, load_fashion_mnist
from mimkit.engine.resumable import SettingsChanged
from mimkit.engine.run_guard import TrainingInterrupted
from mimkit.eval.linear import LARS, LinearProbe, train_linear_probe
from mimkit.eval.report import classification_metrics, confusion_matrix, save_confusion_matrix, write_results

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set statistics


@pytest.fixture(scope="module")
def pixels() -> dict[str, torch.Tensor]:
    """Normalized raw pixels (N, 784) of 2000 training and 500 test Fashion-MNIST images."""
    if not DEFAULT_ROOT.is_dir():
        pytest.fail(f"Fashion-MNIST is missing at {DEFAULT_ROOT}: `apt-get install dataset-fashion-mnist`")
    out = {}
    for split, limit in (("train", 2000), ("test", 500)):
        images, labels = load_fashion_mnist(split=split)
        out[f"{split}_features"] = ((images[:limit].float() / 255 - MEAN) / STD).flatten(1)  # (N, 784)
        out[f"{split}_labels"] = labels[:limit].long()
    return out


def test_probe_head_is_parameter_free_batchnorm_then_linear() -> None:
    torch.manual_seed(0)
    probe = LinearProbe(256, 10)
    assert probe.norm.weight is None and probe.norm.bias is None  # affine=False
    assert probe.norm.eps == 1e-6
    assert probe.norm.running_mean.shape == (256,) and probe.norm.running_var.shape == (256,)
    assert [name for name, _ in probe.named_parameters()] == ["head.weight", "head.bias"]
    assert torch.count_nonzero(probe.head.bias) == 0
    assert 0.009 < probe.head.weight.std().item() < 0.011  # trunc_normal(std=0.01) over 2560 values
    # In training mode the BatchNorm whitens each feature of the batch.
    features = torch.randn(64, 256) * 5 + 3
    normalized = probe.norm(features)
    assert torch.allclose(normalized.mean(0), torch.zeros(256), atol=1e-5)
    assert torch.allclose(normalized.var(0, unbiased=False), torch.ones(256), atol=1e-3)
    assert probe(features).shape == (64, 10)


def test_lars_steps_match_a_hand_computation() -> None:
    weight = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    lr, wd, momentum, trust = 0.5, 0.1, 0.9, 0.001
    opt = LARS([weight, bias], lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=trust)
    w, b = weight.detach().clone(), bias.detach().clone()
    mu_w, mu_b = torch.zeros(2, 2), torch.zeros(2)
    grads = [
        (torch.tensor([[1.0, 2.0], [2.0, 0.0]]), torch.tensor([0.5, -0.25])),
        (torch.tensor([[0.0, -1.0], [3.0, 1.0]]), torch.tensor([-1.0, 2.0])),
    ]
    for grad_w, grad_b in grads:
        weight.grad, bias.grad = grad_w.clone(), grad_b.clone()
        opt.step()
        # Hand computation, written out element by element for the matrix.
        decayed = [[grad_w[i][j].item() + wd * w[i][j].item() for j in range(2)] for i in range(2)]
        w_norm = math.sqrt(sum(w[i][j].item() ** 2 for i in range(2) for j in range(2)))
        d_norm = math.sqrt(sum(value**2 for row in decayed for value in row))
        ratio = trust * w_norm / d_norm
        mu_w = torch.tensor(
            [[momentum * mu_w[i][j].item() + ratio * decayed[i][j] for j in range(2)] for i in range(2)]
        )
        w = w - lr * mu_w
        mu_b = momentum * mu_b + grad_b  # 1-D: no weight decay, no trust ratio
        b = b - lr * mu_b
        assert torch.allclose(weight.detach(), w, atol=1e-7)
        assert torch.allclose(bias.detach(), b, atol=1e-7)
    assert not torch.equal(w, torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # it moved


def test_lars_leaves_a_zero_matrix_to_plain_momentum_sgd() -> None:
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    opt = LARS([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones(2, 3)
    opt.step()  # ||w|| = 0: trust ratio 1
    assert torch.allclose(weight.detach(), torch.full((2, 3), -0.1))


def test_linear_probe_on_raw_pixels_is_far_above_chance(pixels) -> None:
    result = train_linear_probe(
        pixels["train_features"],
        pixels["train_labels"],
        pixels["test_features"],
        pixels["test_labels"],
        num_classes=10,
        optimizer="lars",
    )  # MAE's recipe: LARS, blr 0.1, 90 epochs, 10 warmup epochs
    assert result.top1 > 0.6  # measured 0.70; chance 0.1 (sgd reaches ~0.82 on the same features)
    assert result.top5 is not None and result.top5 >= result.top1 and result.top5 > 0.9
    assert len(result.losses) == 90 and result.losses[-1] < 0.7 * result.losses[0]
    assert result.lr == pytest.approx(0.1)
    assert result.confusion.shape == (10, 10) and result.confusion.sum() == 500
    assert result.confusion.trace().item() == round(result.top1 * 500)
    counts = torch.bincount(pixels["test_labels"], minlength=10)
    assert torch.equal(result.confusion.sum(dim=1), counts)
    assert torch.allclose(result.per_class_accuracy, result.confusion.diag() / counts)
    # Trousers are the easiest Fashion-MNIST class, shirts among the hardest.
    assert result.per_class_accuracy[1] > result.per_class_accuracy[6]
    head = result.head
    assert not head.training and head.norm.num_batches_tracked.item() == 90 * (2000 // 256)
    assert head.norm.running_mean.abs().max() > 0.1  # running statistics were collected


def test_linear_probe_is_seeded(pixels) -> None:
    subset = {key: value[:600] for key, value in pixels.items()}
    args = (subset["train_features"], subset["train_labels"], subset["test_features"], subset["test_labels"])
    first = train_linear_probe(*args, num_classes=10, epochs=4, optimizer="sgd", seed=3)
    again = train_linear_probe(*args, num_classes=10, epochs=4, optimizer="sgd", seed=3)
    other = train_linear_probe(*args, num_classes=10, epochs=4, optimizer="sgd", seed=4)
    assert first.losses == again.losses
    assert torch.equal(first.head.head.weight, again.head.head.weight)
    assert first.losses != other.losses


def _signalled_at_step(monkeypatch, step: int) -> None:
    """SIGTERM in the ``step``-th training forward pass of the probe head (1-based)."""
    real_forward = LinearProbe.forward
    calls = {"n": 0}

    def forward(self, features):
        if self.training:
            calls["n"] += 1
            if calls["n"] == step:
                signal.raise_signal(signal.SIGTERM)
        return real_forward(self, features)

    monkeypatch.setattr(LinearProbe, "forward", forward)


@pytest.mark.parametrize("stop_after", [6, 8])  # 4 steps an epoch: in the second epoch, at its end
def test_stopped_probe_resumes_to_the_head_of_a_run_never_stopped(pixels, tmp_path, monkeypatch, stop_after) -> None:
    subset = {key: value[:600] for key, value in pixels.items()}
    args = (subset["train_features"], subset["train_labels"], subset["test_features"], subset["test_labels"])
    recipe = dict(num_classes=10, epochs=4, batch_size=150, optimizer="lars", blr=5.0, warmup_epochs=1, seed=3)
    whole = train_linear_probe(*args, **recipe)
    state_path = tmp_path / "last.pt"
    _signalled_at_step(monkeypatch, stop_after)
    with pytest.raises(TrainingInterrupted, match=f"after step {stop_after}; saved {state_path}, continue with"):
        train_linear_probe(*args, **recipe, state_path=state_path, settings={"blr": 5.0}, keep={"mine": [1]})
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()
    saved = torch.load(state_path, weights_only=True)
    assert saved["step"] == stop_after and saved["progress"]["keep"] == {"mine": [1]}
    with pytest.raises(SettingsChanged, match=r"blr: 5\.0 there, 4\.0 now"):
        train_linear_probe(*args, **recipe, resume_state=saved, settings={"blr": 4.0})
    resumed = train_linear_probe(*args, **recipe, resume_state=saved, settings={"blr": 5.0})
    assert resumed.losses == whole.losses and len(whole.losses) == 4
    for name, tensor in whole.head.state_dict().items():  # the weights and BatchNorm's running statistics
        assert torch.equal(tensor, resumed.head.state_dict()[name]), name
    assert resumed.confusion.tolist() == whole.confusion.tolist()


def test_a_probe_without_a_state_path_stops_saving_nothing(pixels, monkeypatch) -> None:
    train, labels = pixels["train_features"][:300], pixels["train_labels"][:300]
    _signalled_at_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted, match="after step 2; this command does not resume, so nothing was saved"):
        train_linear_probe(train, labels, train, labels, num_classes=10, epochs=3, batch_size=100)


def test_linear_probe_rejects_bad_inputs(pixels) -> None:
    train, labels = pixels["train_features"][:100], pixels["train_labels"][:100]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        train_linear_probe(train, labels, train, labels, num_classes=5, epochs=1)
    with pytest.raises(ValueError, match="784 dims, test features 10"):
        train_linear_probe(train, labels, train[:, :10], labels, num_classes=10, epochs=1)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        train_linear_probe(train, labels, train, labels, num_classes=10, epochs=1, optimizer="adam")


def test_metrics_confusion_picture_and_json(tmp_path: Path) -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])  # argmax 0, 1, 0, 2
    labels = torch.tensor([0, 1, 1, 0])
    expected = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 0]])
    assert torch.equal(confusion_matrix(scores.argmax(1), labels, 3), expected)
    metrics = classification_metrics(scores, labels, 3)
    assert metrics.top1 == 0.5 and metrics.top5 is None  # fewer than 5 classes
    assert metrics.per_class_accuracy[:2].tolist() == [0.5, 0.5] and math.isnan(metrics.per_class_accuracy[2])

    classes = list(FASHION_MNIST_CLASSES)
    confusion = torch.diag(torch.arange(10, 20)) + 1
    png = save_confusion_matrix(confusion, classes, tmp_path / "c.png", title="test")
    with Image.open(png) as img:
        assert img.format == "PNG" and min(img.size) >= 400
        assert len(np.unique(np.asarray(img.convert("L")))) > 20  # a drawn heat map, not a blank canvas
    with pytest.raises(ValueError, match=r"must be \(10, 10\)"):
        save_confusion_matrix(confusion[:3, :3], classes, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()

    path = write_results(tmp_path / "r.json", {"acc": metrics.per_class_accuracy, "confusion": expected, "p": png})
    loaded = json.loads(path.read_text())
    assert loaded == {"acc": [0.5, 0.5, None], "confusion": expected.tolist(), "p": str(png)}
