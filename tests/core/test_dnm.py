"""DNMFramework: the design document's training loop, its errors, rollback, events, budgets."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.asserts import (
    assert_model_unchanged,
    assert_optimizer_unchanged,
    assert_same_function,
    snapshot_model,
    snapshot_optimizer,
)
from helpers.zoo import ZOO
from torch import nn

from neuroexapt.core import DNMFramework, DNMNet2Net
from neuroexapt.errors import ConfigError, SurgeryError
from neuroexapt.ops import get_history
from neuroexapt.policy.events import EVENT_KINDS
from neuroexapt.train.digits import DigitsCNN, load_digits

Data = tuple[torch.Tensor, torch.Tensor]
DOCUMENTED_KEYS = {"neuron_divisions", "connections_added", "layers_added", "parameters_added",
                   "events"}
EVENT_FIELDS = {"epoch", "kind", "layer", "reasons", "params_before", "params_after",
                "metric_before", "metric_after", "details"}
# fires at every epoch where the analysis finds a bottleneck (some layer nearly always is one)
EAGER = {"morphogenesis_interval": 1, "trigger_on_bottleneck": True}


@pytest.fixture(scope="module")
def data() -> dict[str, Data]:
    """Digits: 512 training images, a held-out probe slice of the training split, validation."""
    x, y, x_val, y_val = load_digits(0)
    return {"train": (x[:512], y[:512]), "probe": (x[-128:], y[-128:]),
            "val": (x_val[:200], y_val[:200])}


def probe_batches(data: dict[str, Data]) -> list[Data]:
    x, y = data["probe"]
    return [(x[:64], y[:64]), (x[64:], y[64:])]


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: Data, seed: int
                ) -> tuple[float, float]:
    x, y = data
    model.train()
    losses, correct = [], 0
    for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).split(64):
        opt.zero_grad()
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        correct += int((out.argmax(1) == y[idx]).sum())
    return sum(losses) / len(losses), correct / len(y)


def validate_epoch(model: nn.Module, data: Data) -> tuple[float, float]:
    x, y = data
    model.eval()
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def setup(data: dict[str, Data], config: dict[str, Any], **kw: Any
          ) -> tuple[nn.Module, torch.optim.Optimizer, DNMFramework]:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw.setdefault("probe", probe_batches(data))
    return model, opt, DNMFramework(model, config, optimizer=opt, **kw)


def optimizer_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "groups": [[names[id(p)] for p in g["params"]] for g in opt.param_groups],
        "state": {names[id(p)]: {k: v.clone() for k, v in s.items()}
                  for p, s in opt.state.items()},
    }


def assert_same_optimizer(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["groups"] == b["groups"]
    assert a["state"].keys() == b["state"].keys()
    for name, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][name][key]), (name, key)


# ----------------------------------------------------------------------------- the document loop


def test_the_documented_training_loop(data: dict[str, Data]) -> None:
    model, optimizer, dnm = setup(data, {
        "morphogenesis_interval": 2,
        "max_morphogenesis_per_epoch": 1,
        "performance_improvement_threshold": 0.01,
        "trigger_on_bottleneck": True,
    })
    start = count(model)
    all_results = []
    for epoch in range(4):
        train_loss, train_acc = train_epoch(model, optimizer, data["train"], epoch)
        val_loss, val_acc = validate_epoch(model, data["val"])

        dnm.update_caches()
        dnm.record_performance(val_acc)
        should_trigger, reasons = dnm.should_trigger_morphogenesis(
            epoch + 1,
            {"accuracy": train_acc, "loss": train_loss},
            {"accuracy": val_acc, "loss": val_loss},
        )
        assert reasons and all(isinstance(r, str) for r in reasons)
        if should_trigger:
            before = count(model)
            results = dnm.execute_morphogenesis(epoch + 1)
            assert results.keys() >= DOCUMENTED_KEYS
            assert results["parameters_added"] == count(dnm.model) - before  # measured
            changes = results["neuron_divisions"] + results["connections_added"] + \
                results["layers_added"]
            assert changes == len(results["events"]) <= 1
            all_results.append(results)
            if results["neuron_divisions"] > 0:
                model = dnm.model
    assert model is dnm.model  # edited in place: the reference stays valid
    assert all_results, "eager triggering must fire at epoch 2 or 4"
    grown = sum(r["parameters_added"] for r in all_results)
    assert grown > 0 and count(model) == start + grown
    assert len(get_history(model)) == sum(len(r["events"]) for r in all_results)
    # the optimizer trains every parameter, the new ones included
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters()}
    x, _ = data["val"]
    assert model(x).shape == (len(x), 10)


def test_results_report_each_event(data: dict[str, Data]) -> None:
    model, opt, dnm = setup(data, {**EAGER, "max_morphogenesis_per_epoch": 2})
    train_epoch(model, opt, data["train"], 0)
    dnm.update_caches()
    dnm.record_performance(0.5)
    results = dnm.execute_morphogenesis(1)
    assert len(results["events"]) == 2
    kinds = [e["kind"] for e in results["events"]]
    assert results["neuron_divisions"] == kinds.count("neuron_division")
    assert results["layers_added"] == kinds.count("layer_addition")
    assert results["connections_added"] == kinds.count("connection_growth")
    assert results["parameters_added"] == sum(e["params_after"] - e["params_before"]
                                              for e in results["events"])
    for e in results["events"]:
        assert e.keys() == EVENT_FIELDS and e["epoch"] == 1 and e["metric_before"] == 0.5
        assert e["reasons"] and any("score" in r for r in e["reasons"])  # measured evidence


# ----------------------------------------------------------------------------- errors


def test_without_optimizer_nothing_changes(data: dict[str, Data]) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    dnm = DNMFramework(model, EAGER, probe=probe_batches(data))
    dnm.update_caches()
    dnm.record_performance(0.5)
    assert dnm.should_trigger_morphogenesis(1)[0]
    snap = snapshot_model(model)
    with pytest.raises(ConfigError, match=r"needs the optimizer that trains the model.*pass "
                                          r"DNMFramework\(model, config, optimizer=optimizer\)"):
        dnm.execute_morphogenesis(1)
    assert_model_unchanged(model, snap)
    assert get_history(model) == [] and dnm.events.events == []
    # the fix the message gives works
    dnm.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert dnm.execute_morphogenesis(1)["parameters_added"] > 0


def test_update_caches_before_any_training_step_says_what_to_do() -> None:
    dnm = DNMFramework(DigitsCNN(width=4))
    with pytest.raises(ConfigError, match=r"no recorded training batch: call it after training "
                                          r"steps .*or give DNMFramework a probe="):
        dnm.update_caches()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"model must be an nn\.Module, got dict"):
        DNMFramework({})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"probe must be an .* got int"):
        DNMFramework(DigitsCNN(width=4), probe=3)
    with pytest.raises(ConfigError, match="record_performance got NaN"):
        DNMFramework(DigitsCNN(width=4)).record_performance(float("nan"))


def own_hooks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: list[str]
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Activations and output gradients captured by the caller's own hooks."""
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def fn(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            acts[name] = out.detach()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return fn

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return acts, grads


def test_update_caches_from_the_callers_tensors(data: dict[str, Data]) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_epoch(model, opt, data["train"], 0)
    x, y = data["probe"]
    layers = ["features.0", "features.3", "classifier.0"]
    acts, grads = own_hooks(model, x, y, layers)
    dnm = DNMFramework(model, EAGER, optimizer=opt, example_inputs=x[:8])
    report = dnm.update_caches(activations=acts, gradients=grads, targets=y)
    assert {r.name for r in report.layers} == set(layers)
    assert report.order == layers
    for r in report.layers:
        assert r.units == acts[r.name].shape[1]
        assert r.metrics["gradient_variance"] > 0  # from the given gradients
        assert "information" in r.metrics  # from the given targets
    dnm.record_performance(0.5)
    go, reasons = dnm.should_trigger_morphogenesis(1)
    assert go and any(r.startswith(f"bottleneck: '{n}': ") for n in layers for r in reasons)
    before = count(model)
    results = dnm.execute_morphogenesis(1)
    assert results["parameters_added"] == count(model) - before > 0
    assert results["events"][0]["layer"] in {*layers, *(f"{a}->{b}" for a in layers
                                                        for b in layers)}
    with pytest.raises(ConfigError, match=r"names layer 'features\.9', which is not an "
                                          r"analysed layer; use names from dnm\.layers"):
        dnm.update_caches(activations={"features.9": acts["features.0"]}, targets=y)


# ----------------------------------------------------------------------------- rollback


def change_then_validate(data: dict[str, Data], config: dict[str, Any], metric_after: float,
                         epochs_between: int = 1) -> dict[str, Any]:
    """Record 0.9, change the architecture, train, then record ``metric_after``."""
    model, opt, dnm = setup(data, {**EAGER, **config})
    train_epoch(model, opt, data["train"], 0)
    dnm.update_caches()
    dnm.record_performance(0.9)
    assert dnm.should_trigger_morphogenesis(1)[0]
    snap, opt_state = snapshot_model(model), optimizer_by_name(model, opt)
    history = get_history(model)
    results = dnm.execute_morphogenesis(1)
    assert results["parameters_added"] > 0
    for epoch in range(epochs_between):
        train_epoch(model, opt, data["train"], 1 + epoch)
        dnm.record_performance(0.9 if epoch < epochs_between - 1 else metric_after)
    return {"model": model, "opt": opt, "dnm": dnm, "snap": snap, "opt_state": opt_state,
            "history": history, "results": results}


def test_rollback_restores_model_and_optimizer_bit_exactly(data: dict[str, Data]) -> None:
    run = change_then_validate(data, {"performance_drop_threshold": 0.05}, metric_after=0.5)
    model, opt, dnm = run["model"], run["opt"], run["dnm"]
    assert model is dnm.model
    # parameters, buffers, structure and modes as before the change (new Parameter objects)
    assert_model_unchanged(model, {**run["snap"], "params": dict(model.named_parameters())})
    assert get_history(model) == run["history"]
    assert_same_optimizer(optimizer_by_name(model, opt), run["opt_state"])
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters()}
    kinds = [e.kind for e in dnm.events.events]
    assert kinds[-1] == "rollback" and len(kinds) == 2
    assert kinds[0] == "neuron_division" and dnm.division.pending == []  # no separation left
    rollback = dnm.events.events[-1]
    assert rollback.metric_before == 0.9 and rollback.metric_after == 0.5
    assert rollback.params_before == run["results"]["parameters_after"]
    assert rollback.params_after == run["results"]["parameters_before"] == count(model)
    assert "validation fell by 0.4000 > performance_drop_threshold=0.05" in rollback.reasons[0]
    # the restored model trains on with the restored optimizer
    train_epoch(model, opt, data["train"], 5)
    assert not torch.equal(model.features[0].weight, run["snap"]["state"]["features.0.weight"])


