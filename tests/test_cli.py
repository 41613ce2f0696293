"""The command line: both demos run and write what they promise."""

from __future__ import annotations

import json
import re
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


RUN = """model: digits_cnn
model_args: {width: 4}
data:
  source: digits
  batch_size: 64
train:
  epochs: 3
  lr: 0.05
method: dnm
dnm:
  morphogenesis_interval: 1
  trigger_on_bottleneck: true
run_dir: RUN_DIR
"""


def test_train_writes_a_run_folder_and_resumes_it(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:


    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(RUN.replace("RUN_DIR", str(run)))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 epochs" in out and "neuron_division" in out
    for name in ("history.jsonl", "events.jsonl", "last.pt", "config.yaml", "curves.png"):
        assert (run / name).exists(), name
    assert (run / "tensorboard").is_dir()
    events = (run / "events.jsonl").read_text().splitlines()
    # resume: two more epochs, the history continues, no event is written twice
    (run / "config.yaml").write_text(RUN.replace("RUN_DIR", str(run)).replace(
        "epochs: 3", "epochs: 5"))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    rows = (run / "history.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert (run / "events.jsonl").read_text().splitlines()[: len(events)] == events
    assert main(["report", str(run)]) == 0
    assert "neuron_division" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "match"), [
    ("model: digits_cnn\ntrain:\n  epochs: 2\n  lerning_rate: 0.1\n",
     r"line 4: unknown key 'train.lerning_rate'"),
    ("model: digits_cnn\ndnm:\n  morphogenesis_intervall: 2\n",
     r"line 3: unknown DNM config key 'morphogenesis_intervall'"),
    ("model: digits_cnn\nmethod: evolve\n", r"line 2: 'method' must be one of"),
    ("model: digits_cnn\ndata:\n  source: npz\n", r"line 2: data.source=npz needs 'data.path'"),
    ("model: no_such_net\n", r"unknown model 'no_such_net'"),
    ("model: [1, 2\n", r"not valid YAML"),
    ("modle: digits_cnn\n", r"line 1: unknown key 'modle'; did you mean 'model'"),
])
def test_configuration_errors_name_the_key_and_line(tmp_path: Path, text: str, match: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:


    config = tmp_path / "bad.yaml"
    config.write_text(text + f"run_dir: {tmp_path / 'run'}\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(config), "--no-progress"])
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_analyze_prints_the_bottleneck_report(capsys: pytest.CaptureFixture[str]) -> None:


    assert main(["analyze", "--model", "digits_cnn", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "classifier.0" in out and "score" in out
