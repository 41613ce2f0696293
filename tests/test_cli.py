"""The command line: both demos run and write what they promise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuroexapt.cli import main


def test_dnm_demo_writes_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--epochs", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed and "parameters" in printed
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["parameters"] > 0 for r in rows)
    assert (out / "events.jsonl").exists()
    for line in (out / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        assert event["params_after"] != event["params_before"] or event["kind"] == "rollback"
    assert any((out / "tensorboard").iterdir())
    png = (out / "accuracy_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_edit_demo_checks_every_preserving_edit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["edit-demo", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" ok") == 4  # widen, widen, deepen, add_skip preserved the outputs
    assert "pruning (changes outputs)" in printed