@pytest.mark.parametrize(("config", "metric_after", "epochs_between"), [
    ({"performance_drop_threshold": 0.05}, 0.86, 1),  # a drop of 0.04 is tolerated
    ({"rollback_enabled": False}, 0.5, 1),
    ({"evaluation_window": 1}, 0.5, 2),  # the drop comes after the evaluation window
])
def test_no_rollback(data: dict[str, Data], config: dict[str, Any], metric_after: float,
                     epochs_between: int) -> None:
    run = change_then_validate(data, config, metric_after, epochs_between)
    assert count(run["model"]) == run["results"]["parameters_after"]
    assert [e.kind for e in run["dnm"].events.events] == \
        [e["kind"] for e in run["results"]["events"]]


# ----------------------------------------------------------------------------- events


def test_events_json_lines(data: dict[str, Data], tmp_path: Any) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    model, opt, dnm = setup(data, {**EAGER, "max_morphogenesis_per_epoch": 2},
                            events_path=str(path))
    train_epoch(model, opt, data["train"], 0)
    dnm.update_caches()
    dnm.record_performance(0.81)
    results = dnm.execute_morphogenesis(1)
    lines = path.read_text().splitlines()
    assert len(lines) == len(results["events"]) == 2
    for line, event in zip(lines, results["events"], strict=True):
        record = json.loads(line)
        assert isinstance(record, dict) and record.keys() == EVENT_FIELDS
        assert record == event
        assert record["kind"] in EVENT_KINDS and record["epoch"] == 1
        assert record["metric_before"] == 0.81 and record["metric_after"] is None
        assert record["params_after"] > record["params_before"]
        assert record["reasons"] and all(isinstance(r, str) for r in record["reasons"])
    train_epoch(model, opt, data["train"], 1)
    dnm.record_performance(0.83)  # filled at the next record_performance
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 and all(r["metric_after"] == 0.83 for r in records)
    assert all(e.metric_after == 0.83 for e in dnm.events.events)
    dnm.record_performance(0.84)  # ... and only then
    assert all(json.loads(line)["metric_after"] == 0.83
               for line in path.read_text().splitlines())


