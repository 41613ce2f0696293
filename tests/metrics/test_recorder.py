"""TrainingRecorder: statistics from the training batches, labels from the loss gradient."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.errors import ConfigError
from neuroexapt.metrics.collector import ActivationCollector
from neuroexapt.metrics.recorder import TrainingRecorder, infer_labels


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                         nn.Linear(10, 4))


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def batches(n: int, shape: tuple[int, ...], classes: int, seed: int = 0
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, *shape, generator=g), torch.randint(0, classes, (16,), generator=g))
            for _ in range(n)]


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]],
          loss_fn=F.cross_entropy) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def test_labels_come_back_from_a_cross_entropy_gradient() -> None:
    logits = torch.randn(32, 7, requires_grad=True)
    y = torch.randint(0, 7, (32,))
    for reduction, smoothing in (("mean", 0.0), ("sum", 0.0), ("mean", 0.1)):
        logits.grad = None
        F.cross_entropy(logits, y, reduction=reduction, label_smoothing=smoothing).backward()
        assert torch.equal(infer_labels(logits.grad), y)
    logits.grad = None
    F.mse_loss(logits, torch.randn(32, 7)).backward()
    assert infer_labels(logits.grad) is None  # rows do not sum to zero
    assert infer_labels(torch.zeros(4, 3)) is None and infer_labels(torch.randn(4)) is None


def test_training_statistics_equal_a_collector_over_the_same_batches() -> None:
    """The same batches through the recorder (in the training loop) and through the analysis
    engine's collector give the same moments; positions are few enough not to be sampled."""
    data = batches(3, (6,), 4)
    model, reference = mlp(), mlp()
    recorder = TrainingRecorder(model, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: both models stay equal
    collector = ActivationCollector(reference)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        with collector:
            collector.set_targets(y)
            F.cross_entropy(reference(x), y).backward()
    recorder.close()
    assert recorder.labels_inferred is True and recorder.recorded == 3
    for name in ("0", "2", "4"):
        got, want = recorder.stats[name], collector[name]
        assert got.batches == want.batches == 3
        torch.testing.assert_close(got.mean, want.mean)
        torch.testing.assert_close(got.var, want.var)
        torch.testing.assert_close(got.grad_var, want.grad_var)
        torch.testing.assert_close(got.dead_fraction, want.dead_fraction)
        gx, gy = got.samples()
        wx, wy = want.samples()
        torch.testing.assert_close(gx, wx)
        assert torch.equal(gy, wy)  # the labels inferred from the gradient are the true ones


def test_only_every_nth_training_batch_is_recorded() -> None:
    model = mlp()
    recorder = TrainingRecorder(model, every=3)
    train(model, batches(7, (6,), 4))
    with torch.no_grad():
        model(torch.randn(4, 6))  # evaluation passes are never recorded
    model.eval()
    F.cross_entropy(model(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long)).backward()
    assert recorder.steps == 7 and recorder.recorded == 3  # batches 1, 4, 7
    assert recorder.stats["0"].batches == 3
    recorder.close()


def test_a_sampled_pass_without_backward_passes_its_turn_to_the_next() -> None:
    model = mlp()
    recorder = TrainingRecorder(model, every=10)
    model(torch.randn(4, 6))  # a forward in train mode with gradients on, never backpropagated
    train(model, batches(3, (6,), 4))
    assert recorder.steps == 4 and recorder.recorded == 1  # the first training batch instead
    train(model, batches(3, (6,), 4))
    assert recorder.recorded == 1  # then every 10th again
    recorder.close()


def test_other_losses_record_without_labels() -> None:
    model = mlp()
    recorder = TrainingRecorder(model, every=1)
    data = [(x, torch.randn(16, 4)) for x, _ in batches(2, (6,), 4)]
    train(model, data, F.mse_loss)
    assert recorder.labels_inferred is False and recorder.recorded == 2
    assert recorder.stats["0"].samples()[1] is None
    assert recorder.last_batch is None
    recorder.close()


def test_bypass_gradient_is_the_gradient_of_a_direct_connection() -> None:
    """M of conv '0' (read by conv '2') equals the gradient of a 3x3 conv from the input of
    '0' added, with zero weights, to the output of '2'."""
    model = cnn()
    recorder = TrainingRecorder(model, every=1, max_samples=16)
    x, y = batches(1, (3, 8, 8), 5)[0]
    train(model, [(x, y)])
    entry = recorder.growth["0"]
    assert entry.consumers == ("2",) and entry.batches == 1
    recorder.close()
    before = cnn()  # the weights the recorder saw: those before the optimizer's step
    bypass = torch.zeros(8, 3, 3, 3, requires_grad=True)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + F.conv2d(x, bypass, padding=1)

    handle = before[2].register_forward_hook(hook)
    F.cross_entropy(before(x), y).backward()
    handle.remove()
    want = bypass.grad.reshape(8, -1).double()
    assert want.abs().max() > 0
    torch.testing.assert_close(entry.mean(), want, rtol=1e-4, atol=1e-7)


def test_hooks_are_removed_and_copies_carry_no_recorder() -> None:
    model = cnn()
    recorder = TrainingRecorder(model, every=1)
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # pickles the hooks as inert ones
    pickle.dumps(model)
    train(clone, batches(1, (3, 8, 8), 5))
    assert recorder.recorded == 0  # the copy's hooks are inert
    recorder.close()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    train(model, batches(1, (3, 8, 8), 5))
    assert recorder.recorded == 0


def test_a_failing_hook_never_breaks_training_and_is_reported() -> None:
    model = mlp()
    recorder = TrainingRecorder(model, every=1)
    recorder.stats["0"].record = None  # type: ignore[assignment]  # breaks recording
    train(model, batches(2, (6,), 4))  # training itself goes on
    assert recorder.error is not None and "TypeError" in recorder.error
    recorder.close()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="every must be an int >= 1"):
        TrainingRecorder(mlp(), every=0)
    with pytest.raises(ConfigError, match=r"model must be an nn\.Module"):
        TrainingRecorder("model")  # type: ignore[arg-type]
