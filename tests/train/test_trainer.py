"""Trainer: the second design document's training loop with pruning by the bottleneck gates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.errors import AnalysisError, ConfigError
from neuroexapt.train.digits import DigitsCNN, accuracy, load_digits


@pytest.fixture(scope="module")
def data() -> dict[str, list]:
    x_tr, y_tr, x_te, y_te = load_digits(0)
    return {
        "train": [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, len(y_tr), 64)],
        "val": [(x_te[i : i + 128], y_te[i : i + 128]) for i in range(0, len(y_te), 128)],
        "test": [x_te, y_te],
    }


def fit(data: dict[str, list], epochs: int = 10, **kwargs: object
        ) -> tuple[nn.Module, dict[str, list[float]], neuroexapt.Trainer]:
    torch.manual_seed(0)
    ne = neuroexapt.NeuroExapt(task_type="classification", depth=4, entropy_weight=0.5)
    model = ne.wrap_model(DigitsCNN(width=16))
    options = {"info_weight": 0.1, "entropy_threshold": 0.3, "lr": 3e-3, "progress": False}
    options.update(kwargs)
    trainer = neuroexapt.Trainer(model=model, **options)  # type: ignore[arg-type]
    return model, trainer.fit(data["train"], data["val"], epochs=epochs), trainer


def test_fit_prunes_for_real_and_keeps_accuracy(data: dict[str, list], tmp_path: Path) -> None:
    model, history, _ = fit(data, checkpoint_dir=str(tmp_path))
    start = sum(p.numel() for p in DigitsCNN(width=16).parameters())
    assert len(history["val_metric"]) == 10
    assert history["parameters"][-1] < 0.9 * start  # smaller tensors, not masks
    assert sum(history["pruned_units"]) > 0
    assert sum(p.numel() for p in model.parameters()) == history["parameters"][-1]
    assert accuracy(model, *data["test"]) >= 0.93
    # fit folds the gates in: no hooks are left and the model is plain
    assert all(not m._forward_hooks for m in model.modules())
    # the best checkpoint replays its edits on a fresh model and loads
    loaded, _ = neuroexapt.load(tmp_path / "best.pt", lambda: DigitsCNN(width=16))
    assert accuracy(loaded, *data["test"]) >= 0.9


def test_threshold_ramps_and_follows_feedback(data: dict[str, list]) -> None:
    _, history, trainer = fit(data, epochs=4)
    assert history["threshold"][0] < history["threshold"][1] <= 0.3
    trainer.feedback = 0.5
    assert trainer.threshold(4, 4) == pytest.approx(0.15)


def test_a_drop_after_a_change_is_rolled_back(data: dict[str, list],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = neuroexapt.Trainer._validate
    calls = {"n": 0}

    def dropping(self: neuroexapt.Trainer, val: list) -> tuple[float, float]:
        loss, metric = real(self, val)
        calls["n"] += 1
        return loss, (0.0 if calls["n"] == 5 else metric)  # the epoch after the first change

    monkeypatch.setattr(neuroexapt.Trainer, "_validate", dropping)
    _, history, trainer = fit(data, epochs=6)
    assert history["pruned_units"][3] > 0  # the change at epoch 4
    assert trainer.feedback < 1.0  # halved by the rollback, not yet recovered
    assert history["parameters"][4] == history["parameters"][2]  # restored at epoch 5


@pytest.mark.parametrize("kwargs, match", [
    ({"info_weight": -1.0}, "info_weight must be a number >= 0"),
    ({"entropy_threshold": float("nan")}, "entropy_threshold"),
    ({"evolve_every": 0}, "evolve_every"),
    ({"max_prune_fraction": 0.0}, "max_prune_fraction"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        neuroexapt.Trainer(DigitsCNN(), **kwargs)


def test_empty_loaders_and_nan_losses_fail_clearly(data: dict[str, list]) -> None:
    trainer = neuroexapt.Trainer(DigitsCNN(), progress=False)
    with pytest.raises(AnalysisError, match="val_loader yielded no batch"):
        trainer.fit(data["train"], [], epochs=1)
    with pytest.raises(AnalysisError, match="train_loader yielded no batch"):
        trainer.fit([], data["val"], epochs=1)
    bad = [(torch.full((8, 1, 8, 8), float("nan")), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(AnalysisError, match="NaN or infinite"):
        neuroexapt.Trainer(DigitsCNN(), progress=False).fit(bad, data["val"], epochs=1)
    with pytest.raises(ConfigError, match="epochs"):
        trainer.fit(data["train"], data["val"], epochs=0)


def test_fit_defers_the_closing_analysis_until_a_report_is_needed(
        data: dict[str, list], monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroexapt.train import facade

    calls: list[int] = []
    real = facade.analyze

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(facade, "analyze", counted)
    model, _, trainer = fit(data, epochs=1)
    assert calls == []  # nothing measured: no monitor, no importance metric
    report = trainer.ne.report  # the first read measures the trained model
    assert calls == [1] and report is not None
    assert set(report.order) <= {n for n, _ in model.named_modules()}
    assert trainer.ne.report is report and calls == [1]  # once
    assert trainer.ne.prune_layers("entropy<0.0") == [] and calls == [1]


def test_an_error_in_the_middle_of_a_structural_step_restores_everything(
        data: dict[str, list], monkeypatch: pytest.MonkeyPatch) -> None:
    import neuroexapt.train.trainer as trainer_module

    real = trainer_module.narrow
    seen: dict[str, object] = {}

    def narrow_then_fail(model: nn.Module, *args: object, **kwargs: object) -> object:
        seen["shapes"] = {n: p.shape for n, p in model.named_parameters()}
        seen["history"] = len(neuroexapt.get_history(model))
        real(model, *args, **kwargs)  # type: ignore[arg-type]
        raise RuntimeError("a raw error after a real edit")

    monkeypatch.setattr(trainer_module, "narrow", narrow_then_fail)
    torch.manual_seed(0)
    ne = neuroexapt.NeuroExapt(task_type="classification", depth=4, entropy_weight=0.5)
    model = ne.wrap_model(DigitsCNN(width=16))
    trainer = neuroexapt.Trainer(model=model, info_weight=0.1, entropy_threshold=0.3, lr=3e-3,
                                 progress=False)
    with pytest.raises(RuntimeError, match="raw error"):
        trainer.fit(data["train"], data["val"], epochs=10)
    assert "shapes" in seen, "the step never pruned: the test tests nothing"
    assert {n: p.shape for n, p in model.named_parameters()} == seen["shapes"]
    assert len(neuroexapt.get_history(model)) == seen["history"]
    params = {id(p) for p in model.parameters()}
    assert params <= {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    model(data["test"][0][:4])  # the model runs, with the gates of the restored model
