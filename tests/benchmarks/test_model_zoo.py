"""benchmarks/model_zoo.py classifies every case of a model it can build."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_one_hugging_face_model(bench: Callable[[str], ModuleType], tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    module = bench("model_zoo")
    out = tmp_path / "zoo.json"
    assert module.main(["--models", "hf/distilbert", "--layers", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["cases"]) == 2 * 3
    assert {c["result"] for c in row["cases"]} <= {"ok", "refused"}  # never FAILED
    assert any(c["result"] == "ok" for c in row["cases"])
    assert row["prune_to"] == "ok"
    assert row["groups_resizable"] > 0


def test_unknown_models_are_named(bench: Callable[[str], ModuleType]) -> None:
    module = bench("model_zoo")
    with pytest.raises(SystemExit):
        module.main(["--models", "hf/nothing"])
