"""benchmarks/soak.py: edits in rotation leave no hook behind and memory bounded (issue 15)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType


def test_a_rotation_of_edits_leaves_no_hook_and_bounded_memory(
        bench: Callable[[str], ModuleType]) -> None:
    module = bench("soak")
    out = module.soak(edits=30, every=10)
    assert out["hooks"] == 0
    assert out["history"] > 0
    rss = [s[1] for s in out["samples"]]
    assert rss[-1] - rss[0] < 50  # MB: no model, graph or snapshot kept per edit
