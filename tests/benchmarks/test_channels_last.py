"""benchmarks/channels_last.py times four variants of each model."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest


def test_runs_on_small_models(bench: Callable[[str], ModuleType],
                              capsys: pytest.CaptureFixture[str]) -> None:
    module = bench("channels_last")
    assert module.main(["--repeats", "2", "--width", "8", "--resnet-width", "8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| wide_cnn", "| resnet20"))]
    assert len(rows) == 4
    for row in rows:
        times = [float(v) for v in row.strip("| ").split(" | ")[2:]]
        assert len(times) == 4 and all(t > 0 for t in times)
