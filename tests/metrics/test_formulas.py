"""The design document's formulas: layer importance, redundancy, output KL, structural entropy."""

from __future__ import annotations

import math

import pytest
import torch

from neuroexapt.errors import ConfigError
from neuroexapt.metrics.estimators import label_entropy, mutual_information
from neuroexapt.metrics.formulas import (
    PSI,
    TASK_TYPES,
    StructuralEntropy,
    layer_importance,
    output_kl,
    psi,
    redundancy,
)

NAN, INF = float("nan"), float("inf")

# ----------------------------------------------------------------------------- layer importance


def test_psi_table() -> None:
    assert PSI == {"classification": 1.0, "regression": 0.5}
    assert TASK_TYPES == ("classification", "regression")
    assert psi("classification") == 1.0 and psi("regression") == 0.5


@pytest.mark.parametrize(("h_o", "h_ol"), [(2.3, 0.8), (1.0, 1.0), (0.7, 0.0), (0.5, 2.0)])
def test_classification_importance_is_h_minus_conditional(h_o: float, h_ol: float) -> None:
    assert layer_importance(h_o, h_ol) == pytest.approx(h_o - h_ol, abs=1e-15)
    assert layer_importance(h_o, h_ol, "classification") == pytest.approx(h_o - h_ol, abs=1e-15)


@pytest.mark.parametrize(("h_o", "h_ol"), [(2.3, 0.8), (1.0, 1.0), (-1.4, 0.6)])
def test_regression_importance_charges_half_the_conditional(h_o: float, h_ol: float) -> None:
    # differential entropies may be negative: the formula must not clamp them
    assert layer_importance(h_o, h_ol, "regression") == pytest.approx(h_o - 0.5 * h_ol, abs=1e-15)


def test_psi_override() -> None:
    assert layer_importance(2.0, 0.8, psi_value=0.25) == pytest.approx(1.8)
    assert layer_importance(2.0, 0.8, "regression", psi_value=1.0) == pytest.approx(1.2)
    assert layer_importance(2.0, 0.8, psi_value=0) == pytest.approx(2.0)


@pytest.mark.parametrize("task", ["segmentation", "Classification", "", "regresion"])
def test_unknown_task_type_lists_valid_ones(task: str) -> None:
    with pytest.raises(ConfigError, match="valid task types: classification, regression"):
        layer_importance(1.0, 0.5, task)
    with pytest.raises(ConfigError, match="valid task types: classification, regression"):
        psi(task)