def test_rollback_is_logged(data: dict[str, Data], tmp_path: Any) -> None:
    path = tmp_path / "events.jsonl"
    model, opt, dnm = setup(data, EAGER, events_path=str(path))
    train_epoch(model, opt, data["train"], 0)
    dnm.update_caches()
    dnm.record_performance(0.9)
    dnm.execute_morphogenesis(1)
    dnm.record_performance(0.2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in records][-1] == "rollback" and len(records) == 2
    assert records[-1].keys() == EVENT_FIELDS
    assert records[0]["metric_after"] == 0.2


# ----------------------------------------------------------------------------- budgets


def test_max_architecture_changes_is_respected(data: dict[str, Data]) -> None:
    model, opt, dnm = setup(data, {**EAGER, "max_architecture_changes": 3,
                                   "max_morphogenesis_per_epoch": 2, "evaluation_window": 1,
                                   "rollback_enabled": False})
    made, refused = [], []
    for epoch in range(1, 6):
        if epoch > 1:
            train_epoch(model, opt, data["train"], epoch)
        dnm.update_caches()
        dnm.record_performance(0.5)
        go, reasons = dnm.should_trigger_morphogenesis(epoch)
        if go:
            made.append(len(dnm.execute_morphogenesis(epoch)["events"]))
        else:
            refused.append(reasons[0])
    assert made == [2, 1]  # the second call gets only what is left of the budget
    assert dnm.trigger.changes == 3 == len(get_history(model)) == len(dnm.events.events)
    assert "budget spent: 3 of 3 architecture changes made" in refused
    # executing anyway changes nothing once the budget is spent
    params = count(model)
    assert dnm.execute_morphogenesis(6)["events"] == [] and count(model) == params


