"""``neuroexapt.analyze`` on small trained models: the report, the contract, the errors."""

from __future__ import annotations

import copy
import json
import logging
import math
import re

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.errors import AnalysisError, ConfigError
from neuroexapt.metrics import BOTTLENECK_METRICS, DEFAULT_THRESHOLDS, AnalysisReport
from neuroexapt.metrics.analyze import report_from_stats
from neuroexapt.metrics.estimators import hsic
from neuroexapt.train.digits import DigitsCNN, load_digits, train_epochs

CNN_LAYERS = {"features.0", "features.3", "classifier.0", "classifier.2"}
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    return load_digits(0)


@pytest.fixture(scope="module")
def trained_cnn(digits: tuple[torch.Tensor, ...]) -> DigitsCNN:
    x_tr, y_tr, _, _ = digits
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_epochs(model, opt, x_tr, y_tr, 3, 0)
    return model.eval()


@pytest.fixture
def cnn(trained_cnn: DigitsCNN) -> DigitsCNN:
    return copy.deepcopy(trained_cnn)


@pytest.fixture(scope="module")
def loader(digits: tuple[torch.Tensor, ...]) -> Batches:
    _, _, x_te, y_te = digits
    return [(x_te[i:i + 64], y_te[i:i + 64]) for i in range(0, 256, 64)]


@pytest.fixture(scope="module")
def report(trained_cnn: DigitsCNN, loader: Batches) -> AnalysisReport:
    return neuroexapt.analyze(copy.deepcopy(trained_cnn), loader)


# ----------------------------------------------------------------------------- the report


def test_one_entry_per_conv_and_linear_layer(report: AnalysisReport, cnn: DigitsCNN) -> None:
    names = [layer.name for layer in report.layers]
    assert len(names) == 4 and set(names) == CNN_LAYERS
    expected = {n for n, m in cnn.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert set(names) == expected
    units = {x.name: x.units for x in report.layers}
    assert units == {"features.0": 8, "features.3": 16, "classifier.0": 32, "classifier.2": 10}
    assert report.batches == 4 and all(x.batches == 4 for x in report.layers)
    assert report.task_type == "classification" and report.never_ran == []


def test_ranked_by_score_descending(report: AnalysisReport) -> None:
    scores = [x.score for x in report.layers]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) > 1  # the ranking is not vacuous
    for x in report.layers:
        assert x.score == pytest.approx(sum(x.scores.values()) / len(x.scores))


def test_every_metric_is_measured_and_scored(report: AnalysisReport) -> None:
    for x in report.layers:
        assert set(x.scores) == set(BOTTLENECK_METRICS)
        assert all(0.0 <= s <= 1.0 for s in x.scores.values())
        for key in ("gradient_variance", "rank_ratio", "dead_fraction", "information",
                    "information_lost", "performance_sensitivity"):
            assert math.isfinite(x.metrics[key]), (x.name, key)
        assert 0 <= x.metrics["information"] <= report.label_entropy + 1e-9
    assert report.label_entropy == pytest.approx(math.log(10), abs=0.05)
    # a trained network loses accuracy when any layer is replaced by its mean
    assert all(x.metrics["performance_sensitivity"] > 0.1 for x in report.layers)


def test_reasons_are_exactly_the_scores_that_pass_their_threshold(report: AnalysisReport) -> None:
    assert report.bottlenecks()  # something passes on this model: the check is not vacuous
    for x in report.layers:
        for r in x.reasons:
            assert r.score >= r.threshold
            assert r.threshold == DEFAULT_THRESHOLDS[r.metric]
            assert r.score == x.scores[r.metric]
        passed = {m for m, s in x.scores.items() if s >= DEFAULT_THRESHOLDS[m]}
        assert {r.metric for r in x.reasons} == passed
        assert x.is_bottleneck == bool(passed)
    assert [x.name for x in report.bottlenecks()] == [
        x.name for x in report.layers if x.reasons]
    assert report.bottlenecks(1) == report.bottlenecks()[:1]


def test_thresholds_override(cnn: DigitsCNN, loader: Batches) -> None:
    strict = neuroexapt.analyze(cnn, loader, thresholds=dict.fromkeys(DEFAULT_THRESHOLDS, 1.0))
    lax = neuroexapt.analyze(cnn, loader, thresholds=dict.fromkeys(DEFAULT_THRESHOLDS, 0))
    for x in lax.layers:
        assert {r.metric for r in x.reasons} == set(x.scores)
        assert all(r.threshold == 0.0 for r in x.reasons)
    for x in strict.layers:
        assert all(r.score == 1.0 for r in x.reasons)


