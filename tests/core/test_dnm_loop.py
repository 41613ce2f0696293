"""The design document's loop as written: no optimizer, probe or inputs passed; growth budgets;
resume from a checkpoint; bad growth settings."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.asserts import assert_model_unchanged, snapshot_model
from torch import nn

import neuroexapt
from neuroexapt.core import DNMFramework
from neuroexapt.errors import ConfigError
from neuroexapt.metrics import count_macs
from neuroexapt.ops import get_history
from neuroexapt.train.digits import DigitsCNN, load_digits

Data = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def digits() -> dict[str, Data]:
    x, y, x_val, y_val = load_digits(0)
    return {"train": (x[:768], y[:768]), "val": (x_val[:200], y_val[:200])}


def train_epoch(model: nn.Module, loader: list[Data], optimizer: torch.optim.Optimizer,
                criterion: nn.Module) -> tuple[float, float]:
    model.train()
    total, hits, n = 0.0, 0, 0
    for x, y in loader:
        optimizer.zero_grad()
        out = model(x)
        loss = criterion(out, y)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        hits += int((out.argmax(1) == y).sum())
        n += len(y)
    return total / n, hits / n


def validate_epoch(model: nn.Module, loader: list[Data], criterion: nn.Module
                   ) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        outs = [(model(x), y) for x, y in loader]
    loss = sum(float(criterion(o, y)) * len(y) for o, y in outs) / sum(len(y) for _, y in outs)
    acc = sum(int((o.argmax(1) == y).sum()) for o, y in outs) / sum(len(y) for _, y in outs)
    return loss, acc


def loaders(digits: dict[str, Data], epoch: int) -> tuple[list[Data], list[Data]]:
    x, y = digits["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
    train = [(x[i], y[i]) for i in order.split(64)]
    xv, yv = digits["val"]
    return train, [(xv, yv)]


def document_loop(model: nn.Module, optimizer: torch.optim.Optimizer, dnm: DNMFramework,
                  digits: dict[str, Data], epochs: range, log: list[Any]) -> nn.Module:
    """The first design document's loop, line for line (loaders filled in)."""
    criterion = nn.CrossEntropyLoss()
    for epoch in epochs:
        train_loader, val_loader = loaders(digits, epoch)
        train_loss, train_acc = train_epoch(model, train_loader, optimizer, criterion)
        val_loss, val_acc = validate_epoch(model, val_loader, criterion)

        dnm.update_caches()
        dnm.record_performance(val_acc)

        should_trigger, reasons = dnm.should_trigger_morphogenesis(
            epoch + 1,
            {'accuracy': train_acc, 'loss': train_loss},
            {'accuracy': val_acc, 'loss': val_loss}
        )

        if should_trigger:
            results = dnm.execute_morphogenesis(epoch + 1)
            log.append((epoch + 1, reasons, results))
            if results['neuron_divisions'] > 0:
                model = dnm.model
        log.append((epoch + 1, val_acc))
    return model


def test_the_documents_loop_runs_as_written_and_grows(digits: dict[str, Data]) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dnm_config = {
        'morphogenesis_interval': 3,
        'max_morphogenesis_per_epoch': 1,
        'performance_improvement_threshold': 0.01,
    }
    dnm = DNMFramework(model, dnm_config)
    before = sum(p.numel() for p in model.parameters())
    log: list[Any] = []
    model = document_loop(model, optimizer, dnm, digits, range(9), log)
    changes = [entry for entry in log if len(entry) == 3]
    assert changes, "the loop never triggered"
    grown = [r for _, _, r in changes if r["neuron_divisions"] > 0]
    assert grown and sum(p.numel() for p in model.parameters()) > before
    assert model is dnm.model
    # the optimizer found by the hooks is the user's, and it trains every parameter
    assert dnm.optimizer is optimizer
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in trained for p in model.parameters())
    # every event names where, why (a measured gain) and what it cost
    for event in dnm.events.events:
        assert event.kind == "neuron_division" and event.reasons[0].startswith("growth: ")
        assert event.params_after > event.params_before
    # training goes on after the last change: the grown model keeps learning
    last = max(e for e, _, _ in changes)
    accs = [a for e, a in (entry for entry in log if len(entry) == 2) if e >= last]
    assert accs[-1] > 0.8
    dnm.close()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_two_optimizers_on_the_model_are_refused_by_name(digits: dict[str, Data]) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    first = torch.optim.SGD(model.parameters(), lr=0.01)
    second = torch.optim.Adam(model.parameters(), lr=1e-3)
    dnm = DNMFramework(model, {"morphogenesis_interval": 1, "trigger_on_bottleneck": True})
    train, _ = loaders(digits, 0)
    for opt in (first, second):
        train_epoch(model, train[:3], opt, nn.CrossEntropyLoss())
    dnm.update_caches()
    snap = snapshot_model(model)
    with pytest.raises(ConfigError, match=r"2 optimizers \(SGD, Adam\) step this model's "
                                          r"parameters.*pass DNMFramework\(model, config, "
                                          r"optimizer=optimizer\) \(the one to migrate\)"):
        dnm.execute_morphogenesis(1)
    assert_model_unchanged(model, snap)
    assert get_history(model) == []
    dnm.close()


