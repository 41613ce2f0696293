"""Per-layer and per-unit metrics on LayerStats filled by an ActivationCollector."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError
from neuroexapt.metrics import layer_metrics
from neuroexapt.metrics.collector import ActivationCollector, LayerStats
from neuroexapt.metrics.estimators import effective_rank, hsic, mutual_information
from neuroexapt.metrics.layer_metrics import (
    ablation_loss,
    activation_diversity,
    get_importance_metric,
    gradient_variance,
    information_retained,
    list_importance_metrics,
    register_importance_metric,
    unit_scores,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear layer with the given weight [out, in] and bias (zero by default)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias)
    return layer


def record(model: nn.Module, layer: str, inputs: list[torch.Tensor],
           loss_fn=None, targets: list[torch.Tensor] | None = None) -> LayerStats:
    """Run ``inputs`` through ``model`` inside a collector on ``layer``; backward if a loss."""
    collector = ActivationCollector(model, [layer], reservoir=4096)
    with collector:
        for i, x in enumerate(inputs):
            if targets is not None:
                collector.set_targets(targets[i])
            out = model(x)
            if loss_fn is not None:
                loss_fn(out, targets[i] if targets is not None else None).backward()
    return collector[layer]


# ----------------------------------------------------------------------------- gradient variance


def test_gradient_variance_is_mean_unit_variance_of_output_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    xs = [torch.randn(16, 5, generator=gen(i)) for i in range(3)]
    ys = [torch.randint(0, 3, (16,), generator=gen(10 + i)) for i in range(3)]
    stats = record(model, "0", xs, nn.functional.cross_entropy, ys)

    grads = []
    for x, y in zip(xs, ys, strict=True):
        h = model[0](x)
        loss = nn.functional.cross_entropy(model[2](model[1](h)), y)
        grads.append(torch.autograd.grad(loss, h)[0])
    g = torch.cat(grads).double()  # [48, 4]: one row per sample, across all three batches
    expected = float(g.var(0).mean())
    assert expected > 0
    assert gradient_variance(stats) == pytest.approx(expected, rel=1e-6)
    assert stats.grad_batches == 3


def test_gradient_variance_is_zero_for_a_unit_gradient_that_never_changes() -> None:
    # loss = sum of outputs: d loss / d out = 1 for every sample and unit
    model = nn.Sequential(nn.Linear(3, 5))
    stats = record(model, "0", [torch.randn(8, 3, generator=gen())],
                   lambda out, _: out.sum())
    assert gradient_variance(stats) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(stats.grad_mean, torch.ones(5, dtype=torch.float64))


# ----------------------------------------------------------------------------- diversity


def test_rank_ratio_near_one_for_isotropic_units() -> None:
    model = nn.Sequential(linear(torch.eye(3)))
    stats = record(model, "0", [torch.randn(256, 3, generator=gen(i)) for i in range(2)])
    d = activation_diversity(stats)
    assert 0.95 <= d["rank_ratio"] <= 1.0
    assert d["dead_fraction"] == pytest.approx(0.5, abs=0.05)  # half of a centred Gaussian


def test_rank_ratio_low_for_a_rank_one_layer() -> None:
    u = torch.randn(6, 1, generator=gen(1))
    v = torch.randn(1, 4, generator=gen(2))
    model = nn.Sequential(linear(u @ v))  # 6 units, every output a multiple of u
    stats = record(model, "0", [torch.randn(200, 4, generator=gen(3))])
    d = activation_diversity(stats)
    assert d["rank_ratio"] == pytest.approx(1 / 6, abs=0.01)
    x, _ = stats.samples()
    assert effective_rank(x) == pytest.approx(1.0, abs=0.05)


def test_dead_fraction_is_one_for_an_all_negative_layer() -> None:
    w = 0.1 * torch.randn(4, 3, generator=gen(0))
    model = nn.Sequential(linear(w, torch.full((4,), -10.0)))
    stats = record(model, "0", [torch.randn(32, 3, generator=gen(1))])
    d = activation_diversity(stats)
    assert d["dead_fraction"] == 1.0
    assert torch.equal(stats.dead_fraction, torch.ones(4, dtype=torch.float64))
    assert d["saturated_fraction"] != d["saturated_fraction"]  # NaN: not tracked


def test_saturated_fraction_reported_when_tracked() -> None:
    model = nn.Sequential(linear(torch.eye(2), torch.tensor([5.0, 0.0])))
    collector = ActivationCollector(model, ["0"], saturation=3.0)
    with collector:
        model(0.1 * torch.randn(64, 2, generator=gen()))
    d = activation_diversity(collector["0"])
    assert d["saturated_fraction"] == pytest.approx(0.5)  # unit 0 always >= 3, unit 1 never


# ----------------------------------------------------------------------------- unit scores


def test_gradient_score_picks_the_only_unit_the_loss_uses() -> None:
    model = nn.Sequential(nn.Linear(3, 5))
    stats = record(model, "0", [torch.randn(32, 3, generator=gen(i)) for i in range(2)],
                   lambda out, _: out[:, 2].pow(2).mean())
    scores = unit_scores(stats, "gradient")
    assert scores.shape == (5,)
    assert int(scores.argmax()) == 2
    assert scores[2] > 0
    assert torch.equal(scores[[0, 1, 3, 4]], torch.zeros(4, dtype=scores.dtype))


def test_activation_score_picks_the_unit_with_the_largest_variance() -> None:
    scales = torch.tensor([1.0, 5.0, 2.0, 0.5])
    model = nn.Sequential(linear(torch.diag(scales)))
    stats = record(model, "0", [torch.randn(500, 4, generator=gen())])
    scores = unit_scores(stats, "activation")
    assert int(scores.argmax()) == 1
    assert torch.allclose(scores, scales.double() ** 2, rtol=0.2)  # var of s * N(0, 1)


def test_hybrid_and_entropy_scores() -> None:
    scales = torch.tensor([1.0, 5.0, 2.0])
    model = nn.Sequential(linear(torch.diag(scales)))
    stats = record(model, "0", [torch.randn(200, 3, generator=gen())],
                   lambda out, _: out[:, 0].pow(2).mean())
    hybrid = unit_scores(stats, "hybrid")
    assert float(hybrid.max()) <= 1.0 and float(hybrid.min()) >= 0.0
    g, a = unit_scores(stats, "gradient"), unit_scores(stats, "activation")
    assert torch.allclose(hybrid, 0.5 * (g / g.max() + a / a.max()))
    assert unit_scores(stats, "entropy").shape == (3,)


@pytest.mark.parametrize("kind", ["taylor", "", "Gradient"])
def test_unknown_unit_score_lists_valid(kind: str) -> None:
    stats = record(nn.Sequential(nn.Linear(2, 2)), "0", [torch.randn(4, 2)])
    with pytest.raises(ConfigError, match="valid: gradient, activation, entropy, hybrid"):
        unit_scores(stats, kind)


# ----------------------------------------------------------------------------- ablation


def regression_model(w: torch.Tensor) -> nn.Sequential:
    """identity -> w: the model computes y = x @ w exactly."""
    return nn.Sequential(linear(torch.eye(len(w))), linear(w[None, :])).eval()


def test_ablating_an_informative_layer_raises_the_loss_to_the_target_variance() -> None:
    w = torch.tensor([1.0, -2.0, 0.0])
    model = regression_model(w)
    x = torch.randn(64, 3, generator=gen(), dtype=torch.float32)
    y = (x @ w)[:, None]
    mse = nn.functional.mse_loss
    base = float(mse(model(x), y).detach())
    assert base == pytest.approx(0.0, abs=1e-10)
    ablated = ablation_loss(model, model[0], (x,), y, mse)
    # every hidden unit replaced by its batch mean: the output is the constant mean(y)
    assert ablated == pytest.approx(float(((y - y.mean()) ** 2).mean()), rel=1e-5)
    assert ablated > base + 1.0
    # unit 0 alone carries part of the signal
    assert ablation_loss(model, model[0], (x,), y, mse, units=torch.tensor([0])) > base + 0.1


def test_ablating_an_ignored_unit_leaves_the_loss_unchanged() -> None:
    w = torch.tensor([1.0, -2.0, 0.0])  # the output ignores hidden unit 2
    model = regression_model(w)
    x = torch.randn(64, 3, generator=gen(1))
    y = (x @ w)[:, None] + 0.1 * torch.randn(64, 1, generator=gen(2))
    mse = nn.functional.mse_loss
    base = float(mse(model(x), y).detach())
    assert base > 0
    assert ablation_loss(model, model[0], (x,), y, mse, units=torch.tensor([2])) == base


def test_ablation_of_a_conv_channel_and_hook_removal() -> None:
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(2 * 9, 1)).eval()
    with torch.no_grad():  # the head reads channel 0 only (the first 9 flattened values)
        model[2].weight[:, 9:] = 0.0
    x = torch.randn(16, 1, 3, 3, generator=gen())
    y = torch.randn(16, 1, generator=gen(1))
    mse = nn.functional.mse_loss
    before = model(x).detach()
    base = float(mse(before, y))
    assert ablation_loss(model, conv, (x,), y, mse, units=torch.tensor([1])) == base
    assert ablation_loss(model, conv, (x,), y, mse, units=torch.tensor([0])) != base
    # the hook is gone and the model computes what it did before
    assert not conv._forward_hooks
    assert torch.equal(model(x), before)


def test_ablation_hook_removed_when_the_loss_raises() -> None:
    model = regression_model(torch.ones(2))

    def boom(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ablation_loss(model, model[0], (torch.randn(4, 2),), torch.zeros(4, 1), boom)
    assert not model[0]._forward_hooks


# ----------------------------------------------------------------------------- information


def test_information_retained_tracks_label_content() -> None:
    y = torch.randint(0, 4, (256,), generator=gen())
    informative = nn.functional.one_hot(y, 4).float() + 0.05 * torch.randn(256, 4, generator=gen(1))
    noise = torch.randn(256, 4, generator=gen(2))
    model = nn.Sequential(linear(torch.eye(4)))
    good = record(model, "0", [informative], targets=[y])
    bad = record(model, "0", [noise], targets=[y])
    x, labels = good.samples()
    assert torch.equal(labels, y)
    assert information_retained(good) == pytest.approx(
        mutual_information(x, y, sigma="median"))
    assert information_retained(good, "ksg") > 0.8 * float(torch.log(torch.tensor(4.0)))
    assert information_retained(bad, "ksg") < 0.1


def test_information_retained_without_targets_says_how_to_fix() -> None:
    stats = record(nn.Sequential(nn.Linear(2, 2)), "0", [torch.randn(8, 2)])
    with pytest.raises(ConfigError, match=r"call collector\.set_targets"):
        information_retained(stats)


# ----------------------------------------------------------------------------- registry


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the importance registry, so registrations do not leak."""
    fresh = dict(layer_metrics._IMPORTANCE)
    monkeypatch.setattr(layer_metrics, "_IMPORTANCE", fresh)
    return fresh


