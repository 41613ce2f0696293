"""Tests for neuroexapt.optim: migrating optimizer state across a hand-built Net2Net edit."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from neuroexapt.errors import SurgeryError
from neuroexapt.optim import DimMap, ParamChange, ParamMap, migrate, restore, snapshot

SECOND = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"}
SPLIT, HALF = [0, 1, 2, 1], [1.0, 0.5, 1.0, 0.5]
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.005, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def loss_of(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    return nn.functional.mse_loss(model(x), y)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def setup(name: str, steps: int = 3) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    model = make_model()
    opt = OPTIMIZERS[name](list(model.parameters()))
    train(model, opt, steps)
    return model, opt


def edit_hidden(model: nn.Sequential, index: list[int], scale: list[float] | None) -> ParamMap:
    """Re-index fc1's output units and fc2's input units; swap new Parameters into the model."""
    fc1, fc2 = model[0], model[2]
    idx = torch.tensor(index)
    sc = None if scale is None else torch.tensor(scale)
    fresh = idx < 0
    w1, b1 = fc1.weight.detach()[idx.clamp(min=0)], fc1.bias.detach()[idx.clamp(min=0)]
    w1[fresh], b1[fresh] = 0.1, 0.0
    w2 = fc2.weight.detach()[:, idx.clamp(min=0)] * (1.0 if sc is None else sc)
    w2[:, fresh] = 0.0
    news = [nn.Parameter(t.clone()) for t in (w1, b1, w2)]
    changed = [
        ParamChange(fc1.weight, news[0], (DimMap(0, idx),)),
        ParamChange(fc1.bias, news[1], (DimMap(0, idx),)),
        ParamChange(fc2.weight, news[2], (DimMap(1, idx, sc),)),
    ]
    fc1.weight, fc1.bias, fc2.weight = news
    fc1.out_features = fc2.in_features = len(index)
    return ParamMap(changed=changed)


def expected(
    old: torch.Tensor, key: str, dim: int, index: list[int], scale: list[float] | None
) -> torch.Tensor:
    """Slice by slice: position j takes old[index[j]] * factor, or zeros when index[j] is -1."""
    scale = scale or [1.0] * len(index)
    parts = []
    for i, s in zip(index, scale, strict=True):
        factor = s * s if key in SECOND else abs(s) if key == "exp_inf" else s
        zero = torch.zeros_like(old.select(dim, 0))
        parts.append(old.select(dim, i) * factor if i >= 0 else zero)
    return torch.stack(parts, dim=dim)


States = dict[torch.Tensor, dict[str, torch.Tensor]]


def old_states(opt: torch.optim.Optimizer) -> States:
    return {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def check_mapped(
    opt: torch.optim.Optimizer,
    pmap: ParamMap,
    before: States,
    index: list[int],
    scale: list[float] | None,
) -> None:
    """Every state entry of the three changed params equals its slice of the old state."""
    for change, dim in zip(pmap.changed, (0, 0, 1), strict=True):
        assert change.old not in opt.state
        new_state, old_state = opt.state[change.new], before[change.old]
        assert new_state.keys() == old_state.keys()
        for key, old in old_state.items():
            got = new_state[key]
            if key == "step":
                assert torch.equal(got, old)
                continue
            sc = scale if dim == 1 else None
            torch.testing.assert_close(got, expected(old, key, dim, index, sc), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_split_maps_state_like_the_params(name: str) -> None:
    model, opt = setup(name)
    before, out_before = old_states(opt), model(torch.ones(1, 4))
    pmap = edit_hidden(model, SPLIT, HALF)
    torch.testing.assert_close(model(torch.ones(1, 4)), out_before)  # the map is a Net2Net split
    migrate(opt, pmap)
    check_mapped(opt, pmap, before, SPLIT, HALF)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


@pytest.mark.parametrize("index", [[0, 2], [0, 1, 2, -1]], ids=["narrow", "fresh"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_narrow_and_fresh_positions(name: str, index: list[int]) -> None:
    model, opt = setup(name)
    before = old_states(opt)
    pmap = edit_hidden(model, index, None)
    migrate(opt, pmap)
    check_mapped(opt, pmap, before, index, None)
    if -1 in index:
        for change in pmap.changed:
            moment = opt.state[change.new]["momentum_buffer" if name == "sgd" else "exp_avg"]
            assert not moment.select(change.dims[0].dim, 3).any()


def test_old_state_tensors_are_not_mutated() -> None:
    model, opt = setup("adam")
    keep = {p: dict(s) for p, s in opt.state.items()}
    before = old_states(opt)
    pmap = edit_hidden(model, SPLIT, HALF)
    migrate(opt, pmap)
    for p, state in keep.items():
        for key, tensor in state.items():
            assert torch.equal(tensor, before[p][key])
    new_step, old_step = opt.state[pmap.changed[0].new]["step"], keep[pmap.changed[0].old]["step"]
    assert new_step is not old_step


def test_exp_inf_uses_absolute_scale() -> None:
    model = make_model()
    opt = torch.optim.Adamax(model.parameters(), lr=0.01)
    train(model, opt, 2)
    before = old_states(opt)
    scale = [1.0, -0.5, 1.0, 0.5]
    pmap = edit_hidden(model, SPLIT, scale)
    migrate(opt, pmap)
    check_mapped(opt, pmap, before, SPLIT, scale)
    old_w2, new_w2 = pmap.changed[2].old, pmap.changed[2].new
    want = before[old_w2]["exp_inf"][:, 1] * 0.5
    assert torch.equal(opt.state[new_w2]["exp_inf"][:, 1], want)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_keeps_lowering_the_loss(name: str) -> None:
    model, opt = setup(name, steps=5)
    migrate(opt, edit_hidden(model, SPLIT, HALF))
    losses = train(model, opt, 4)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_scheduler_keeps_stepping_the_same_group() -> None:
    model, opt = setup("sgd")
    group = opt.param_groups[0]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    migrate(opt, edit_hidden(model, SPLIT, HALF))
    train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0] is group
    assert group["lr"] == pytest.approx(0.025)


def test_sgd_none_momentum_buffer_stays_none() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.state[model[0].weight] = {"momentum_buffer": None}
    pmap = edit_hidden(model, SPLIT, HALF)
    migrate(opt, pmap)
    assert opt.state[pmap.changed[0].new] == {"momentum_buffer": None}
    assert pmap.changed[1].new not in opt.state


Full = tuple[list[Any], list[Any]]


def full_state(opt: torch.optim.Optimizer) -> Full:
    """Param ids and options per group, and a clone of the state keyed by param id."""
    groups = [
        (list(map(id, g["params"])), {k: v for k, v in g.items() if k != "params"})
        for g in opt.param_groups
    ]
    state = [(id(p), {k: v.clone() for k, v in s.items()}) for p, s in opt.state.items()]
    return groups, state


def assert_same_state(got: Full, want: Full) -> None:
    assert got[0] == want[0]
    assert [pid for pid, _ in got[1]] == [pid for pid, _ in want[1]]
    for (_, a), (_, b) in zip(got[1], want[1], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unmappable_state_raises_and_changes_nothing() -> None:
    model, opt = setup("adam")
    opt.state[model[2].weight]["weird"] = torch.zeros(7)
    want, want_sd = full_state(opt), opt.state_dict()
    with pytest.raises(
        SurgeryError,
        match=r"Adam state 'weird' has shape \(7,\).*\(2, 3\).*"
        r"manually, or use SGD, Adam, AdamW, RMSprop or Adagrad",
    ):
        migrate(opt, edit_hidden(model, SPLIT, HALF))
    assert_same_state(full_state(opt), want)
    got_sd = opt.state_dict()
    assert got_sd["param_groups"] == want_sd["param_groups"]
    for pid, state in want_sd["state"].items():
        assert all(torch.equal(got_sd["state"][pid][k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("dims", "match"),
    [
        ((DimMap(0, torch.tensor([0, 5])),), r"\[-1, 3\)"),
        ((DimMap(0, torch.tensor([0, 1])),), r"new parameter has shape \(4, 4\)"),
        ((DimMap(2, torch.tensor([0])),), "out of range"),
    ],
)
def test_bad_dim_map_raises_and_changes_nothing(dims: tuple[DimMap, ...], match: str) -> None:
    model, opt = setup("sgd")
    want = full_state(opt)
    pmap = ParamMap(changed=[ParamChange(model[0].weight, nn.Parameter(torch.zeros(4, 4)), dims)])
    with pytest.raises(SurgeryError, match=match):
        migrate(opt, pmap)
    assert_same_state(full_state(opt), want)


def test_snapshot_restore_round_trip_after_migrate() -> None:
    model, opt = setup("adamw")
    lists = [g["params"] for g in opt.param_groups]
    want, snap = full_state(opt), snapshot(opt)
    migrate(opt, edit_hidden(model, SPLIT, HALF))
    opt.param_groups[0]["lr"] = 1.0
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    restore(opt, snap)
    assert_same_state(full_state(opt), want)
    assert opt.param_groups[0]["params"] is not lists[0]
    opt.param_groups[0]["params"].append(nn.Parameter(torch.zeros(1)))  # in place, after restore
    opt.state[opt.param_groups[0]["params"][0]]["step"] = torch.tensor(0.0)
    restore(opt, snap)
    assert_same_state(full_state(opt), want)


def test_added_and_removed_params_follow_their_groups() -> None:
    model = make_model()
    fc1, fc2 = model[0], model[2]
    opt = torch.optim.SGD(
        [
            {"params": list(fc1.parameters()), "lr": 0.1},
            {"params": list(fc2.parameters()), "lr": 0.01},
        ],
        momentum=0.9,
    )
    train(model, opt, 2)
    near_fc2, no_ref, stray_ref = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    outsider = nn.Parameter(torch.zeros(1))
    added = [(near_fc2, fc2.weight), (no_ref, None), (stray_ref, outsider), (fc1.bias, fc2.weight)]
    pmap = ParamMap(added=added, removed=[fc2.bias])
    migrate(opt, pmap)
    ids = [[id(p) for p in g["params"]] for g in opt.param_groups]
    assert ids == [
        [id(fc1.weight), id(fc1.bias), id(no_ref), id(stray_ref)],
        [id(fc2.weight), id(near_fc2)],
    ]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert fc2.bias not in opt.state and near_fc2 not in opt.state and fc2.weight in opt.state


def test_params_outside_the_optimizer_are_skipped() -> None:
    model = make_model()
    opt = torch.optim.Adam(model[2].parameters(), lr=0.01)
    train(model, opt, 1)
    before = old_states(opt)
    pmap = edit_hidden(model, SPLIT, HALF)
    migrate(opt, ParamMap(changed=pmap.changed[:2]))  # fc1 only: not trained by opt
    want = [id(pmap.changed[2].old), id(model[2].bias)]
    assert [id(p) for p in opt.param_groups[0]["params"]] == want
    assert all(p in before for p in opt.state)


def test_new_param_already_in_optimizer_raises() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([a, b], lr=0.1)
    with pytest.raises(SurgeryError, match=r"shape \(3,\) would appear twice"):
        migrate(opt, ParamMap(changed=[ParamChange(a, b, ())]))
    assert opt.param_groups[0]["params"][0] is a


def test_rename_keeps_state_as_new_tensors() -> None:
    model, opt = setup("sgd")
    w = model[0].weight
    buf = opt.state[w]["momentum_buffer"]
    migrate(opt, ParamMap(changed=[ParamChange(w, w, ())]))
    assert torch.equal(opt.state[w]["momentum_buffer"], buf)
    assert opt.state[w]["momentum_buffer"] is not buf