def test_no_optimizer_stepped_yet_is_a_clear_error() -> None:
    dnm = DNMFramework(DigitsCNN(width=4))
    with pytest.raises(ConfigError, match="none has stepped its parameters yet"):
        dnm.execute_morphogenesis(1)


def test_caller_tensors_as_lists_in_layer_order(digits: dict[str, Data]) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    dnm = DNMFramework(model, {}, example_inputs=digits["train"][0][:8])
    x, y = digits["train"]
    acts = []
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o: acts.append(o.detach())) for n in dnm.layers]
    with torch.no_grad():
        model(x[:64])
    for h in handles:
        h.remove()
    report = dnm.update_caches(acts, None, y[:64])
    assert report.order == dnm.layers == ["features.0", "features.3", "classifier.0",
                                          "classifier.2"]
    with pytest.raises(ConfigError, match=r"got 2 activations but the model has 4 analysed "
                                          r"layers"):
        dnm.update_caches(acts[:2], None, y[:64])
    with pytest.raises(ConfigError, match=r"must be a dict \{layer name: tensor\} or a list"):
        dnm.update_caches(3, None, y[:64])  # type: ignore[arg-type]
    dnm.close()


@pytest.mark.parametrize("cost", ["parameters", "macs"])
def test_a_growth_budget_is_spent_early_and_never_exceeded(digits: dict[str, Data],
                                                           cost: str) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = digits["train"][0][:1]

    def size() -> int:
        return sum(p.numel() for p in model.parameters()) if cost == "parameters" else \
            count_macs(model, x)

    start = size()
    dnm = DNMFramework(model, {"growth_budget": "2x", "growth_cost": cost, "total_epochs": 8,
                               "growth_by": 0.5, "growth_steps": 2,
                               "growth_init": "gradmax", "morphogenesis_interval": 100})
    log: list[Any] = []
    document_loop(model, optimizer, dnm, digits, range(8), log)
    grown_at = sorted({e.epoch for e in dnm.events.events if e.kind == "neuron_division"})
    assert grown_at and set(grown_at) <= {2, 4}  # the schedule: by half of the 8 epochs
    assert start < size() <= 2 * start
    assert dnm.schedule is not None and dnm.schedule.done == 2
    # once every scheduled step is taken no growth can follow: the costly bypass gradients
    # are no longer recorded, the layer statistics still are
    assert not dnm.recorder.record_growth
    assert dnm.report is not None and dnm.report.layers  # measured at the last epoch
    assert dnm._bypass == {}  # nothing recorded for growth since the last step
    dnm.close()


def test_resume_from_a_checkpoint_reproduces_the_run(digits: dict[str, Data],
                                                    tmp_path: Path) -> None:
    config = {"growth_budget": "2x", "growth_cost": "parameters", "total_epochs": 6,
              "growth_by": 1.0, "growth_steps": 3, "growth_init": "split",
              "progressive_activation_epochs": 2, "division_noise_scale": 0.2}

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return DigitsCNN(width=4)

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    model = fresh()
    opt = make_opt(model)
    dnm = DNMFramework(model, config, optimizer=opt, seed=3)
    whole = document_loop(model, opt, dnm, digits, range(6), [])
    dnm.close()
    uninterrupted = dnm

    model = fresh()
    opt = make_opt(model)
    dnm = DNMFramework(model, config, optimizer=opt, seed=3)
    document_loop(model, opt, dnm, digits, range(3), [])
    neuroexapt.save(model, tmp_path / "mid.pt", optimizer=opt, policy=dnm)
    dnm.close()
    ck = neuroexapt.load(tmp_path / "mid.pt", model_factory=fresh, optimizer_factory=make_opt)
    resumed_model, resumed_opt = ck
    assert ck.policy_state is not None
    resumed = DNMFramework(resumed_model, config, optimizer=resumed_opt, seed=3)
    resumed.load_state_dict(ck.policy_state)
    assert resumed.trigger.changes == 2 and resumed.schedule.done == 2
    document_loop(resumed_model, resumed_opt, resumed, digits, range(3, 6), [])
    resumed.close()
    assert [r.to_dict() for r in get_history(resumed_model)] == \
        [r.to_dict() for r in get_history(whole)]
    for (name, a), (_, b) in zip(whole.state_dict().items(),
                                 resumed_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name, rtol=1e-4, atol=1e-5)
    got = [e.to_dict() for e in resumed.events.events]
    want = [e.to_dict() for e in uninterrupted.events.events]
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if g[k] != w[k]} == {}, (g, w)


