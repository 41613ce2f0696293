"""``narrow_many``: one pruning round over several groups with one trace, equal to the same
``narrow`` calls made one by one (re-tracing each time), atomic, and replayed by checkpoints."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from helpers.zoo import ZOO, ZooCase

import neuroexapt as nx
from neuroexapt.errors import ConfigError, SurgeryError
from neuroexapt.graph import trace
from neuroexapt.ops import get_history, narrow, narrow_many


def plan(case: ZooCase, model: torch.nn.Module) -> dict[str, list[int]]:
    """For each distinct group of the case's narrow layers: remove every other unit but one."""
    graph = trace(model, case.inputs(2))
    chosen: dict[str, list[int]] = {}
    seen = set()
    for layer in case.narrow:
        group = graph.group_of(layer)
        if group.id in seen or group.segments != 1:
            continue
        seen.add(group.id)
        chosen[layer] = list(range(1, group.size, 2))[: max(1, group.size // 2)]
    return chosen


@pytest.mark.parametrize("name", sorted(ZOO))
def test_equals_narrow_one_by_one_in_any_order(name: str) -> None:
    case = ZOO[name]
    torch.manual_seed(0)
    model = case.build()
    removals = plan(case, model)
    if len(removals) < 2:
        pytest.skip("fewer than two groups to narrow together")
    x = case.inputs(4)
    reference = copy.deepcopy(model)
    for layer, units in removals.items():
        narrow(reference, layer, remove=units, example_inputs=x)
    expected = reference.state_dict()
    for order in itertools.islice(itertools.permutations(removals), 3):
        edited = copy.deepcopy(model)
        records = narrow_many(edited, {k: removals[k] for k in order}, example_inputs=x)
        assert [r.target for r in records] == list(order)
        state = edited.state_dict()
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), (order, key)
        edited.eval()
        reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(edited(*x), reference(*x))


def test_densenet_concatenation_offsets() -> None:
    """Groups that follow each other along the concatenated channels of one tensor."""
    case = ZOO["densenet"]
    torch.manual_seed(0)
    model = case.build()
    x = case.inputs(4)
    reference = copy.deepcopy(model)
    removals = {"dense.1.conv": [0, 1, 2], "stem": [5, 6], "dense.0.conv": [1]}
    for layer, units in removals.items():
        narrow(reference, layer, remove=units, example_inputs=x)
    narrow_many(model, removals, example_inputs=x)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_optimizer_follows_and_checkpoint_replays(tmp_path: Path) -> None:
    case = ZOO["resnet"]
    torch.manual_seed(0)
    model = case.build()
    x, y = case.inputs(4), case.target(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(model(*x), y).backward()
    opt.step()
    narrow_many(model, plan(case, model), example_inputs=x, optimizer=opt)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in held)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(*x), y).backward()
    opt.step()  # trains the narrowed model
    nx.save(model, tmp_path / "m.pt")
    torch.manual_seed(0)
    fresh = nx.load(tmp_path / "m.pt", case.build).model
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), model(*x))


def test_failure_restores_everything() -> None:
    case = ZOO["vgg"]
    torch.manual_seed(0)
    model = case.build()
    x = case.inputs(2)
    layers = plan(case, model)
    first, last = next(iter(layers)), list(layers)[-1]
    size = trace(model, x).group_of(last).size
    state = copy.deepcopy(model.state_dict())
    history = get_history(model)
    with pytest.raises(SurgeryError, match="remove all"):
        narrow_many(model, {first: layers[first], last: list(range(size))}, example_inputs=x)
    assert get_history(model) == history
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(ConfigError, match="non-empty"):
        narrow_many(model, {}, example_inputs=x)