def test_table_names_every_layer(report: AnalysisReport) -> None:
    table = report.table()
    for name in CNN_LAYERS:
        assert re.search(rf"^{re.escape(name)}\s", table, re.MULTILINE), name
    for x in report.layers:
        for r in x.reasons:
            assert f"because {r}" in table
    assert "rank_ratio" in table and "units" in table


def test_to_json_is_strict_json(report: AnalysisReport) -> None:
    text = report.to_json()
    for token in ("NaN", "Infinity"):
        assert token not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert [x["name"] for x in data["layers"]] == [x.name for x in report.layers]
    first = data["layers"][0]
    assert first["metrics"]["saturated_fraction"] is None  # NaN (not tracked) becomes null
    assert first["score"] == pytest.approx(report.layers[0].score)
    assert {r["metric"] for r in first["reasons"]} == {r.metric for r in report.layers[0].reasons}
    assert data["task_type"] == "classification" and data["batches"] == 4


# ----------------------------------------------------------------------------- the contract


def test_model_state_is_exactly_unchanged(cnn: DigitsCNN, loader: Batches) -> None:
    cnn.train()
    cnn.classifier.eval()  # a mix of modes must come back as it was
    gen = torch.Generator().manual_seed(0)
    params = list(cnn.parameters())
    for p in params[::2]:
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    grad_objects = [p.grad for p in params]
    state = {k: v.clone() for k, v in cnn.state_dict().items()}
    modes = {n: m.training for n, m in cnn.named_modules()}

    neuroexapt.analyze(cnn, loader)

    after = cnn.state_dict()
    for k, v in state.items():  # parameters and BatchNorm running stats / batch counters
        assert torch.equal(after[k], v), k
    for p, g, obj in zip(params, grads, grad_objects, strict=True):
        if g is None:
            assert p.grad is None
        else:
            assert p.grad is obj and torch.equal(p.grad, g)
    assert {n: m.training for n, m in cnn.named_modules()} == modes


def test_state_restored_when_the_loss_raises(cnn: DigitsCNN, loader: Batches) -> None:
    cnn.train()
    for p in cnn.parameters():
        p.grad = torch.ones_like(p)
    calls = []

    def flaky(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("loss failed")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="loss failed"):
        neuroexapt.analyze(cnn, loader, loss_fn=flaky)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in cnn.parameters())
    assert all(m.training for m in cnn.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in cnn.modules())


def test_no_hooks_left_and_outputs_unchanged(cnn: DigitsCNN, loader: Batches) -> None:
    x = loader[0][0]
    with torch.no_grad():
        before = cnn(x)
    neuroexapt.analyze(cnn, loader)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in cnn.modules())
    with torch.no_grad():
        assert torch.equal(cnn(x), before)


def test_frozen_model_is_analysed_without_gradients(cnn: DigitsCNN, loader: Batches) -> None:
    cnn.requires_grad_(False)
    report = neuroexapt.analyze(cnn, loader)
    assert {x.name for x in report.layers} == CNN_LAYERS
    for x in report.layers:
        assert "gradient_variance" not in x.metrics and "gradient_variance" not in x.scores
        assert math.isfinite(x.metrics["rank_ratio"])


# ----------------------------------------------------------------------------- options


def test_layers_restricts(cnn: DigitsCNN, loader: Batches) -> None:
    report = neuroexapt.analyze(cnn, loader, layers=["features.0"])
    assert [x.name for x in report.layers] == ["features.0"]
    assert report["features.0"].units == 8
    with pytest.raises(KeyError, match=r"classifier\.0"):
        report["classifier.0"]


def test_metrics_restricts(cnn: DigitsCNN, loader: Batches) -> None:
    report = neuroexapt.analyze(cnn, loader, metrics=["activation_diversity"])
    for x in report.layers:
        assert set(x.metrics) == {"rank_ratio", "dead_fraction", "saturated_fraction"}
        assert set(x.scores) == {"activation_diversity"}
        assert x.score == x.scores["activation_diversity"] == pytest.approx(
            x.metrics["rank_ratio"])


def test_batches_limits_what_is_read(cnn: DigitsCNN, loader: Batches) -> None:
    consumed = []

    def stream():
        for batch in loader:
            consumed.append(1)
            yield batch

    report = neuroexapt.analyze(cnn, stream(), batches=2)
    assert report.batches == 2 and len(consumed) == 2
    assert all(x.batches == 2 for x in report.layers)


