"""benchmarks/prune_speed.py times every method on both models (tiny widths)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest


def test_every_method_is_timed_on_both_models(bench: Callable[[str], ModuleType],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    module = bench("prune_speed")
    assert module.main(["--repeats", "1", "--score-batches", "1", "--width", "8",
                        "--resnet-width", "8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| wide_cnn") or line.startswith("| resnet20")]
    assert len(rows) == 8
    assert all(float(r.split("|")[3]) > 0 for r in rows)
    assert [r.split("|")[4].strip() for r in rows if "| torch-pruning |" in r] == ["1.00"] * 2
