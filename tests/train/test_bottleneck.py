"""Tests for neuroexapt.train.bottleneck: gates, regulariser, absorb, pruning with narrow.

Measured numbers (seeded, torch CPU) are written next to the assertions they set.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt import narrow
from neuroexapt.errors import ConfigError, LayerNotFoundError, UnsupportedModuleError
from neuroexapt.metrics import mutual_information
from neuroexapt.train.bottleneck import InformationBottleneck

SIGMA0 = math.exp(-4.5)  # initial gate noise, log_sigma2 = -9
WEIGHTS = (0.0, 0.003, 0.01, 0.03)  # none, small, moderate, large
MODERATE = 0.01


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))


def _xor(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 input dims, of which 2 matter: y = [x0 * x1 > 0] (needs a few hidden units)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, 0] * x[:, 1] > 0).long()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _train(weight: float) -> tuple[nn.Module, InformationBottleneck]:
    torch.manual_seed(0)
    model = _mlp()
    ib = InformationBottleneck(model, ["0"], info_weight=weight)
    opt = torch.optim.Adam([*model.parameters(), *ib.parameters()], lr=1e-2)
    x, y = _xor(1024, 1)
    for _ in range(300):
        loss = F.cross_entropy(model(x), y) + ib.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, ib


@pytest.fixture(scope="module")
def runs() -> dict[float, dict]:
    """One training run per weight, 0.5 s each: held-out accuracy, prunable units, I(X;T).

    T is the gated layer's output with the gates' noise on (training mode), the representation
    the bottleneck compresses. The eval-mode output ``h * mu`` is a deterministic function of
    X, so I(X;T) is infinite there and estimators measure something else (measured: "gaussian"
    gives 104 nats, set by its 1e-6 ridge, at every weight; "renyi" is scale-invariant and
    still reads 1.2 nats when every gate is closed). "gaussian" on the noisy T is scale-invariant
    per unit, so it sees exactly the signal-to-noise ratios mu**2 / sigma**2 the gates trade,
    and it is cheap; its floor on independent data is about d_x d_t / (2 N) = 0.5 nats here.
    """
    x, y = _xor(500, 2)
    out = {}
    for w in WEIGHTS:
        model, ib = _train(w)
        t: list[torch.Tensor] = []
        handle = model[0].register_forward_hook(lambda m, a, o, t=t: t.append(o.detach()))
        torch.manual_seed(1)
        with torch.no_grad():
            model.train()(x)
        handle.remove()
        out[w] = dict(acc=_accuracy(model, x, y), prunable=ib.prunable()["0"],
                      mi=mutual_information(x, t[0], method="gaussian"),
                      state=(model.state_dict(), ib.state_dict()))
    return out


def test_information_falls_and_prunable_units_grow_with_weight(runs: dict) -> None:
    # Measured I(X;T) nats / prunable of 32 / accuracy: w=0: 82.0 / 0 / 0.902;
    # w=0.003: 25.7 / 19 / 0.960; w=0.01: 10.7 / 28 / 0.970; w=0.03: 0.60 / 32 / 0.498 (closed).
    # The gates' own bound, sum of 0.5 log(1 + mu**2 / sigma**2): 169, 43.1, 14.6, 0.03 nats.
    mi = [runs[w]["mi"] for w in WEIGHTS]
    counts = [len(runs[w]["prunable"]) for w in WEIGHTS]
    assert all(a > b for a, b in itertools.pairwise(mi)), mi
    assert all(a <= b for a, b in itertools.pairwise(counts)), counts
    assert counts[0] == 0 and counts[-1] >= 30, counts
    assert mi[0] > 50 and mi[-1] < 1.0, mi


def test_moderate_weight_keeps_accuracy(runs: dict) -> None:
    # Measured: 0.970 with 4 units open against 0.902 without the regulariser (which
    # overfits the 14 irrelevant dims); the large weight closes every gate: 0.498.
    assert runs[MODERATE]["acc"] >= runs[0.0]["acc"] - 0.02
    assert runs[WEIGHTS[-1]]["acc"] < 0.7


def test_prunable_units_are_removed_by_narrow(runs: dict) -> None:
    model = _mlp()
    ib = InformationBottleneck(model, ["0"], info_weight=MODERATE)
    model.load_state_dict(runs[MODERATE]["state"][0])
    ib.load_state_dict(runs[MODERATE]["state"][1])
    x, y = _xor(500, 2)
    with torch.no_grad():
        gated = model.eval()(x)
    ib.absorb()
    remove = runs[MODERATE]["prunable"]
    narrow(model, "0", remove=remove, example_inputs=x[:2])
    assert model[0].out_features == 32 - len(remove) == 4
    # Measured: logits move by at most 0.019 (max |logit| about 10); accuracy 0.970 unchanged.
    with torch.no_grad():
        assert (model(x) - gated).abs().max() < 0.05
    assert abs(_accuracy(model, x, y) - runs[MODERATE]["acc"]) <= 0.004


def test_regularizer_value_and_gradient_match_closed_form() -> None:
    ib = InformationBottleneck(_mlp(), ["0"], info_weight=0.5)
    with torch.no_grad():
        ib.mu["0"].uniform_(-2, 2)
        ib.log_sigma2["0"].uniform_(-4, 2)
    mu, ls = ib.mu["0"], ib.log_sigma2["0"]
    snr = (mu.square() / ls.exp()).detach()
    ib.regularizer().backward()
    torch.testing.assert_close(ib.unit_information()["0"], 0.5 * torch.log1p(snr))
    torch.testing.assert_close(mu.grad, 0.5 * mu.detach() / (mu.detach().square() + ls.exp()))
    torch.testing.assert_close(ls.grad, -0.25 * snr / (1 + snr))


def test_task_loss_gradient_reaches_gates_and_weights() -> None:
    torch.manual_seed(0)
    model = _mlp()
    ib = InformationBottleneck(model, ["0"])
    x, y = _xor(64, 0)
    (F.cross_entropy(model(x), y) + ib.regularizer()).backward()
    for p in (ib.mu["0"], ib.log_sigma2["0"], model[0].weight, model[2].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any()


def test_init_eval_is_exact_and_train_is_within_noise() -> None:
    torch.manual_seed(0)
    model, x = _mlp(), torch.randn(64, 16)
    with torch.no_grad():
        plain_hidden, plain = model[0](x), model(x)
    ib = InformationBottleneck(model, ["0"])
    assert torch.allclose(ib.unit_information()["0"], torch.tensor(0.5 * math.log1p(math.e ** 9)))
    assert ib.prunable() == {"0": []}
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), plain) and torch.equal(model(x), model(x))
        gated = model.train()[0](x)
    # Training mode: |z - h| = |h| sigma |eps| <= 5 sigma |h| (sigma = 0.011).
    assert ((gated - plain_hidden).abs() <= 5 * SIGMA0 * plain_hidden.abs()).all()
    assert not torch.equal(gated, plain_hidden)
    ib.remove()
    assert not model[0]._forward_hooks


def test_conv_noise_is_shared_over_positions() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        h = conv(x)
        with InformationBottleneck(conv, [""]) as ib:
            ib.log_sigma2["<model>"].fill_(0.0)  # noise sigma = 1
            ratio = (conv(x) / h).flatten(2)
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ratio[0], ratio[1])
    assert not conv._forward_hooks


def _conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5))


CASES = {
    "linear": (_mlp, ["0", "2"], (8, 16)),
    "conv_bn": (_conv_bn, ["0", "1"], (4, 3, 6, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 5, 3), nn.Tanh(), nn.Conv1d(5, 3, 1)),
               ["0"], (4, 2, 9)),
    "tokens": (lambda: nn.Sequential(nn.Linear(6, 7), nn.GELU(), nn.Linear(7, 3)), ["0"],
               (4, 5, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_absorb_reproduces_the_gated_eval_model(case: str) -> None:
    torch.manual_seed(0)
    make, layers, shape = CASES[case]
    model, x = make(), torch.randn(*shape)
    model.train()(x)  # BatchNorm running statistics away from 0 / 1
    ib = InformationBottleneck(model, layers)
    with torch.no_grad():
        for p in ib.mu.values():
            p.uniform_(-1.5, 1.5)
        gated = model.eval()(x)
        ib.absorb()
        assert all(not model.get_submodule(n)._forward_hooks for n in layers)
        torch.testing.assert_close(model(x), gated, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x), make().eval()(x), atol=1e-3)
    with pytest.raises(ConfigError, match="already absorbed"):
        ib.absorb()


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf, True, "0.1", None])
def test_bad_info_weight(weight: object) -> None:
    with pytest.raises(ConfigError, match="info_weight must be a finite number >= 0"):
        InformationBottleneck(_mlp(), ["0"], info_weight=weight)  # type: ignore[arg-type]


@pytest.mark.parametrize(("layers", "match"), [
    ([], "non-empty list"), ("0", "non-empty list"), (["0", "0"], "more than once")])
def test_bad_layer_lists(layers: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        InformationBottleneck(_mlp(), layers)  # type: ignore[arg-type]


def test_unknown_and_unsupported_layers() -> None:
    with pytest.raises(LayerNotFoundError, match="no layer 'fc9'"):
        InformationBottleneck(_mlp(), ["fc9"])
    with pytest.raises(UnsupportedModuleError, match=r"layer '1' \(ReLU\) is not supported"):
        InformationBottleneck(_mlp(), ["1"])
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))
    with pytest.raises(UnsupportedModuleError, match="affine=False"):
        InformationBottleneck(bn, ["1"])


def test_bad_threshold_and_resized_layer() -> None:
    model = _mlp()
    ib = InformationBottleneck(model, ["0"])
    with pytest.raises(ConfigError, match="threshold must be a finite number > 0"):
        ib.prunable(threshold=0.0)
    # the edited model must run before the edit commits: with the gates on, it cannot
    with pytest.raises(ConfigError, match="outputs 31 units but its gate has 32"):
        narrow(model, "0", remove=[0], example_inputs=torch.randn(2, 16))
    assert model[0].out_features == 32 and model(torch.randn(2, 16)).shape == (2, 2)


def test_batchnorm_gate_is_folded_into_its_scale_and_shift() -> None:
    """Gated BatchNorm = BatchNorm with weight * g and bias * g, g ~ N(mu, sigma^2) drawn once
    per unit and batch; its own parameters are back after every forward (also one that
    raises) and receive the gradient; a deep copy can be stripped of the gates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ib = InformationBottleneck(model, ["1"], info_weight=0.1)
    with torch.no_grad():
        ib.log_sigma2["1"].fill_(0.0)  # sigma = 1: a large, visible noise
    bn = model[1]
    weight, bias = bn.weight, bn.bias
    x = torch.randn(8, 3, 6, 6)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    g = ib.mu["1"] + torch.randn(4)
    ref = nn.functional.relu(nn.functional.batch_norm(
        model[0](x), None, None, weight * g, bias * g, training=True))
    torch.testing.assert_close(out, ref)
    assert bn.weight is weight and bn.bias is bias and isinstance(bn.weight, nn.Parameter)
    out.sum().backward()
    assert weight.grad is not None and ib.mu["1"].grad is not None
    with pytest.raises(RuntimeError):
        model(torch.randn(8, 5, 6, 6))  # the conv refuses 5 channels
    assert bn.weight is weight  # nothing is left half-done
    copy_ = copy.deepcopy(model)
    ib.strip(copy_)
    assert not copy_[1]._forward_pre_hooks and not copy_[1]._forward_hooks
    with torch.no_grad():
        ib.mu["1"].copy_(torch.tensor([0.5, 1.0, 2.0, 0.0]))
    model.eval()
    copy_.eval()
    with torch.no_grad():
        h = model[0](x)
        torch.testing.assert_close(model(x), nn.functional.relu(nn.functional.batch_norm(
            h, bn.running_mean, bn.running_var, weight * ib.mu["1"], bias * ib.mu["1"])))
        torch.testing.assert_close(copy_(x), nn.functional.relu(nn.functional.batch_norm(
            h, bn.running_mean, bn.running_var, weight, bias)))  # the copy runs ungated
