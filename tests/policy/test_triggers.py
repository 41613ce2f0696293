"""MorphogenesisTrigger on scripted validation histories: when it fires, and why it says so."""

from __future__ import annotations

from typing import Any

import pytest

from neuroexapt.policy import DNMConfig, MorphogenesisTrigger


def trigger(history: list[float], **config: Any) -> MorphogenesisTrigger:
    t = MorphogenesisTrigger(DNMConfig.from_dict(config))
    for value in history:
        t.record(value)
    return t


# (history, plateau_window, threshold, fires, measured gain). The gain is the last value minus
# the best of the plateau_window values before it: one epoch that does not beat the recent
# best by the threshold is a plateau.
PLATEAUS = [
    # flat: no improvement at all
    ([0.50, 0.50, 0.50, 0.50], 3, 0.01, True, 0.0),
    # improving by 0.05 per epoch
    ([0.50, 0.55, 0.60, 0.65], 3, 0.01, False, 0.05),
    # gain 0.005 below the threshold 0.01
    ([0.60, 0.60, 0.60, 0.605], 3, 0.01, True, 0.005),
    # gain 0.02 above the threshold 0.01, but below 0.03
    ([0.60, 0.60, 0.60, 0.62], 3, 0.01, False, 0.02),
    ([0.60, 0.60, 0.60, 0.62], 3, 0.03, True, 0.02),
    # falling: the best of the window is its first value
    ([0.70, 0.65, 0.60, 0.58], 3, 0.01, True, -0.12),
    # only the plateau_window values before the last count: an older best is forgotten
    ([0.90, 0.50, 0.60, 0.70, 0.80], 3, 0.01, False, 0.10),
    ([0.90, 0.50, 0.60, 0.70, 0.80], 4, 0.01, True, -0.10),
    # a jump two epochs ago followed by one flat epoch is a plateau
    ([0.10, 0.80, 0.80, 0.80], 3, 0.01, True, 0.0),
    # a window of 1 compares with the previous epoch only
    ([0.50, 0.90, 0.90], 1, 0.01, True, 0.0),
    ([0.90, 0.50, 0.80], 1, 0.01, False, 0.30),
    # threshold 0: only a decrease or no change is a plateau
    ([0.50, 0.50, 0.5001], 2, 0.0, False, 0.0001),
]


@pytest.mark.parametrize(("history", "window", "threshold", "fires", "gain"), PLATEAUS)
def test_plateau(history: list[float], window: int, threshold: float, fires: bool,
                 gain: float) -> None:
    t = trigger(history, plateau_window=window, performance_improvement_threshold=threshold,
                morphogenesis_interval=1)
    stalled, text = t.plateau()
    assert stalled is fires
    assert f"{gain:+.4f}" in text
    best = max(history[-window - 1 : -1])
    assert f"last {history[-1]:.4f} vs best {best:.4f} of the {window} epochs before" in text
    assert f"(threshold {threshold})" in text
    go, reasons = t.check(epoch=len(history), bottlenecks=[])
    assert go is fires
    assert any(f"{gain:+.4f}" in r for r in reasons)
    assert reasons[0].startswith("plateau: " if fires else "no plateau: ")


@pytest.mark.parametrize("records", [0, 1, 3])
def test_too_short_a_history_is_no_plateau(records: int) -> None:
    t = trigger([0.5] * records, plateau_window=3, morphogenesis_interval=1)
    stalled, text = t.plateau()
    assert not stalled
    assert text == f"only {records} validation records, plateau needs 4"
    assert t.check(5, []) == (False, [f"no plateau: {text}"])


@pytest.mark.parametrize(("interval", "epoch", "checked"), [
    (3, 1, False), (3, 2, False), (3, 3, True), (3, 4, False), (3, 6, True), (3, 9, True),
    (1, 1, True), (1, 7, True), (5, 10, True), (5, 12, False),
])
def test_interval_gating(interval: int, epoch: int, checked: bool) -> None:
    t = trigger([0.5] * 6, morphogenesis_interval=interval)  # a plateau: fires when checked
    go, reasons = t.check(epoch, [])
    assert go is checked
    if not checked:
        assert reasons == [f"epoch {epoch} is not a multiple of morphogenesis_interval="
                           f"{interval}"]