def test_unknown_task_type_rejected_even_with_psi_override() -> None:
    with pytest.raises(ConfigError, match="unknown task_type 'regresion'"):
        layer_importance(1.0, 0.5, "regresion", psi_value=0.5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"h_output": NAN, "h_output_given_layer": 0.5}, "h_output"),
        ({"h_output": 1.0, "h_output_given_layer": NAN}, "h_output_given_layer"),
        ({"h_output": INF, "h_output_given_layer": 0.5}, "h_output"),
        ({"h_output": 1.0, "h_output_given_layer": 0.5, "psi_value": NAN}, "psi"),
        ({"h_output": True, "h_output_given_layer": 0.5}, "h_output"),
        ({"h_output": "1.0", "h_output_given_layer": 0.5}, "h_output"),
    ],
)
def test_non_finite_importance_inputs_rejected(kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        layer_importance(**kwargs)


def _label_features(n: int, classes: int, noise: float, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.nn.functional.one_hot(y, classes).double() + noise * torch.randn(
        n, classes, generator=gen, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize(("noise", "low", "high"), [(0.05, 0.95, 1.0), (100.0, 0.0, 0.05)])
def test_importance_from_estimators_equals_mutual_information(
    noise: float, low: float, high: float
) -> None:
    """H(Y) from the labels, H(Y|L) = H(Y) - I(L;Y): the importance is the MI (psi = 1)."""
    x, y = _label_features(600, 5, noise, seed=0)
    h_y = label_entropy(y)
    mi = mutual_information(x, y, method="ksg")
    importance = layer_importance(h_y, h_y - mi, "classification")
    assert importance == pytest.approx(mi, abs=1e-12)
    # and the importance itself is meaningful: near H(Y) for a layer that copies the labels,
    # near 0 for one drowned in noise
    assert low * h_y <= importance <= high * h_y + 1e-12
    # regression's psi = 1/2 charges half of what remains: (H + I) / 2
    assert layer_importance(h_y, h_y - mi, "regression") == pytest.approx(0.5 * (h_y + mi))


# ----------------------------------------------------------------------------- redundancy


def test_redundancy_is_zero_at_the_budget() -> None:
    h, lam, depth = 2.0, 0.1, 4
    budget = h * math.exp(-lam * depth)
    value = redundancy([0.25 * budget, 0.75 * budget], h, depth, lam)
    assert value == pytest.approx(0.0, abs=1e-12)


def test_redundancy_closed_forms() -> None:
    assert redundancy([], 2.0, 3) == 1.0
    assert redundancy([0.0, 0.0], 2.0, 3) == 1.0
    budget = 1.5 * math.exp(-0.05 * 6)  # default lam
    assert redundancy([0.5 * budget], 1.5, 6) == pytest.approx(0.5)
    # not clamped: more than the budget gives a negative redundancy
    assert redundancy([budget, budget], 1.5, 6) == pytest.approx(-1.0)
    assert redundancy((0.3, 0.2), 1.0, 1, lam=0.0) == pytest.approx(0.5)


def test_deeper_networks_have_a_smaller_budget() -> None:
    values = [redundancy([0.2, 0.2], 2.0, d, lam=0.1) for d in (1, 2, 5, 10)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("depth", [0, -1, 1.5, True, "3", None])
def test_redundancy_rejects_bad_depth(depth: object) -> None:
    with pytest.raises(ConfigError, match="depth must be a positive int"):
        redundancy([0.1], 1.0, depth)  # type: ignore[arg-type]


@pytest.mark.parametrize("h", [0.0, -1.0])
def test_redundancy_rejects_non_positive_h_output(h: float) -> None:
    with pytest.raises(ConfigError, match="h_output must be > 0"):
        redundancy([0.1], h, 2)


@pytest.mark.parametrize(("h", "lam", "name"), [(NAN, 0.05, "h_output"), (INF, 0.05, "h_output"),
                                                (1.0, NAN, "lam")])
def test_redundancy_rejects_non_finite(h: float, lam: float, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        redundancy([0.1], h, 2, lam)


# ----------------------------------------------------------------------------- output KL


def test_output_kl_is_zero_for_identical_logits() -> None:
    logits = torch.randn(16, 7, generator=torch.Generator().manual_seed(0))
    assert output_kl(logits, logits.clone()) == pytest.approx(0.0, abs=1e-12)
    # softmax is shift invariant: adding a per-row constant changes nothing
    assert output_kl(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)


def test_output_kl_matches_hand_computation() -> None:
    # row 0: p = (1/4, 3/4), q = (1/2, 1/2); row 1: p = q = (1/2, 1/2)
    old = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=torch.float64)
    new = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    row0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert output_kl(old, new) == pytest.approx((row0 + 0.0) / 2, rel=1e-12)
    # direction: KL(p_old || p_new), not the reverse
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert output_kl(new[:1], old[:1]) == pytest.approx(reverse, rel=1e-12)
    assert reverse != pytest.approx(row0)


def test_output_kl_is_non_negative_and_matches_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        a, b = torch.randn(8, 5, generator=gen) * 3, torch.randn(8, 5, generator=gen) * 3
        kl = output_kl(a, b)
        ref = torch.nn.functional.kl_div(
            b.double().log_softmax(-1), a.double().log_softmax(-1), log_target=True,
            reduction="batchmean")
        assert kl >= 0.0
        assert kl == pytest.approx(float(ref), rel=1e-9)


@pytest.mark.parametrize(("a", "b"), [((4, 3), (4, 5)), ((4, 3), (5, 3)), ((4, 3), (12,))])
def test_output_kl_rejects_shape_mismatch(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="output shapes differ"):
        output_kl(torch.zeros(a), torch.zeros(b))


# ----------------------------------------------------------------------------- structural entropy


def test_structural_entropy_steps() -> None:
    s = StructuralEntropy(alpha=0.5, beta=2.0)
    d1 = s.step([0.1, 0.2, 0.3], kl=0.05)
    assert d1 == pytest.approx(-0.5 * 0.6 + 2.0 * 0.05)
    d2 = s.step([1.0], kl=0.0, dt=2.0)
    assert d2 == pytest.approx(-0.5 * 1.0 * 2.0)
    d3 = s.step([], kl=0.4)
    assert d3 == pytest.approx(0.8)
    assert s.value == pytest.approx(d1 + d2 + d3)
    assert [h[1] for h in s.history] == pytest.approx([d1, d2, d3])
    assert [h[2] for h in s.history] == [0.05, 0.0, 0.4]
    assert [h[0] for h in s.history] == pytest.approx([d1, d1 + d2, d1 + d2 + d3])


def test_structural_entropy_defaults_and_independent_histories() -> None:
    a, b = StructuralEntropy(), StructuralEntropy(value=1.0)
    assert a.step([0.25, 0.25]) == pytest.approx(-0.5)  # alpha = beta = 1, kl = 0
    assert a.history == [(-0.5, -0.5, 0.0)]
    assert b.history == []  # no shared mutable default
    assert b.step([0.5]) == pytest.approx(-0.5) and b.value == pytest.approx(0.5)


@pytest.mark.parametrize(("kl", "match"), [(-0.1, "kl must be >= 0"),
                                           (NAN, "kl must be a finite number"),
                                           (INF, "kl must be a finite number")])
def test_structural_entropy_rejects_bad_kl(kl: float, match: str) -> None:
    s = StructuralEntropy()
    s.step([0.1])
    before = (s.value, list(s.history))
    with pytest.raises(ConfigError, match=match):
        s.step([0.1], kl=kl)
    assert (s.value, s.history) == before


def test_structural_entropy_rejects_non_finite_coefficients() -> None:
    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        StructuralEntropy(alpha=NAN).step([0.1])
    with pytest.raises(ConfigError, match="dt must be a finite number"):
        StructuralEntropy().step([0.1], dt=INF)


def test_structural_entropy_integrates_output_kl() -> None:
    """An edit that changes the outputs raises S by beta * KL; a preserving one does not."""
    gen = torch.Generator().manual_seed(2)
    before = torch.randn(32, 10, generator=gen)
    s = StructuralEntropy(alpha=1.0, beta=3.0)
    assert s.step([0.0], kl=output_kl(before, before)) == pytest.approx(0.0, abs=1e-12)
    changed = before + torch.randn(32, 10, generator=gen)
    kl = output_kl(before, changed)
    assert kl > 0
    assert s.step([0.0], kl=kl) == pytest.approx(3.0 * kl)
