"""The growth policy: costs, allocation by gain per cost, new-unit initialisations, schedule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.asserts import assert_same_function
from torch import nn

from neuroexapt.errors import ConfigError
from neuroexapt.graph import trace
from neuroexapt.metrics import count_macs
from neuroexapt.metrics.recorder import TrainingRecorder
from neuroexapt.ops import widen
from neuroexapt.ops.transaction import model_outputs
from neuroexapt.policy.division import AdaptiveNeuronDivision
from neuroexapt.policy.growth import (
    GrowthOption,
    GrowthSchedule,
    LearningRateBoost,
    allocate,
    bypass_pairs,
    grow_layer,
    growth_options,
    unit_cost,
)


def cnn() -> nn.Sequential:
    """conv(3->8) at 16x16, pool, conv(8->8) at 8x8, pool, conv(8->16) at 4x4, linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 5))


X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
Y = torch.arange(8) % 5


def recorded(model: nn.Module, steps: int = 2) -> TrainingRecorder:
    recorder = TrainingRecorder(model, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    recorder.close()
    return recorder


@pytest.mark.parametrize("by", ["macs", "parameters"])
def test_unit_cost_is_what_one_more_unit_costs(by: str) -> None:
    for layer in ("0", "4"):
        model = cnn()
        graph = trace(model, X[:1])
        cost = unit_cost(model, graph, graph.group_of(layer), by)
        measure = (lambda m: count_macs(m, X[:1])) if by == "macs" else \
            (lambda m: sum(p.numel() for p in m.parameters()))
        before = measure(model)
        widen(model, layer, 3, example_inputs=X[:1])
        assert measure(model) - before == pytest.approx(3 * cost)
    # a channel at 4x4 costs fewer MACs than one at 16x16
    graph = trace(cnn(), X[:1])
    model = cnn()
    assert unit_cost(model, graph, graph.group_of("8"), "macs") < \
        unit_cost(model, graph, graph.group_of("0"), "macs")


def test_only_growable_layers_are_candidates() -> None:
    pairs = bypass_pairs(cnn(), X[:1], ["0", "4", "8", "12"])
    assert pairs == {"0": ["4"], "4": ["8"], "8": ["12"]}  # "12" is the output


def option(layer: str, size: int, cost: float, gains: list[float]) -> GrowthOption:
    return GrowthOption(layer, size, cost, torch.tensor(gains, dtype=torch.float64))


def test_allocate_hands_units_to_the_best_gain_per_cost_within_budget() -> None:
    cheap = option("cheap", 8, 1.0, [4.0, 3.0, 2.0, 1.0])
    dear = option("dear", 8, 10.0, [20.0, 1.0])
    assert allocate([cheap, dear], 3.0) == {"cheap": 3}  # 4/1, 3/1, 2/1 beat 20/10
    assert allocate([cheap, dear], 14.0) == {"cheap": 4, "dear": 1}
    assert allocate([cheap, dear], 0.5) == {}
    for budget in (3.0, 7.0, 14.0, 100.0):  # never above the budget
        plan = allocate([cheap, dear], budget)
        assert sum(n * o.cost_per_unit for o in (cheap, dear) for k, n in plan.items()
                   if k == o.layer) <= budget
    # never more units than non-zero singular values
    assert allocate([cheap], 100.0) == {"cheap": 4}
    # chunks that bring widths to multiples of 4
    many = option("many", 6, 1.0, [1.0] * 10)
    assert allocate([many], 100.0, multiple=4) == {"many": 6}  # 6 -> 8 -> 12
    assert allocate([many], 3.0, multiple=4) == {"many": 2}


def test_a_share_smaller_than_a_chunk_rounds_to_the_nearest_chunk_within_room() -> None:
    many = option("many", 8, 1.0, [1.0] * 16)  # a chunk is 8 units, cost 8
    assert allocate([many], 5.0, multiple=8) == {}  # strict share: nothing fits
    assert allocate([many], 5.0, multiple=8, room=8.0) == {"many": 8}  # >= half fits
    assert allocate([many], 3.0, multiple=8, room=100.0) == {}  # less than half: wait
    assert allocate([many], 5.0, multiple=8, room=7.0) == {}  # never beyond the room
    # when a chunk fits the share, the share is a hard limit as before
    assert allocate([many], 9.0, multiple=8, room=100.0) == {"many": 8}


def test_growth_options_rank_real_layers() -> None:
    model = cnn()
    rec = recorded(model)
    options = growth_options(model, X[:1], rec.growth, by="macs")
    assert {o.layer for o in options} == {"0", "4", "8"}
    for o in options:
        assert o.cost_per_unit > 0 and len(o.gains) > 0 and float(o.gains[0]) > 0
        assert bool((o.gains[:-1] >= o.gains[1:]).all())  # descending squared singular values
        assert o.directions is not None and o.directions.shape[0] == len(o.gains)


@pytest.mark.parametrize("init", ["gradmax", "orthogonal", "split"])
def test_each_initialisation_keeps_the_function_and_gets_gradients(init: str) -> None:
    model = cnn()
    rec = recorded(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {o.layer: o for o in growth_options(model, X[:1], rec.growth)}
    reference = model_outputs(model, (X,))
    record = grow_layer(model, "4", 4, init=init, example_inputs=X[:1], optimizer=opt,
                        option=options["4"], split=AdaptiveNeuronDivision("hybrid", 0.0))
    assert model[4].out_channels == 12 and record.params_after > record.params_before
    assert_same_function(reference, model_outputs(model, (X,)))
    assert all(any(p is q for g in opt.param_groups for q in g["params"])
               for p in model.parameters())
    model.train()
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        fan_out = model[8].weight.grad[:, 8:].abs().sum()
        assert fan_out > 0  # the new units' outgoing weights learn at once
        if step == 1:
            assert model[4].weight.grad[8:].abs().sum() > 0  # then their incoming ones
        opt.step()


def test_gradmax_fan_in_follows_the_top_singular_directions() -> None:
    model = cnn()
    rec = recorded(model)
    o = {x.layer: x for x in growth_options(model, X[:1], rec.growth)}["4"]
    old = model[4].weight.detach().reshape(8, -1).clone()
    grow_layer(model, "4", 2, init="gradmax", example_inputs=X[:1], option=o)
    new = model[4].weight.detach()[8:].reshape(2, -1).double()
    scale = old.double().norm(dim=1).mean()
    torch.testing.assert_close(new, o.directions[:2] * scale, rtol=1e-5, atol=1e-6)
    assert float(model[8].weight.detach()[:, 8:].abs().max()) == 0.0  # fan-out zero


def test_orthogonal_fan_in_is_orthogonal_to_the_existing_units() -> None:
    model = cnn()
    old = model[4].weight.detach().reshape(8, -1).double().clone()
    grow_layer(model, "4", 3, init="orthogonal", example_inputs=X[:1])
    new = model[4].weight.detach()[8:].reshape(3, -1).double()
    assert float((new @ old.T).abs().max()) < 1e-4 * float(new.norm() * old.norm())


def test_a_failed_growth_leaves_everything_as_before() -> None:
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="unknown growth init 'magic'"):
        grow_layer(model, "4", 2, init="magic", example_inputs=X[:1], optimizer=opt)
    with pytest.raises(Exception, match="output"):
        grow_layer(model, "12", 2, init="gradmax", example_inputs=X[:1], optimizer=opt)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_schedule_spreads_the_budget_over_the_first_part_of_training() -> None:
    s = GrowthSchedule(100.0, 300.0, total_epochs=15, by=0.3, steps=4)
    assert s.epochs == [1, 2, 3, 4]
    assert GrowthSchedule(1.0, 2.0, total_epochs=12, by=1.0, steps=3).epochs == [4, 7, 11]
    assert GrowthSchedule(1.0, 2.0, total_epochs=3, by=0.5, steps=4).epochs == [1]
    assert s.due(1) and not s.due(5)
    assert s.step_budget(100.0) == 50.0
    s.done = 3
    assert s.step_budget(250.0) == 50.0 and not s.due(3) and s.due(4)


def test_learning_rate_boost_scales_the_new_entries_update() -> None:
    torch.manual_seed(0)
    plain, boosted = cnn(), None
    boosted = copy.deepcopy(plain)
    results = []
    for model, factor in ((plain, 1.0), (boosted, 3.0)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(5)
        record = widen(model, "4", 4, strategy="zero", example_inputs=X[:1], optimizer=opt)
        boost = LearningRateBoost(factor, epochs=1)
        boost.add(model, record, opt, X[:1])
        before = model[4].weight.detach().clone()
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
        results.append(model[4].weight.detach() - before)
        boost.step_epoch(model)
        assert not boost.entries and not boost._handles  # expired after its epoch
    torch.testing.assert_close(results[1][8:], 3.0 * results[0][8:])
    torch.testing.assert_close(results[1][:8], results[0][:8])  # old units: the plain rate