@pytest.mark.parametrize(("budget", "changes", "fires"), [
    (10, 0, True), (10, 9, True), (10, 10, False), (2, 3, False), (0, 0, False),
])
def test_budget(budget: int, changes: int, fires: bool) -> None:
    t = trigger([0.5] * 6, morphogenesis_interval=1, max_architecture_changes=budget)
    t.changes = changes
    go, reasons = t.check(6, ["'fc': gradient_variance=1 (score 1.00 >= 0.50)"])
    assert go is fires
    if not fires:
        assert reasons == [f"budget spent: {changes} of {budget} architecture changes made"]


def test_budget_is_checked_before_the_interval() -> None:
    t = trigger([0.5] * 6, morphogenesis_interval=4, max_architecture_changes=1)
    t.changes = 1
    assert t.check(3, [])[1][0].startswith("budget spent: 1 of 1")


@pytest.mark.parametrize(("until", "epoch", "fires"), [
    (5, 4, False), (5, 5, False), (5, 6, True), (-1, 1, True),
])
def test_evaluation_window_gating(until: int, epoch: int, fires: bool) -> None:
    t = trigger([0.5] * 6, morphogenesis_interval=1)
    t.evaluating_until = until
    go, reasons = t.check(epoch, [])
    assert go is fires
    if not fires:
        assert reasons == [f"the last change is evaluated until epoch {until}"]


def test_evaluation_window_after_a_change_as_the_framework_sets_it() -> None:
    # DNMFramework sets evaluating_until = epoch of the change + evaluation_window.
    t = trigger([0.5] * 6, morphogenesis_interval=1, evaluation_window=2)
    assert t.check(6, [])[0]
    t.changes += 1
    t.evaluating_until = 6 + t.config.evaluation_window
    assert [t.check(e, [])[0] for e in (7, 8, 9)] == [False, False, True]


BOTTLENECKS = ["'features.3': gradient_variance=0.0123 (score 0.91 >= 0.50)",
               "'classifier.0': performance_sensitivity=1.25 (score 1.00 >= 0.50)"]


@pytest.mark.parametrize(("on_bottleneck", "history", "bottlenecks", "fires"), [
    # without plateau: only trigger_on_bottleneck with evidence fires
    (False, [0.5, 0.6, 0.7, 0.8], BOTTLENECKS, False),
    (True, [0.5, 0.6, 0.7, 0.8], BOTTLENECKS, True),
    (True, [0.5, 0.6, 0.7, 0.8], [], False),
    # even before the plateau window is filled
    (True, [0.5], BOTTLENECKS, True),
    # with a plateau both fire, with or without evidence
    (False, [0.5, 0.5, 0.5, 0.5], BOTTLENECKS, True),
    (False, [0.5, 0.5, 0.5, 0.5], [], True),
])
def test_trigger_on_bottleneck(on_bottleneck: bool, history: list[float],
                               bottlenecks: list[str], fires: bool) -> None:
    t = trigger(history, morphogenesis_interval=1, trigger_on_bottleneck=on_bottleneck)
    go, reasons = t.check(len(history), bottlenecks)
    assert go is fires
    if fires:
        # every bottleneck's measured evidence is carried in the reasons
        assert [r for r in reasons if r.startswith("bottleneck: ")] == \
            [f"bottleneck: {b}" for b in bottlenecks]
        assert any("0.0123" in r for r in reasons) or not bottlenecks
    else:
        assert len(reasons) == 1 and reasons[0].startswith("no plateau: validation improved by")


def test_bottleneck_alone_does_not_bypass_the_gates() -> None:
    t = trigger([0.5, 0.6, 0.7, 0.8], morphogenesis_interval=2, trigger_on_bottleneck=True,
                max_architecture_changes=1)
    assert not t.check(3, BOTTLENECKS)[0]  # interval
    t.evaluating_until = 4
    assert not t.check(4, BOTTLENECKS)[0]  # evaluation window
    t.evaluating_until = -1
    assert t.check(4, BOTTLENECKS)[0]
    t.changes = 1
    assert not t.check(6, BOTTLENECKS)[0]  # budget


def test_record_keeps_floats() -> None:
    t = trigger([1, 0.5])
    assert t.history == [1.0, 0.5] and all(type(v) is float for v in t.history)