def test_max_parameters_is_respected(data: dict[str, Data]) -> None:
    torch.manual_seed(0)
    limit = count(DigitsCNN(width=4))  # already reached: no change is allowed
    model, _, dnm = setup(data, {**EAGER, "max_parameters": limit})
    dnm.update_caches()
    dnm.record_performance(0.5)
    results = dnm.execute_morphogenesis(1)
    assert results["events"] == [] and count(model) == limit


def test_a_change_that_would_exceed_max_parameters_is_refused(data: dict[str, Data]) -> None:
    # DNMConfig documents max_parameters as "refuse changes that would exceed this count"
    torch.manual_seed(0)
    limit = count(DigitsCNN(width=4)) + 1
    model, _, dnm = setup(data, {**EAGER, "max_parameters": limit})
    dnm.update_caches()
    dnm.record_performance(0.5)
    dnm.execute_morphogenesis(1)
    assert count(model) <= limit


# ----------------------------------------------------------------------------- DNMNet2Net

VGG = ZOO["vgg"]


@pytest.mark.parametrize(("edit", "args"), [
    ("split", ("features.0", [1, 3, 3])),
    ("split", ("classifier.0", [0])),
    ("deeper", ("features.4",)),
    ("deeper", ("classifier.0",)),
    ("connect", ("features.0", "features.4")),
    ("connect", ("classifier.0", "classifier.2")),
])
def test_net2net_preserves_outputs(edit: str, args: tuple[Any, ...]) -> None:
    torch.manual_seed(0)
    model = VGG.build().eval()
    x = VGG.inputs(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(*x), VGG.target(16)).backward()
    opt.step()
    with torch.no_grad():
        before = model(*x)
    params = count(model)
    record = getattr(DNMNet2Net, edit)(model, *args, example_inputs=x, optimizer=opt)
    assert_same_function(before, model, x)
    assert count(model) == record.params_after > params == record.params_before
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters()}