@pytest.mark.parametrize(("config", "message"), [
    ({"growth_budget": 10, "growth_cost": "parameters", "total_epochs": 5},
     r"growth_budget=10 is below the model's current 4,818 parameters: pass a larger number, "
     r"or a ratio such as '2x'"),
    ({"growth_budget": "2x", "total_epochs": 5, "growth_by": 0},
     r"growth_by must be a number in \(0, 1\], got 0"),
    ({"growth_budget": "2x", "total_epochs": 5, "growth_by": 1.5},
     r"growth_by must be a number in \(0, 1\], got 1\.5"),
    ({"growth_init": "magic"},
     r"growth_init 'magic' is not one of gradmax, orthogonal, split"),
    ({"growth_budget": "2x"}, r"growth_budget needs total_epochs .*add 'total_epochs': epochs"),
    ({"growth_budget": "half"}, r"growth_budget 'half' must be a count \(an int\) or a ratio"),
    ({"growth_cost": "flops"}, r"growth_cost 'flops' is not one of macs, parameters"),
])
def test_bad_growth_settings_fail_at_construction(config: dict[str, Any], message: str) -> None:
    model = DigitsCNN(width=4)
    snap = snapshot_model(model)
    with pytest.raises(ConfigError, match=message):
        DNMFramework(model, config)
    assert_model_unchanged(model, snap)
    assert not any(m._forward_hooks for m in model.modules())


def test_update_caches_with_unknown_layer_names(digits: dict[str, Data]) -> None:
    dnm = DNMFramework(DigitsCNN(width=4))
    x = digits["train"][0][:8]
    with pytest.raises(ConfigError, match=r"names layer 'features\.7', which is not an analysed "
                                          r"layer; use names from dnm\.layers"):
        dnm.update_caches({"features.7": x}, None, digits["train"][1][:8])
    dnm.close()


def test_a_rollback_reattaches_the_recorder(digits: dict[str, Data]) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dnm = DNMFramework(model, {"morphogenesis_interval": 1, "trigger_on_bottleneck": True,
                               "evaluation_window": 1, "performance_drop_threshold": 0.01,
                               "growth_init": "gradmax"})
    train, _ = loaders(digits, 0)
    train_epoch(model, train, optimizer, nn.CrossEntropyLoss())
    dnm.update_caches()
    dnm.record_performance(0.9)
    assert dnm.should_trigger_morphogenesis(1)[0]
    before = copy.deepcopy(model.state_dict())
    assert dnm.execute_morphogenesis(1)["neuron_divisions"] == 1
    dnm.record_performance(0.1)  # a drop: rolled back
    assert dnm.events.events[-1].kind == "rollback"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train_epoch(model, train, optimizer, nn.CrossEntropyLoss())
    assert dnm.recorder.recorded > 0  # statistics again, from the restored modules
    dnm.update_caches()
    dnm.close()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0


def test_a_state_of_other_layers_is_refused_before_anything_changes() -> None:
    from neuroexapt.errors import CheckpointError

    torch.manual_seed(0)
    x, y, _, _ = load_digits(0)
    model = DigitsCNN(width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    saved = DNMFramework(model, {"morphogenesis_interval": 1}, optimizer=opt)
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    saved.record_performance(0.5)
    state = saved.state_dict()
    saved.close()
    other = DNMFramework(model, {"morphogenesis_interval": 1}, optimizer=opt,
                         layers=["features.0"])
    with pytest.raises(CheckpointError, match="same layers"):
        other.load_state_dict(state)
    assert other.trigger.history == [] and other.recorder.steps == 0
    other.close()