def test_builtin_importance_metrics(registry: dict) -> None:
    assert list_importance_metrics() == ["hsic", "mutual_information"]
    x, y = torch.randn(64, 3, generator=gen()), torch.randint(0, 3, (64,), generator=gen(1))
    assert get_importance_metric("hsic")(x, y) == pytest.approx(hsic(x, y))
    assert get_importance_metric("mutual_information")(x, y) == pytest.approx(
        mutual_information(x, y, sigma="median"))


def test_register_get_list(registry: dict) -> None:
    def width(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(x.shape[1])

    register_importance_metric("width", width)
    assert get_importance_metric("width") is width
    assert list_importance_metrics() == ["hsic", "mutual_information", "width"]
    assert get_importance_metric(width) is width  # a callable passes through
    register_importance_metric("width", hsic)  # re-registering replaces
    assert get_importance_metric("width") is hsic


def test_registrations_do_not_leak_between_tests() -> None:
    assert "width" not in list_importance_metrics()


def test_unknown_importance_metric_lists_registered(registry: dict) -> None:
    register_importance_metric("mine", lambda x, y: 0.0)
    with pytest.raises(ConfigError, match="registered: hsic, mine, mutual_information"):
        get_importance_metric("nope")


@pytest.mark.parametrize(("name", "fn", "match"), [
    ("", hsic, "non-empty name"), (None, hsic, "non-empty name"),
    ("x", 3.0, "must be callable"),
])
def test_register_rejects_bad_arguments(registry: dict, name: object, fn: object,
                                        match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        register_importance_metric(name, fn)  # type: ignore[arg-type]
    assert list_importance_metrics() == ["hsic", "mutual_information"]


def test_registered_metric_called_with_layer_outputs_and_targets(registry: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    xs = [torch.randn(20, 4, generator=gen(i)) for i in range(3)]
    ys = [torch.randint(0, 3, (20,), generator=gen(10 + i)) for i in range(3)]
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(x: torch.Tensor, y: torch.Tensor) -> float:
        calls.append((x, y))
        return 0.25 * len(calls)

    register_importance_metric("spy", spy)
    report = neuroexapt.analyze(model, list(zip(xs, ys, strict=True)), layers=["0", "2"],
                                metrics=["activation_diversity"], importance="spy")
    assert len(calls) == 2
    with torch.no_grad():
        hidden = model[0](torch.cat(xs))
        out = model(torch.cat(xs))
    # the reservoir (512) holds all 60 samples in order: [N, D] outputs and the labels
    x0, y0 = calls[0]
    assert x0.shape == (60, 6) and torch.allclose(x0, hidden, atol=1e-6)
    assert torch.equal(y0, torch.cat(ys))
    x2, y2 = calls[1]
    assert x2.shape == (60, 3) and torch.allclose(x2, out, atol=1e-6)
    assert torch.equal(y2, torch.cat(ys))
    assert report["0"].metrics["importance"] == 0.25
    assert report["2"].metrics["importance"] == 0.5


def test_ablation_loss_perturbation_mode() -> None:
    """noise=0 is the clean loss; growing noise on an informative layer raises the loss."""
    import torch.nn.functional as F

    from neuroexapt.metrics import ablation_loss

    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        clean = float(F.cross_entropy(model(x), y))
    assert ablation_loss(model, model[0], (x,), y, F.cross_entropy, noise=0.0) == \
        pytest.approx(clean, abs=1e-6)
    small = ablation_loss(model, model[0], (x,), y, F.cross_entropy, noise=0.1)
    large = ablation_loss(model, model[0], (x,), y, F.cross_entropy, noise=2.0)
    assert clean < large and small < large
    with pytest.raises(ConfigError, match="noise"):
        ablation_loss(model, model[0], (x,), y, F.cross_entropy, noise=-1.0)
