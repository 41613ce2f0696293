"""Resume: runs killed by a signal resume from their last checkpoint (issue 15).

A Trainer run (``resume.pt``: model, optimizer, gates, scheduler, history and random state)
resumes to the uninterrupted run bit for bit: the same history rows and the same weights.

A DNM run (``last.pt``: model, optimizer, DNM's state with the recorder's statistics since the
last change, its sampling state and the number of growths, and the random state) resumes to
the uninterrupted run bit for bit too: the same history rows, events and weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import neuroexapt
from neuroexapt.train.digits import DigitsCNN

CONFIG = """model: digits_cnn
model_args: {width: 4}
data: {source: digits, batch_size: 64}
train: {epochs: 5, lr: 0.05, seed: 3}
method: dnm
dnm: {morphogenesis_interval: 1, trigger_on_bottleneck: true}
run_dir: RUN
"""


def _train(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "neuroexapt.cli", "train", "--no-progress",
                             "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_and_resume(tmp_path: Path, config: str, progress: Callable[[Path], int]
                     ) -> tuple[Path, Path, int]:
    """An uninterrupted run, and a run SIGKILLed once ``progress(run)`` reaches 2 epochs and
    then resumed; returns both run folders and the epochs done before the kill."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for run in (whole, broken):
        (tmp_path / f"{run.name}.yaml").write_text(config.replace("RUN", str(run)))
    assert _train(tmp_path / "whole.yaml").wait(timeout=300) == 0
    proc = _train(tmp_path / "broken.yaml")
    deadline = time.time() + 300
    while time.time() < deadline and progress(broken) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = progress(broken)
    assert 2 <= done < 5, "the run was not killed in the middle"
    resumed = subprocess.run([sys.executable, "-m", "neuroexapt.cli", "train", "--no-progress",
                              "--resume", str(broken)], capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    return whole, broken, done


def _rows(run: Path, name: str = "history.jsonl") -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / name).read_text().splitlines()]


def _same_weights(runs: tuple[Path, Path], width: int) -> bool:
    a, b = (neuroexapt.load(run / "last.pt", lambda: DigitsCNN(width=width))[0].state_dict()
            for run in runs)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _logged_epochs(run: Path) -> int:
    history = run / "history.jsonl"
    return len(history.read_text().splitlines()) if history.exists() else 0


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole, broken, done = _kill_and_resume(tmp_path, CONFIG, _logged_epochs)
    rows = [_rows(run) for run in (whole, broken)]
    assert [r["epoch"] for r in rows[1]] == [1, 2, 3, 4, 5]
    assert rows[0] == rows[1]
    assert rows[0][-1]["parameters"] > rows[0][done - 1]["parameters"], \
        "nothing grew after the kill: weak test"
    assert _rows(whole, "events.jsonl") == _rows(broken, "events.jsonl")
    assert _same_weights((whole, broken), 4)


TRAINER_CONFIG = """model: digits_cnn
model_args: {width: 16}
data: {source: digits, batch_size: 64}
train: {epochs: 6, lr: 0.003, optimizer: adam, seed: 3}
method: trainer
trainer: {info_weight: 0.3, entropy_threshold: 0.5}
run_dir: RUN
"""


def _trained_epochs(run: Path) -> int:
    """The epoch a Trainer's resume.pt was written after (0 while there is none)."""
    try:
        return int(torch.load(run / "resume.pt", weights_only=True)["policy"]["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_trainer_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole, broken, _ = _kill_and_resume(tmp_path, TRAINER_CONFIG, _trained_epochs)
    rows = [_rows(run) for run in (whole, broken)]
    assert rows[0] == rows[1] and len(rows[0]) == 6
    assert rows[0][-1]["parameters"] < rows[0][0]["parameters"], "nothing pruned: weak test"
    assert _same_weights((whole, broken), 16)
