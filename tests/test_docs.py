"""The DNM guide's snippets run as written and print what the guide shows."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

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


API_DOCS = [Path(__file__).resolve().parents[1] / "docs" / "api" / name
            for name in ("neuroexapt.md", "performance_analysis.md", "neuron_division.md")]


def _blocks(path: Path) -> list[tuple[str, str]]:
    """Every python block of ``path`` that is followed by the text block of its output."""
    pattern = re.compile(r"```python\n((?:(?!```).)*?)```\n\s*```text\n(.*?)```", re.S)
    return [(m.group(1), m.group(2)) for m in pattern.finditer(path.read_text())]


@pytest.mark.parametrize(("path", "index"), [(p, i) for p in API_DOCS
                                             for i in range(len(_blocks(p)))],
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_api_doc_snippet_runs_and_prints_as_many_lines(path: Path, index: int, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The API guides' snippets run as written; their printed lines match the guide's in
    number and in their first word (the values depend on the machine's float rounding)."""
    monkeypatch.chdir(tmp_path)
    code, shown = _blocks(path)[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), torch.enable_grad():  # a snippet may turn it off
        exec(compile(code, str(path), "exec"), {"__name__": "guide"})
    printed = out.getvalue().splitlines()
    assert [x.split(" ")[0] for x in printed] == [x.split(" ")[0] for x in shown.splitlines()]
