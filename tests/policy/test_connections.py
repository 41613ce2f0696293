"""ConnectionGrowthManager: a skip around the layer that loses most information."""

from __future__ import annotations

import torch
from torch import nn

from neuroexapt.metrics.report import AnalysisReport, LayerAnalysis
from neuroexapt.ops.modules import SkipSource, SkipTarget
from neuroexapt.policy import ConnectionGrowthManager

ORDER = ["0", "2", "4", "6"]


def report(info: dict[str, float]) -> AnalysisReport:
    layers = [LayerAnalysis(n, 8, 1, metrics={"information": v}) for n, v in info.items()]
    return AnalysisReport(layers, "classification", 2.3, 1, order=list(info))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_candidates_rank_information_losses() -> None:
    manager = ConnectionGrowthManager(min_loss=0.05)
    found = manager.candidates(report({"0": 1.0, "2": 0.4, "4": 0.38, "6": 0.3}), ORDER)
    assert [(s, d) for s, d, _ in found] == [("0", "4")]  # "2" loses 0.6; "4" only 0.02
    assert "loses 0.600 nats" in found[0][2]


def test_no_candidate_without_loss_or_without_a_layer_after() -> None:
    manager = ConnectionGrowthManager(min_loss=0.05)
    assert manager.candidates(report({"0": 0.2, "2": 0.5, "4": 0.9, "6": 1.0}), ORDER) == []
    # the loss happens at the last layer: nothing comes after it to connect into
    assert manager.candidates(report({"0": 1.0, "2": 1.0, "4": 1.0, "6": 0.1}), ORDER) == []


def test_grow_adds_a_preserving_skip_once() -> None:
    model, x = mlp(), torch.randn(5, 6)
    before = model(x)
    manager = ConnectionGrowthManager()
    rep = report({"0": 1.0, "2": 0.4, "4": 0.38, "6": 0.3})
    done = manager.grow(model, rep, ORDER, example_inputs=x, optimizer=None)
    assert done is not None
    record, reason = done
    assert record.op == "add_skip" and "information_flow" in reason
    assert isinstance(model[0], SkipSource) and isinstance(model[4], SkipTarget)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    assert manager.grow(model, rep, ORDER, example_inputs=x, optimizer=None) is None


def test_grow_skips_infeasible_pairs() -> None:
    model, x = mlp(), torch.randn(5, 6)
    manager = ConnectionGrowthManager()
    # '6' before '2' in this made-up order: add_skip refuses it, nothing else qualifies
    rep = report({"6": 1.0, "4": 0.2, "2": 0.1})
    assert manager.grow(model, rep, ["6", "4", "2"], example_inputs=x, optimizer=None) is None
    assert not any(isinstance(m, SkipSource | SkipTarget) for m in model.modules())