def test_net2net_split_of_the_output_layer_is_refused() -> None:
    torch.manual_seed(0)
    model = VGG.build().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap, opt_snap = snapshot_model(model), snapshot_optimizer(opt)
    with pytest.raises(SurgeryError, match="model's output"):
        DNMNet2Net.split(model, "classifier.2", [0], example_inputs=VGG.inputs(2), optimizer=opt)
    assert_model_unchanged(model, snap)
    assert_optimizer_unchanged(opt, opt_snap)


def test_events_of_an_earlier_run_in_the_same_file_are_kept(data: dict[str, Data],
                                                            tmp_path: Any) -> None:
    path = tmp_path / "events.jsonl"
    earlier = json.dumps({"epoch": 3, "kind": "neuron_division", "layer": "x"})
    path.write_text(earlier)  # no final newline
    _, _, dnm = setup(data, EAGER, events_path=str(path))
    dnm.update_caches()
    dnm.record_performance(0.5)
    dnm.execute_morphogenesis(1)
    dnm.record_performance(0.52)  # rewrites the file to fill metric_after
    lines = path.read_text().splitlines()
    assert lines[0] == earlier and len(lines) == 2
    assert json.loads(lines[1])["metric_after"] == 0.52


def test_update_caches_works_with_inplace_activations() -> None:
    """Ablation hands the next layer a tensor it may modify in place (nn.ReLU(inplace=True))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    dnm = DNMFramework(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       probe=(x, y))
    report = dnm.update_caches()
    assert report["0"].metrics["performance_sensitivity"] >= 0.0


def test_a_model_called_with_keyword_inputs_is_recorded_and_grown(data: dict[str, Data]) -> None:
    """``model(**batch)`` (as transformers' Trainer calls models) returning a dict-like output
    with the loss first: the recorder replays the inputs in the forward's order and reads
    the logits."""

    class KeywordNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = DigitsCNN(width=4)

        def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
            logits = self.net(pixels)
            out = {"logits": logits}
            if labels is not None:
                out = {"loss": F.cross_entropy(logits, labels), **out}
            return out

    torch.manual_seed(0)
    model = KeywordNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dnm = DNMFramework(model, {**EAGER, "record_every": 1}, optimizer=opt)
    x, y = data["train"]
    for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).split(64):
        opt.zero_grad()
        model(pixels=x[idx], labels=y[idx])["loss"].backward()
        opt.step()
    assert dnm.recorder.recorded > 0 and dnm.recorder.example_inputs[0].shape[1:] == (1, 8, 8)
    dnm.update_caches()
    dnm.record_performance(0.5)
    assert dnm.execute_morphogenesis(1)["parameters_added"] > 0
