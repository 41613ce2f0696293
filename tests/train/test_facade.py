"""NeuroExapt: the second design document's facade over analysis, criteria and edits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError
from neuroexapt.train.digits import DigitsCNN, accuracy, load_digits, train_epochs


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    return load_digits(0)


def trained(digits: tuple[torch.Tensor, ...], width: int = 16
            ) -> tuple[neuroexapt.NeuroExapt, nn.Module, torch.optim.Optimizer, list]:
    x_tr, y_tr, _, _ = digits
    torch.manual_seed(0)
    ne = neuroexapt.NeuroExapt(task_type="classification", depth=4, entropy_weight=0.5)
    model = ne.wrap_model(DigitsCNN(width=width))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_epochs(model, opt, x_tr, y_tr, 3, 0)
    probe = [(x_tr[i : i + 128], y_tr[i : i + 128]) for i in range(0, 384, 128)]
    return ne, model, opt, probe


def test_wrap_model_returns_the_model_itself() -> None:
    ne = neuroexapt.NeuroExapt()
    model = DigitsCNN()
    assert ne.wrap_model(model) is model
    assert ne.depth == 4  # two convolutions and two Linear layers


@pytest.mark.parametrize("kwargs, match", [
    ({"task_type": "ranking"}, "unknown task_type 'ranking'; valid task types: classification"),
    ({"depth": 0}, "depth must be a positive int"),
    ({"entropy_weight": -1.0}, "entropy_weight must be a number >= 0"),
])
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        neuroexapt.NeuroExapt(**kwargs)


def test_nothing_measured_yet_is_a_clear_error() -> None:
    ne = neuroexapt.NeuroExapt()
    with pytest.raises(ConfigError, match="wrap_model"):
        ne.measure([])
    ne.wrap_model(DigitsCNN())
    with pytest.raises(ConfigError, match="nothing measured yet"):
        ne.prune_layers("entropy<0.2")


def test_monitor_records_every_measurement(digits: tuple, tmp_path: Path) -> None:
    ne, _, _, probe = trained(digits)
    history = ne.monitor(metrics=["entropy", "mi_gain", "struct_complexity"],
                         log_dir=str(tmp_path))
    ne.measure(probe)
    ne.measure(probe)
    assert all(len(v) == 2 for v in history.values())
    assert history["entropy"][0] > 0
    assert history["struct_complexity"][1] < history["struct_complexity"][0]  # -alpha*sum(I)
    rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    with pytest.raises(ConfigError, match="unknown monitor metric 'loss'"):
        ne.monitor(metrics=["loss"])


def test_custom_importance_metric_is_used(digits: tuple) -> None:
    ne, _, _, probe = trained(digits)
    calls = []

    def importance(layer_output: torch.Tensor, target_output: torch.Tensor) -> float:
        calls.append(layer_output.shape)
        return float(layer_output.var())

    ne.set_importance_metric(importance)
    report = ne.measure(probe)
    assert calls and all(x.metrics["importance"] >= 0 for x in report.layers)
    with pytest.raises(ConfigError, match="callable"):
        ne.set_importance_metric("not a function")  # type: ignore[arg-type]


def test_prune_layers_removes_selected_units_for_real(digits: tuple) -> None:
    ne, model, opt, probe = trained(digits)
    _, _, x_te, y_te = digits
    ne.measure(probe)
    before, acc = ne.parameters_count(), accuracy(model, x_te, y_te)
    values = ne.layer_values("classifier.0")
    expected = int((values["importance"] < 0.05).sum())
    records = ne.prune_layers("importance<0.05", optimizer=opt)
    assert expected > 0 and any(r.target == "classifier.0" for r in records)
    assert model.classifier[0].out_features == 32 - expected
    assert ne.parameters_count() < before
    assert accuracy(model, x_te, y_te) >= acc - 0.02  # units that mattered little
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters()}


def test_prune_keeps_a_unit_and_never_touches_the_output(digits: tuple) -> None:
    ne, model, _, probe = trained(digits)
    ne.measure(probe)
    ne.prune_layers("entropy >= 0")  # selects everything
    assert model.classifier[2].out_features == 10
    assert model.features[0].out_channels == 1 and model.classifier[0].out_features == 1


def test_expand_layers_grows_and_preserves_outputs(digits: tuple) -> None:
    ne, model, opt, probe = trained(digits)
    ne.measure(probe)
    x = probe[0][0]
    model.eval()
    with torch.no_grad():
        reference = model(x)
    records = ne.expand_layers(method="mutate", num_layers=2, optimizer=opt)
    assert len(records) == 2 and all(r.params_after > r.params_before for r in records)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="unknown method 'grow'"):
        ne.expand_layers(method="grow")
    with pytest.raises(ConfigError, match="num_layers"):
        ne.expand_layers(num_layers=0)


def test_bad_criteria_point_at_the_position(digits: tuple) -> None:
    ne, _, _, probe = trained(digits)
    ne.measure(probe)
    with pytest.raises(ConfigError, match="unknown metric 'entropi'"):
        ne.prune_layers("entropi<0.2")


def test_a_raw_error_in_a_later_layer_restores_every_layer(
        digits: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuroexapt.train.facade as facade

    ne, model, opt, probe = trained(digits)
    ne.measure(probe)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    real, calls = facade.narrow, []

    def second_fails(*args: object, **kwargs: object) -> object:
        calls.append(args[1])
        if len(calls) == 2:
            raise RuntimeError("the model failed")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(facade, "narrow", second_fails)
    with pytest.raises(RuntimeError, match="the model failed"):
        ne.prune_layers("entropy >= 0", optimizer=opt)  # selects units in every layer
    assert len(calls) == 2, "the first layer was never pruned: the test tests nothing"
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in state.items()}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert neuroexapt.get_history(model) == []
    assert [id(p) for g in opt.param_groups for p in g["params"]] == opt_ids


def test_criteria_that_select_nothing_say_what_was_measured(
        digits: tuple, caplog: pytest.LogCaptureFixture) -> None:
    ne, _, _, probe = trained(digits)
    ne.measure(probe)
    before = ne.parameters_count()
    with caplog.at_level("WARNING", logger="neuroexapt.train.facade"):
        assert ne.prune_layers("entropy<-1") == []
    assert ne.parameters_count() == before
    assert "removed nothing" in caplog.text and "entropy from" in caplog.text