def test_importance_hsic(cnn: DigitsCNN, loader: Batches) -> None:
    report = neuroexapt.analyze(cnn, loader, importance="hsic", layers=["classifier.2"],
                                metrics=["activation_diversity"])
    value = report["classifier.2"].metrics["importance"]
    assert 0.0 < value <= 1.0
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    with torch.no_grad():
        logits = cnn(x)
    assert value == pytest.approx(hsic(logits, y), abs=1e-5)  # all 256 samples kept


def test_importance_callable(cnn: DigitsCNN, loader: Batches) -> None:
    report = neuroexapt.analyze(cnn, loader, importance=lambda x, y: float(x.shape[1]))
    for x in report.layers:
        assert x.metrics["importance"] == x.units
        assert "importance" not in x.scores  # reported, not scored


def test_ablate_top_measures_sensitivity_on_the_candidates_only(
        report: AnalysisReport, cnn: DigitsCNN, loader: Batches) -> None:
    order = report.order
    cheap = [m for m in BOTTLENECK_METRICS if m != "performance_sensitivity"]
    ranked = report_from_stats(cnn, report.stats, order, metrics=cheap, batches=4)
    top = {x.name for x in ranked.layers[:2]}
    full = report_from_stats(cnn, report.stats, order, held_out=loader[0], batches=4)
    part = report_from_stats(cnn, report.stats, order, held_out=loader[0], batches=4,
                             ablate_top=2)
    measured = {x.name for x in part.layers if "performance_sensitivity" in x.metrics}
    assert measured == top and len(top) == 2
    for x in part.layers:
        if x.name in top:  # the same value as when every layer is ablated
            assert x.metrics["performance_sensitivity"] == pytest.approx(
                full[x.name].metrics["performance_sensitivity"])
            assert set(x.scores) == set(BOTTLENECK_METRICS)
        else:  # scored on the other metrics alone, nothing stale left from the ranking
            assert set(x.scores) == set(cheap)
            assert x.score == pytest.approx(sum(x.scores.values()) / len(x.scores))
    with pytest.raises(ConfigError, match="ablate_top"):
        report_from_stats(cnn, report.stats, order, held_out=loader[0], ablate_top=0)


def test_unused_layer_is_reported_as_never_ran(cnn: DigitsCNN, loader: Batches) -> None:
    cnn.spare = nn.Linear(32, 10)  # an attribute that forward() never calls
    report = neuroexapt.analyze(cnn, loader, layers=["features.0", "spare"])
    assert report.never_ran == ["spare"]
    assert report.layers[-1].name == "spare"
    spare = report["spare"]
    assert spare.batches == 0 and spare.metrics == {} and spare.reasons == []
    assert math.isfinite(report["features.0"].score)
    assert "never ran: spare" in report.table()
    assert json.loads(report.to_json())["never_ran"] == ["spare"]


def test_regression_mlp(loader: Batches) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 2, generator=gen)
    batches = []
    for _ in range(4):
        x = torch.randn(64, 6, generator=gen)
        batches.append((x, torch.tanh(x @ w) + 0.05 * torch.randn(64, 2, generator=gen)))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    report = neuroexapt.analyze(model, batches, task_type="regression", importance="hsic")
    assert report.task_type == "regression" and report.label_entropy is None
    assert {x.name for x in report.layers} == {"0", "2"}
    for x in report.layers:
        assert "information" not in x.metrics and "information_lost" not in x.metrics
        assert set(x.scores) == {"gradient_variance", "activation_diversity",
                                 "performance_sensitivity"}
        assert math.isfinite(x.metrics["gradient_variance"])
        assert 0.0 < x.metrics["importance"] <= 1.0
        assert x.metrics["performance_sensitivity"] > 0  # the trained model needs both layers
    json.loads(report.to_json())


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"metrics": ["gradient_variance", "flops"]},
     "unknown metric 'flops'; valid: gradient_variance, activation_diversity, "
     "information_flow, performance_sensitivity"),
    ({"thresholds": {"rank": 0.5}}, "unknown threshold 'rank'; valid: gradient_variance"),
    ({"thresholds": {"activation_diversity": 1.5}}, r"must be in \[0, 1\], got 1.5"),
    ({"thresholds": {"activation_diversity": -0.1}}, r"must be in \[0, 1\]"),
    ({"thresholds": {"activation_diversity": float("nan")}}, r"must be in \[0, 1\]"),
    ({"thresholds": {"activation_diversity": "0.5"}}, r"must be in \[0, 1\]"),
    ({"thresholds": {"activation_diversity": True}}, r"must be in \[0, 1\], got True"),
    ({"task_type": "segmentation"}, "unknown task_type 'segmentation'; valid: classification, "
                                    "regression"),
    ({"batches": 0}, "batches must be a positive int"),
    ({"importance": "nope"}, "unknown importance metric 'nope'; registered: hsic"),
])
def test_bad_configuration_raises(cnn: DigitsCNN, loader: Batches, kwargs: dict,
                                  match: str) -> None:
    cnn.train()
    with pytest.raises(ConfigError, match=match):
        neuroexapt.analyze(cnn, loader, **kwargs)
    assert cnn.training  # rejected before anything was touched


