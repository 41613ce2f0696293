"""The second design document's quick start and advanced usage, as one user script.

The snippets are copied verbatim; only the model (``your_pytorch_model``), the loaders, the body
of ``custom_importance`` and the number of epochs are filled in. Each effect the document
promises is checked: training, per-epoch logging, the custom metric called and used, pruning
that removes parameters, expansion that adds them with the function kept, and an optimizer
that follows every edit so that a second ``fit`` trains what was added.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError
from neuroexapt.train.digits import DigitsCNN, load_digits

DEAD = [0, 1, 2, 3]  # hidden units of classifier.0 that the user's model has lost


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    return load_digits(0)


def loaders(digits: tuple[torch.Tensor, ...]) -> tuple[list, list]:
    x_tr, y_tr, x_te, y_te = digits
    train = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, 768, 64)]
    val = [(x_te[i : i + 128], y_te[i : i + 128]) for i in range(0, len(y_te), 128)]
    return train, val


def user_model() -> nn.Module:
    """A digits CNN with four dead hidden units (zero fan-in, bias and fan-out): they output 0
    whatever the input, and no gradient ever reaches them."""
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    with torch.no_grad():
        model.classifier[0].weight[DEAD] = 0.0
        model.classifier[0].bias[DEAD] = 0.0
        model.classifier[2].weight[:, DEAD] = 0.0
    return model


def trainable(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return held == {id(p) for p in model.parameters()}


def test_the_documents_script_runs_and_does_what_it_says(digits: tuple, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train_loader, val_loader = loaders(digits)
    your_pytorch_model = user_model()
    calls: list[tuple[int, ...]] = []

    # ---- the document's quick start, verbatim
    import neuroexapt

    # Initialize Neuro Exapt
    ne = neuroexapt.NeuroExapt(
        task_type="classification",
        depth=18,
        entropy_weight=0.5
    )

    # Load your model
    model = ne.wrap_model(your_pytorch_model)

    # Train with dynamic architecture optimization
    trainer = neuroexapt.Trainer(
        model=model,
        info_weight=0.1,
        entropy_threshold=0.3
    )

    # ---- advanced usage, verbatim
    # Define custom layer importance metric
    def custom_importance(layer_output, target_output):
        # Your implementation
        calls.append(tuple(layer_output.shape))
        importance_score = float(layer_output.var(0).mean())
        return importance_score

    ne.set_importance_metric(custom_importance)

    # Enable comprehensive monitoring
    metrics = ne.monitor(
        metrics=["entropy", "mi_gain", "struct_complexity"],
        log_dir="./logs"
    )

    trainer.fit(train_loader, val_loader, epochs=3)

    # training happened, and the monitor logged every epoch
    assert trainer.history["val_metric"][-1] > 0.8
    assert all(len(metrics[k]) == 3 for k in ("entropy", "mi_gain", "struct_complexity"))
    rows = [json.loads(x) for x in (tmp_path / "logs" / "history.jsonl").read_text()
            .splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").rglob("*"))
    # the custom metric was called on every measured layer and is the layers' importance
    assert len(calls) >= 3 * 4
    assert all("importance" in x.metrics for x in ne.report.layers)
    layer = ne.report["classifier.0"]
    assert ne.layer_values("classifier.0")["importance"] == layer.metrics["importance"]

    # ---- dynamic pruning strategy, verbatim
    before = ne.parameters_count()
    hidden = model.classifier[0].out_features
    dead = int((ne.layer_values("classifier.0")["entropy"] < 0.2).sum())
    assert dead >= len(DEAD)  # the dead units have entropy 0

    # Prune layers with low information content
    ne.prune_layers(criteria="entropy<0.2")
    assert model.classifier[0].out_features == hidden - dead
    assert ne.parameters_count() < before
    assert trainable(model, trainer.optimizer)

    x = val_loader[0][0]
    model.eval()
    with torch.no_grad():
        reference = model(x)
    grown_from = ne.parameters_count()

    # Expand network with mutation
    ne.expand_layers(method="mutate", num_layers=2)
    assert ne.parameters_count() > grown_from
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-4)
    # the Trainer's optimizer holds exactly the edited model's parameters ...
    assert ne.model is model and trainer.model is model
    assert trainable(model, trainer.optimizer)
    # ... so a second fit trains what the expansion added
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit(train_loader, val_loader, epochs=1)
    changed = [n for n, p in model.named_parameters() if n in new and p.shape == new[n].shape
               and not torch.equal(p, new[n])]
    assert len(changed) == len(new)


def test_measure_after_fit_needs_no_data(digits: tuple) -> None:
    train_loader, val_loader = loaders(digits)
    ne = neuroexapt.NeuroExapt()
    model = ne.wrap_model(user_model())
    neuroexapt.Trainer(model, progress=False).fit(train_loader, val_loader, epochs=1)
    report = ne.measure()
    assert report.order == ["features.0", "features.3", "classifier.0", "classifier.2"]
    assert report.batches == len(val_loader) == 3  # the validation batches, up to 4


def layer_pruned(digits: tuple, important: int) -> dict[str, int]:
    """Units each layer lost in one evolution step whose threshold selects every unit, with
    a custom metric that calls the layers with ``important`` units the most important."""
    train_loader, val_loader = loaders(digits)
    ne = neuroexapt.NeuroExapt()
    model = ne.wrap_model(user_model())
    ne.set_importance_metric(lambda out, _: float(out.shape[1] == important))
    sizes = {"features.0": 8, "features.3": 16, "classifier.0": 32}
    # 5 nats is above every gate's information (4.5 at the start): every unit is a candidate
    trainer = neuroexapt.Trainer(model, entropy_threshold=5.0, max_prune_fraction=0.25,
                                 progress=False)
    trainer.fit(train_loader[:2], val_loader, epochs=2)
    modules = dict(model.named_modules())
    now = {n: getattr(modules[n], "out_channels", getattr(modules[n], "out_features", 0))
           for n in sizes}
    return {n: sizes[n] - now[n] for n in sizes}


def test_custom_importance_weighs_the_trainers_pruning(digits: tuple) -> None:
    """Two levels of importance: the important layer's threshold is multiplied by 0 and the
    others' by 2, so only the others lose units (a quarter of them, the cap)."""
    assert layer_pruned(digits, important=16) == {"features.0": 2, "features.3": 0,
                                                  "classifier.0": 8}
    assert layer_pruned(digits, important=8) == {"features.0": 0, "features.3": 4,
                                                 "classifier.0": 8}


