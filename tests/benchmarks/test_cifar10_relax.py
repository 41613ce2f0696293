"""benchmarks/cifar10_relax.py runs end to end on a tiny fake CIFAR-10 (issue 13)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def test_every_arm_trains_and_the_goals_are_reported(
        bench: Callable[[str], ModuleType], cifar_dir: Path, tmp_path: Path) -> None:
    module = bench("cifar10_relax")
    out = tmp_path / "r.json"
    code = module.main(["--data-dir", str(cifar_dir), "--subset", "256", "--epochs", "1",
                        "--search-epochs", "1", "--width", "8", "--random", "1",
                        "--threads", "1", "--penalty", "0.5", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    arms = {r["arm"]: r for r in result["rows"]}
    assert set(arms) == {"largest", "base", "smallest", "random-0", "searched"}
    assert arms["largest"]["macs"] > arms["base"]["macs"] > arms["smallest"]["macs"]
    assert arms["searched"]["arch"] == result["search"]["chosen"]
    assert len(result["search"]["rows"]) == 1 and result["cost_ratio"] > 0
    assert len(result["goals"]) == 2
