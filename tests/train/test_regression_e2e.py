"""Regression end to end: ``NeuroExapt(task_type="regression")`` with the Trainer and the facade.

The problem: 6 inputs ``x ~ N(0, I)``, of which 3 matter,
``y = sin(2 x0) + 0.5 x1**2 - x0 x2 + 0.1 noise`` (variance about 2.1, noise floor 0.01), and an
MLP 6 - 64 - 64 - 64 - 1 with ReLUs, far wider than needed. Measured numbers (seeded, torch CPU)
are written next to the assertions they set.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError

WIDTH = 64
HIDDEN = ("0", "2", "4")  # the hidden Linear layers; "6" is the output


def _problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] ** 2 - x[:, :1] * x[:, 2:3]
    return x, y + 0.1 * torch.randn(n, 1, generator=g)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 1))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _r2(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = model.eval()(x)
    return 1.0 - float(F.mse_loss(pred, y) / y.var())


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": _problem(2048, 0), "val": _problem(512, 1), "test": _problem(1000, 2)}


@pytest.fixture(scope="module")
def trained(data: dict) -> dict:
    """16 epochs of 32 batches with pruning on (about 0.7 s)."""
    x, y = data["train"]
    torch.manual_seed(0)
    ne = neuroexapt.NeuroExapt(task_type="regression")
    model = ne.wrap_model(_mlp())
    trainer = neuroexapt.Trainer(model, info_weight=0.3, entropy_threshold=4.4, lr=3e-3,
                                 progress=False)
    history = trainer.fit([(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)],
                          [data["val"]], epochs=16)
    return {"model": model, "trainer": trainer, "history": history}


def test_trainer_uses_mse_and_fits(data: dict, trained: dict) -> None:
    trainer, history, model = trained["trainer"], trained["history"], trained["model"]
    x_val, y_val = data["val"]
    assert trainer.loss_fn is F.mse_loss
    # The validation metric of regression is the negated loss, and that loss is the MSE of the
    # returned (gate-folded) model: recomputed here, it matches the last epoch's.
    assert history["val_metric"] == [-v for v in history["val_loss"]]
    with torch.no_grad():
        mse = float(F.mse_loss(model.eval()(x_val), y_val))
    assert mse == pytest.approx(history["val_loss"][-1], rel=1e-4)
    # Measured: validation MSE 1.14 after epoch 1, 0.096 after epoch 16 (target variance 2.1).
    assert history["val_loss"][-1] < 0.1 * float(y_val.var())
    assert history["val_loss"][-1] < 0.2 * history["val_loss"][0]
    # Measured: test R^2 0.968.
    assert _r2(model, *data["test"]) > 0.9


def test_trainer_prunes_the_regression_mlp_for_real(trained: dict) -> None:
    model, history = trained["model"], trained["history"]
    start = _params(_mlp())
    # Measured: 8833 -> 2871 parameters (-67%), hidden widths 64 -> 44, 32, 33: 110 units
    # removed after epochs 3, 6, 8, 9 and 15, of which epoch 9's 27 were rolled back at
    # epoch 10 (validation MSE 0.116 -> 0.167).
    assert sum(history["pruned_units"]) > 0
    assert history["parameters"][-1] == _params(model) < 0.5 * start
    widths = [model.get_submodule(n).out_features for n in HIDDEN]
    assert all(w < WIDTH for w in widths), widths
    for a, b in zip(HIDDEN, (*HIDDEN[1:], "6"), strict=True):  # consumers shrank with them
        assert model.get_submodule(b).in_features == model.get_submodule(a).out_features
    assert model[-1].out_features == 1  # the output is never pruned
    assert all(not m._forward_hooks for m in model.modules())  # gates folded, plain model


def test_measure_and_prune_layers_for_regression(data: dict) -> None:
    x, y = data["train"]
    x_val, y_val = data["val"]
    torch.manual_seed(0)
    ne = neuroexapt.NeuroExapt(task_type="regression")
    model = ne.wrap_model(_mlp())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            F.mse_loss(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    r2 = _r2(model, *data["test"])  # measured: 0.968
    assert r2 > 0.9

    report = ne.measure([(x_val[i : i + 128], y_val[i : i + 128]) for i in range(0, 512, 128)])
    assert report.task_type == "regression" and report.order == [*HIDDEN, "6"]
    values = ne.layer_values("2")
    assert values["entropy"].shape == values["importance"].shape == (WIDTH,)
    assert values["sensitivity"] > 0  # measured: 2.28 (MSE rise when the layer is ablated)
    # I(L;O) is not estimated for regression: NaN, and criteria on it are refused (they used
    # to read 0 and "mi < 0.1" cut every hidden layer down to one unit: R^2 -0.14).
    assert math.isnan(values["mutual_information"]) and math.isnan(values["redundancy"])
    with pytest.raises(ConfigError, match="estimated from class labels only"):
        ne.prune_layers(criteria="mi < 0.1", optimizer=opt)
    assert _params(model) == _params(_mlp())

    # Units that never fire on the probe. Measured: 7 of '2' and 9 of '4'; test R^2 unchanged.
    dead = {n: int((ne.layer_values(n)["dead_fraction"] > 0.99).sum()) for n in HIDDEN}
    records = ne.prune_layers(criteria="dead_fraction > 0.99", optimizer=opt)
    assert records and {r.target for r in records} == {n for n, k in dead.items() if k}
    for name, k in dead.items():
        assert model.get_submodule(name).out_features == WIDTH - k
    assert _params(model) == records[-1].params_after < _params(_mlp())
    assert _r2(model, *data["test"]) == pytest.approx(r2, abs=1e-3)
    # The model and its optimizer go on training after the edit.
    opt.zero_grad()
    F.mse_loss(model.train()(x[:64]), y[:64]).backward()
    opt.step()
    assert _r2(model, *data["test"]) > 0.9
