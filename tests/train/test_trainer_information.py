"""Trainer: a larger ``info_weight`` makes the trained representation carry less about X.

The same MLP, data, seed and batches are trained by ``neuroexapt.Trainer`` at several
``info_weight`` values with ``entropy_threshold=0`` (so nothing is pruned and the models stay
comparable). Two quantities are read at the end of ``fit``, just before the gates are folded
into the layers (``Trainer._absorb``, overridden in a subclass):

* the gates' own bound, ``sum_units 0.5 * log(1 + mu**2 / sigma**2)`` (nats);
* a measured ``I(X;T)``: ``neuroexapt.metrics.mutual_information(x, t, method="gaussian")``
  with T the hidden layer's gated output with the gates' noise on (training mode), the
  representation the bottleneck compresses (see tests/train/test_bottleneck.py for why the
  noisy output and this estimator). Its floor on independent data is about
  ``d_x d_t / (2 N) = 16 * 32 / 1000 = 0.5`` nats.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.metrics import mutual_information

WEIGHTS = (0.0, 0.1, 1.0)  # Trainer info_weight: the price of the mean nat per gated unit
UNITS = 32


def _xor(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 input dims, of which 2 matter: y = [x0 * x1 > 0] (needs a few hidden units)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, 0] * x[:, 1] > 0).long()


class RecordingTrainer(neuroexapt.Trainer):
    """Reads the gates and the noisy hidden representation before ``fit`` folds the gates."""

    probe: torch.Tensor
    gate_information: dict[str, torch.Tensor]
    measured: float

    def _absorb(self) -> None:
        if self.ib is not None:
            self.gate_information = self.ib.unit_information()
            t: list[torch.Tensor] = []
            hidden = self.model.get_submodule("0")
            handle = hidden.register_forward_hook(lambda m, a, o: t.append(o.detach()))
            torch.manual_seed(1)  # the same noise draw for every weight
            with torch.no_grad():
                self.model.train()(self.probe)
            handle.remove()
            self.measured = mutual_information(self.probe, t[0], method="gaussian")
        super()._absorb()


@pytest.fixture(scope="module")
def runs() -> dict[float, dict]:
    """One Trainer run per weight: 20 epochs of 16 batches, about 0.5 s each."""
    x, y = _xor(1024, 1)
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1024, 64)]
    x_val, y_val = _xor(500, 2)
    val = [(x_val, y_val)]
    out = {}
    for w in WEIGHTS:
        torch.manual_seed(0)
        ne = neuroexapt.NeuroExapt(task_type="classification")
        model = ne.wrap_model(nn.Sequential(nn.Linear(16, UNITS), nn.ReLU(), nn.Linear(UNITS, 2)))
        trainer = RecordingTrainer(model, info_weight=w, entropy_threshold=0.0, lr=1e-2,
                                   progress=False)
        trainer.probe = x_val
        history = trainer.fit(train, val, epochs=20)
        out[w] = dict(gates=float(trainer.gate_information["0"].sum()), mi=trainer.measured,
                      history=history, absorbed=trainer.ib is None)
    return out


def test_information_falls_as_info_weight_rises(runs: dict) -> None:
    # Measured (nats), info_weight 0 / 0.1 / 1: gates 159.3 / 32.8 / 0.05; I(X;T) 76.2 / 18.0 /
    # 0.63 (the estimator's floor: every gate closed); final validation accuracy 0.952 / 0.960
    # / 0.680. (Also measured: 0.03 -> 79.0 / 40.9, 0.3 -> 19.0 / 11.6, 3 -> 0.01 / 0.59.)
    gates = [runs[w]["gates"] for w in WEIGHTS]
    mi = [runs[w]["mi"] for w in WEIGHTS]
    # Nothing was pruned (entropy_threshold=0), although gates nearly close at the larger
    # weights (smallest unit at the end: 5e-8 nats at 0.1; some fell under 1e-9 nats during
    # training, which the Trainer used to prune): the models have the same shape, only their
    # gates differ.
    for w in WEIGHTS:
        assert sum(runs[w]["history"]["pruned_units"]) == 0
        assert set(runs[w]["history"]["parameters"]) == {16 * UNITS + UNITS + UNITS * 2 + 2}
        assert runs[w]["absorbed"]  # the values were read before fit folded the gates in
    assert all(a > b for a, b in itertools.pairwise(gates)), gates
    assert all(a > b for a, b in itertools.pairwise(mi)), mi
    # Clear margins: at least halved at each step up.
    assert all(b < 0.5 * a for a, b in itertools.pairwise(gates)), gates
    assert all(b < 0.5 * a for a, b in itertools.pairwise(mi)), mi
    assert gates[0] > 100 and mi[0] > 40, (gates, mi)  # without the price: wide open
    assert gates[-1] < 1.0 and mi[-1] < 1.0, (gates, mi)  # the large price closes the layer