def test_equal_importances_change_nothing(digits: tuple) -> None:
    """Every layer equally important: every threshold keeps its factor 1 (a quarter of each
    layer goes, as without a metric)."""
    train_loader, val_loader = loaders(digits)
    ne = neuroexapt.NeuroExapt()
    model = ne.wrap_model(user_model())
    ne.set_importance_metric(lambda out, _: 1.0)
    trainer = neuroexapt.Trainer(model, entropy_threshold=5.0, max_prune_fraction=0.25,
                                 progress=False)
    trainer.fit(train_loader[:2], val_loader, epochs=2)
    assert (model.features[0].out_channels, model.features[3].out_channels,
            model.classifier[0].out_features) == (6, 12, 24)


def test_per_unit_importance_selects_units(digits: tuple) -> None:
    train_loader, val_loader = loaders(digits)
    ne = neuroexapt.NeuroExapt()
    model = ne.wrap_model(user_model())
    neuroexapt.Trainer(model, progress=False).fit(train_loader, val_loader, epochs=1)
    ne.set_importance_metric(lambda out, _: torch.arange(out.shape[1], dtype=torch.float32))
    ne.measure()
    assert ne.report["classifier.0"].unit_importance == [float(i) for i in range(32)]
    ne.prune_layers("importance < 3")  # units 0, 1, 2 of every hidden layer
    assert model.classifier[0].out_features == 29 and model.features[0].out_channels == 5


@pytest.mark.parametrize(("metric", "match"), [
    (lambda out, _: 1 / 0, r"importance metric <lambda> raised on layer 'features.0' "
                           r"\(layer_output \(\d+, 8\).*ZeroDivisionError"),
    (lambda out, _: float("nan"), "non-finite value on layer 'features.0': nan"),
    (lambda out, _: torch.ones(3), r"tensor of shape \(3,\) on layer 'features.0'; return "
                                   r"a scalar .* or a \[8\] tensor"),
    (lambda out, _: "high", "returned 'high' on layer 'features.0'"),
])
def test_a_bad_custom_metric_is_named(digits: tuple, metric: object, match: str) -> None:
    _, val_loader = loaders(digits)
    ne = neuroexapt.NeuroExapt()
    ne.wrap_model(user_model())
    ne.set_importance_metric(metric)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        ne.measure(val_loader)


def test_edits_through_the_facade_migrate_the_users_optimizer(digits: tuple) -> None:
    train_loader, val_loader = loaders(digits)
    ne = neuroexapt.NeuroExapt()
    model = ne.wrap_model(user_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in train_loader[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ne.measure(val_loader)
    ne.expand_layers(num_layers=1)  # no optimizer= : the one that stepped the model is found
    assert trainable(model, opt)
    other = torch.optim.Adam(model.parameters())
    other.zero_grad()
    nn.functional.cross_entropy(model(val_loader[0][0]), val_loader[0][1]).backward()
    other.step()
    count = ne.parameters_count()
    with pytest.raises(ConfigError, match=r"ne.expand_layers: 2 optimizers \(SGD, Adam\).*"
                                          r"pass optimizer= to ne.expand_layers"):
        ne.expand_layers(num_layers=1)
    assert ne.parameters_count() == count


def test_criteria_over_label_information_are_refused_for_regression() -> None:
    ne = neuroexapt.NeuroExapt(task_type="regression")
    ne.wrap_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    for criteria in ("mi < 0.1", "redundancy > 0.5", "entropy < 0.2 or information_lost > 0"):
        with pytest.raises(ConfigError, match="estimated from class labels only; "
                                              "task_type='regression'"):
            ne.prune_layers(criteria)
    with pytest.raises(ConfigError, match=r"nothing measured yet.*neuroexapt\.Trainer"):
        ne.prune_layers("entropy < 0.2")
    with pytest.raises(ConfigError, match="nothing measured yet"):
        ne.measure()
