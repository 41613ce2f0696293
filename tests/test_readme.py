"""The README's quick start runs as written and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_quick_start(), str(README), "exec"), {"__name__": "readme"})
    lines = out.getvalue().splitlines()
    assert lines[0] == "5450 -> 7994"  # the figure the README shows in a comment
    assert lines[-1] == "True"  # the reloaded model computes the same outputs
    assert os.path.exists(tmp_path / "edited.pt")
