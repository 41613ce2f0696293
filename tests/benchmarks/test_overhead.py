"""benchmarks/overhead.py measures the three arms on a tiny fake CIFAR-10."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def test_three_arms_timed_in_rotation(bench: Callable[[str], ModuleType], cifar_dir: Path,
                                      tmp_path: Path) -> None:
    module = bench("overhead")
    out = tmp_path / "o.json"
    code = module.main(["--data-dir", str(cifar_dir), "--subset", "128", "--val", "100",
                        "--epochs", "1", "--repeats", "2", "--threads", "1", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(result["runs"]) == {"plain", "dnm", "trainer"}
    for arm in ("plain", "dnm", "trainer"):
        assert len(result["runs"][arm]) == 2
        assert all(r["wall_s"] > 0 for r in result["runs"][arm])
        assert len(summary[arm]["ratios"]) == 2
    assert summary["plain"]["overhead"] == 0.0
    assert all(r == 1.0 for r in summary["plain"]["ratios"])
    assert summary["dnm"]["own_share"] > 0
    assert all(r["dnm_hooks_s"] > 0 for r in result["runs"]["dnm"])  # training batches recorded
    assert 0 < summary["dnm"]["hooks_share"] < summary["dnm"]["own_share"]
    assert summary["trainer"]["params"] == summary["plain"]["params"]  # threshold 0: no pruning


def test_a_subset_of_arms(bench: Callable[[str], ModuleType], cifar_dir: Path,
                          tmp_path: Path) -> None:
    module = bench("overhead")
    out = tmp_path / "o.json"
    assert module.main(["--data-dir", str(cifar_dir), "--subset", "128", "--val", "100",
                        "--epochs", "1", "--repeats", "1", "--threads", "1", "--arms", "trainer",
                        "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"plain", "trainer"}
    assert "overhead" in result["summary"]["trainer"]