def test_empty_loader(cnn: DigitsCNN) -> None:
    with pytest.raises(AnalysisError, match="yielded no batch"):
        neuroexapt.analyze(cnn, [])


def test_all_losses_nan(cnn: DigitsCNN, loader: Batches) -> None:
    bad = [(torch.full_like(x, float("nan")), y) for x, y in loader]
    with pytest.raises(AnalysisError, match="all 4 losses were NaN or infinite"):
        neuroexapt.analyze(cnn, bad)
    assert all(p.grad is None for p in cnn.parameters())


def test_some_nan_batches_warn_and_are_skipped(cnn: DigitsCNN, loader: Batches) -> None:
    nan_batch = (torch.full_like(loader[0][0], float("nan")), loader[0][1])
    report = neuroexapt.analyze(cnn, [nan_batch, *loader[1:]])
    clean = neuroexapt.analyze(cnn, loader[1:])
    for x in report.layers:
        assert "1 of 4 batches had a non-finite loss and were skipped" in x.warnings
        assert any("NaN" in w and "left out" in w for w in x.warnings)
        assert "warning: 1 of 4 batches" in report.table()
        # the NaN batch is left out of every statistic ...
        assert x.metrics["rank_ratio"] == pytest.approx(clean[x.name].metrics["rank_ratio"])
        assert x.metrics["gradient_variance"] == pytest.approx(
            clean[x.name].metrics["gradient_variance"])
        # ... and is not the held-out batch: the sensitivity is measured on a finite one
        assert x.metrics["performance_sensitivity"] == pytest.approx(
            clean[x.name].metrics["performance_sensitivity"])
        assert x.metrics["performance_sensitivity"] > 0.1
    json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"constant {c}"))


def test_analyze_logs_nothing_above_warning(cnn: DigitsCNN, loader: Batches,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="neuroexapt"):
        neuroexapt.analyze(cnn, loader)
    assert [r for r in caplog.records if r.levelno > logging.WARNING] == []


# ----------------------------------------------------------------------------- ground truth


def digits_mlp(width: int, seed: int, digits: tuple[torch.Tensor, ...]) -> nn.Sequential:
    """64 -> 32 -> width -> 32 -> 10 on digits, trained with Adam."""
    x_tr, y_tr, _, _ = digits
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, width), nn.Tanh(),
        nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 10),
    )
    train_epochs(model, torch.optim.Adam(model.parameters(), lr=0.01), x_tr, y_tr, 15, seed)
    return model.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_narrow_layer_is_the_top_bottleneck(digits: tuple[torch.Tensor, ...], seed: int) -> None:
    _, _, x_te, y_te = digits
    data = [(x_te[i:i + 64], y_te[i:i + 64]) for i in range(0, 320, 64)]
    model = digits_mlp(2, seed, digits)
    assert float((model(x_te).argmax(1) == y_te).float().mean()) > 0.8  # it did learn
    report = neuroexapt.analyze(model, data)
    # the width-2 layer uses every dimension it has ...
    assert report["3"].metrics["rank_ratio"] > 0.9
    assert report.layers[0].name == "3"
    flagged = [x.name for x in report.layers
               if any(r.metric == "activation_diversity" for r in x.reasons)]
    assert flagged == ["3"]
    # ... and the layer that expands it back to 32 units can span only 2 of them
    assert report["5"].metrics["rank_ratio"] <= 2 / 32 + 1e-6

    control = neuroexapt.analyze(digits_mlp(32, seed, digits), data)
    assert control["3"].metrics["rank_ratio"] < 0.5
    assert not any(r.metric == "activation_diversity"
                   for x in control.layers for r in x.reasons)
