"""The DNM guide's snippets run as written and print what the guide shows."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "api" / "dnm_framework.md"


def _snippet(section: str) -> tuple[str, str]:
    """The first python block of ``section`` and the text block that follows it."""
    text = GUIDE.read_text()
    body = text[text.index(f"## {section}\n"):]
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    shown = body.split("```text\n", 1)[1].split("```", 1)[0]
    return code, shown


def _run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(GUIDE), "exec"), {"__name__": "guide"})
    return out.getvalue()


def _decisions(text: str) -> list[str]:
    """Every printed line with the validation accuracies (float rounding) masked."""
    return [re.sub(r"^(\d+) \d\.\d{3} ", r"\1 _ ", line) for line in text.splitlines()]


@pytest.mark.parametrize("section", ["The training loop", "State and resume"])
def test_guide_snippet_prints_what_the_guide_shows(section: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, shown = _snippet(section)
    if section == "The training loop":
        assert "DNMFramework(model, dnm_config)" in code  # the document's call, nothing added
    assert _decisions(_run(code)) == _decisions(shown)
