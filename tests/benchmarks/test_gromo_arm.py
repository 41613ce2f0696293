"""benchmarks/gromo_arm.py trains and grows GroMo's VGG on random images with the benchmark recipe.

Skipped without the optional ``gromo`` package (the ``bench`` extra). The numbers are
meaningless; the tests check that GroMo's growth step adds parameters, that the optimizer
trains all of them afterwards, that the schedule keeps its position, and the budget rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

pytest.importorskip("gromo")


def _data(n: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def split(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(k, 3, 32, 32, generator=gen), torch.randint(0, 10, (k,), generator=gen)

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = split(n), split(16), split(16)
    return {"x_train": x_tr, "y_train": y_tr, "x_val": x_va, "y_val": y_va,
            "x_test": x_te, "y_test": y_te}


def test_one_growth_step_adds_neurons_and_training_goes_on(
        bench: Callable[[str], ModuleType]) -> None:
    arm = bench("gromo_arm")
    torch.set_num_threads(1)
    lines: list[str] = []
    initial = sum(p.numel() for p in arm.gromo_vgg(4).parameters())
    result = arm.run_gromo_arm(
        _data(), width=4, epochs=2, batch_size=16, lr=0.05, weight_decay=5e-4, seed=0,
        growth_epochs=[1], neurons_per_growth=2, param_budget=None, log=lines.append)
    assert len(result["history"]) == 2 and len(lines) == 2
    first, second = result["history"]
    assert first["params"] == initial
    (event,) = result["events"]
    assert event["kind"] == "grow" and event["epoch"] == 1
    assert 1 <= event["neurons"] <= 2 and event["scale"] > 0
    assert event["layer"] in event["improvements"]
    assert event["params_after"] > event["params_before"] == initial
    assert second["params"] == first["params_after"] == event["params_after"]
    assert result["params"] == event["params_after"] > initial
    assert first["events"] and not second["events"]
    assert all(h["all_params_in_optimizer"] for h in result["history"])
    # one grown stage-opening conv: its output channels went up by the neurons added
    widths = result["widths"]
    assert sorted(w - v for w, v in zip(widths, [4, 4, 8, 8, 16, 16], strict=True)) == [
        0, 0, 0, 0, 0, event["neurons"]]
    # the cosine schedule kept its position through the new optimizer: 4 of 8 batches done
    assert second["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    for key in ("test_acc", "test_loss", "wall_s", "train_s"):
        assert math.isfinite(result[key])
    for h in result["history"]:
        assert math.isfinite(h["train_acc"]) and math.isfinite(h["val_acc"])
        assert 0.0 <= h["val_acc"] <= 100.0
    assert 0.0 <= result["test_acc"] <= 100.0
    assert result["train_macs"] == sum(h["forward_macs"] for h in result["history"]) * 64
    assert second["forward_macs"] > first["forward_macs"]


def test_budget_stops_growth(bench: Callable[[str], ModuleType]) -> None:
    arm = bench("gromo_arm")
    torch.set_num_threads(1)
    initial = sum(p.numel() for p in arm.gromo_vgg(4).parameters())
    result = arm.run_gromo_arm(
        _data(32), width=4, epochs=2, batch_size=16, lr=0.05, weight_decay=5e-4, seed=0,
        growth_epochs=[1, 2], neurons_per_growth=2, param_budget=initial, log=lambda _: None)
    assert [e["kind"] for e in result["events"]] == ["budget"]  # and no try after it
    assert result["params"] == initial


def test_budget_cuts_the_proposal_to_the_neurons_that_fit(
        bench: Callable[[str], ModuleType]) -> None:
    arm = bench("gromo_arm")
    torch.set_num_threads(1)
    initial = sum(p.numel() for p in arm.gromo_vgg(4).parameters())
    budget = initial + 220  # one neuron of any growable layer fits (66, 111 or 219 each)
    result = arm.run_gromo_arm(
        _data(32), width=4, epochs=1, batch_size=16, lr=0.05, weight_decay=5e-4, seed=0,
        growth_epochs=[1], neurons_per_growth=4, param_budget=budget, log=lambda _: None,
        statistical_threshold=0.0)  # keep all 4 proposed neurons, whatever their value
    (event,) = result["events"]
    assert event["kind"] == "grow" and event["proposed"] == 4 > event["neurons"] >= 1
    assert initial < result["params"] <= budget
    assert result["history"][0]["all_params_in_optimizer"]


def test_a_zero_scale_from_the_line_search_adds_nothing(
        bench: Callable[[str], ModuleType]) -> None:
    arm = bench("gromo_arm")
    torch.set_num_threads(1)
    initial = sum(p.numel() for p in arm.gromo_vgg(4).parameters())
    result = arm.run_gromo_arm(
        _data(32), width=4, epochs=1, batch_size=16, lr=0.05, weight_decay=5e-4, seed=0,
        growth_epochs=[1], neurons_per_growth=2, param_budget=None, log=lambda _: None,
        scales=(0.0,))
    (event,) = result["events"]
    assert event["kind"] == "rejected" and event["neurons"] == 0
    # no proposal is left registered in the model
    assert result["params"] == initial and result["widths"] == [4, 4, 8, 8, 16, 16]


def test_successive_growth_steps_keep_working(bench: Callable[[str], ModuleType]) -> None:
    """GroMo fixes its statistics' shapes at construction; the arm lets them follow growth."""
    arm = bench("gromo_arm")
    torch.set_num_threads(1)
    result = arm.run_gromo_arm(
        _data(), width=4, epochs=4, batch_size=16, lr=0.05, weight_decay=5e-4, seed=0,
        growth_epochs=[1, 2, 3], neurons_per_growth=8, param_budget=None, log=lambda _: None)
    grown = [e for e in result["events"] if e["kind"] == "grow"]
    assert len(grown) >= 2  # the second step used to fail on a stale statistic shape
    assert result["params"] == grown[-1]["params_after"] > grown[0]["params_after"]
    assert all(h["all_params_in_optimizer"] for h in result["history"])
