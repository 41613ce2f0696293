"""Snapshot: take, edit and train, restore; everything comes back bit for bit, in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.asserts import ModelSnapshot, assert_model_unchanged, snapshot_model
from helpers.zoo import ZOO
from torch import nn

from neuroexapt.ops import add_skip, deepen, get_history, widen
from neuroexapt.policy import Snapshot

VGG_X = ZOO["vgg"].inputs(8)
VGG_Y = ZOO["vgg"].target(8)


def vgg_with_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The zoo VGG, trained two Adam steps (moments and step counts), with two param groups
    and one earlier edit in its history."""
    torch.manual_seed(0)
    model = ZOO["vgg"].build()
    widen(model, "classifier.0", 4, example_inputs=VGG_X)
    opt = torch.optim.Adam([
        {"params": model.features.parameters(), "lr": 1e-3},
        {"params": model.classifier.parameters(), "lr": 3e-3, "weight_decay": 1e-4},
    ])
    train(model, opt, 2)
    return model, opt


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(*VGG_X), VGG_Y).backward()
        opt.step()


def optimizer_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Hyper-parameters per group and state per parameter name, cloned."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
              for g in opt.param_groups]
    state = {names[id(p)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return {"groups": groups, "state": state}


def assert_optimizer_restored(model: nn.Module, opt: torch.optim.Optimizer,
                              expected: dict[str, Any]) -> None:
    # every group points at the model's current parameters, each exactly once
    held = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(id(p) for p in held) == sorted(id(p) for p in model.parameters())
    got = optimizer_by_name(model, opt)
    assert got["groups"] == expected["groups"]
    assert got["state"].keys() == expected["state"].keys()
    for name, state in expected["state"].items():
        assert state.keys() == got["state"][name].keys(), name
        for key, value in state.items():
            now = got["state"][name][key]
            assert torch.equal(now, value) if torch.is_tensor(value) else now == value, \
                (name, key)


def structure(model: nn.Module) -> list[tuple[str, type, list[tuple[int, ...]]]]:
    return [(n, type(m), [tuple(p.shape) for p in m.parameters(recurse=False)])
            for n, m in model.named_modules()]


def assert_model_restored(model: nn.Module, snap: ModelSnapshot) -> None:
    """Structure, tensors (parameters and buffers) and modes exactly as in ``snap``.

    Restoring puts back copies of the parameters (the edit replaced the originals), so the
    parameter identity check of ``assert_model_unchanged`` is made against the current ones.
    """
    assert_model_unchanged(model, {**snap, "params": dict(model.named_parameters())})


EDITS: dict[str, Callable[[nn.Module, torch.optim.Optimizer], Any]] = {
    "widen": lambda m, o: widen(m, "features.0", 3, example_inputs=VGG_X, optimizer=o),
    "deepen": lambda m, o: deepen(m, "features.4", example_inputs=VGG_X, optimizer=o),
    "add_skip": lambda m, o: add_skip(m, "classifier.0", "classifier.2", example_inputs=VGG_X,
                                      optimizer=o),
    "widen+deepen": lambda m, o: (
        widen(m, "features.4", 2, example_inputs=VGG_X, optimizer=o),
        deepen(m, "classifier.0", example_inputs=VGG_X, optimizer=o)),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_restore_after_edit_and_training(edit: str) -> None:
    model, opt = vgg_with_optimizer()
    model.eval()
    model.classifier.train()  # a mixed mode must come back too
    snap, history = snapshot_model(model), get_history(model)
    opt_before = optimizer_by_name(model, opt)
    modules_before = structure(model)
    snapshot = Snapshot.take(model, opt)

    EDITS[edit](model, opt)
    train(model, opt, 2)  # weights, BN running statistics and Adam state all move on
    assert structure(model) != modules_before
    assert len(get_history(model)) > len(history)

    identity = id(model)
    snapshot.restore(model, opt)
    assert id(model) == identity
    assert structure(model) == modules_before
    assert_model_restored(model, snap)  # parameters, buffers, structure, modes
    assert get_history(model) == history
    assert_optimizer_restored(model, opt, opt_before)

    # training goes on with the restored optimizer: every parameter is updated
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 1)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_snapshot_is_independent_and_reusable() -> None:
    model, opt = vgg_with_optimizer()
    snap = snapshot_model(model)
    opt_before = optimizer_by_name(model, opt)
    snapshot = Snapshot.take(model, opt)
    train(model, opt, 1)  # in-place updates must not reach the snapshot's copy
    snapshot.restore(model, opt)
    assert_model_restored(model, snap)
    widen(model, "features.4", 2, example_inputs=VGG_X, optimizer=opt)
    train(model, opt, 1)
    snapshot.restore(model, opt)  # a second time, after another edit
    assert_model_restored(model, snap)
    assert_optimizer_restored(model, opt, opt_before)


def test_restore_matches_a_model_that_never_changed() -> None:
    model, opt = vgg_with_optimizer()
    twin, twin_opt = vgg_with_optimizer()  # same seed: the same model and state
    snapshot = Snapshot.take(model, opt)
    deepen(model, "features.0", example_inputs=VGG_X, optimizer=opt)
    train(model, opt, 3)
    snapshot.restore(model, opt)
    train(model, opt, 2)
    train(twin, twin_opt, 2)
    for (n, p), (_, q) in zip(model.state_dict().items(), twin.state_dict().items(),
                              strict=True):
        assert torch.equal(p, q), n


def test_without_optimizer() -> None:
    model, _ = vgg_with_optimizer()
    snap = snapshot_model(model)
    snapshot = Snapshot.take(model, None)
    assert snapshot.optimizer_state is None
    widen(model, "features.0", 2, example_inputs=VGG_X)
    snapshot.restore(model, None)
    assert_model_restored(model, snap)


def test_restore_keeps_the_current_learning_rate() -> None:
    """A rollback restores weights and state, not the schedule's hyper-parameters."""
    from neuroexapt.policy.rollback import Snapshot

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    snap = Snapshot.take(model, opt)
    weight = model.weight.detach().clone()
    opt.step()
    sched.step()
    snap.restore(model, opt)
    assert torch.equal(model.weight, weight)
    assert opt.param_groups[0]["lr"] == 0.05
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters(),
                                      strict=True))
