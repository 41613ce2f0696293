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
from pathlib import Path

import pytest

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


def _train(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "neuroexapt.cli", "train", "--no-progress",
                             *extra] + (["--config", str(config)] if not extra else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for run in (whole, broken):
        (tmp_path / f"{run.name}.yaml").write_text(CONFIG.replace("RUN", str(run)))
    assert _train(tmp_path / "whole.yaml").wait(timeout=300) == 0
    proc = _train(tmp_path / "broken.yaml")
    history = broken / "history.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once two epochs are logged
        if history.exists() and len(history.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = len(history.read_text().splitlines())
    assert 2 <= done < 5, "the run was not killed in the middle"
    resumed = subprocess.run([sys.executable, "-m", "neuroexapt.cli", "train", "--no-progress",
                              "--resume", str(broken)], capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    rows = [[json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
            for run in (whole, broken)]
    assert [r["epoch"] for r in rows[1]] == [1, 2, 3, 4, 5]
    assert rows[0] == rows[1]
    assert rows[0][-1]["parameters"] > rows[0][done - 1]["parameters"], \
        "nothing grew after the kill: weak test"
    events = [[json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
              for run in (whole, broken)]
    assert events[0] == events[1]
    models = [neuroexapt.load(run / "last.pt", lambda: DigitsCNN(width=4))[0]
              for run in (whole, broken)]
    a, b = (m.state_dict() for m in models)
    import torch

    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TRAINER_CONFIG = """model: digits_cnn
model_args: {width: 16}
data: {source: digits, batch_size: 64}
train: {epochs: 6, lr: 0.003, optimizer: adam, seed: 3}
method: trainer
trainer: {info_weight: 0.3, entropy_threshold: 0.5}
run_dir: RUN
"""


def _epoch_of(path: Path) -> int:
    """The epoch a Trainer's resume.pt was written after (0 while there is none)."""
    import torch

    try:
        return int(torch.load(path, weights_only=True)["policy"]["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_trainer_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for run in (whole, broken):
        (tmp_path / f"{run.name}.yaml").write_text(TRAINER_CONFIG.replace("RUN", str(run)))
    assert _train(tmp_path / "whole.yaml").wait(timeout=300) == 0
    proc = _train(tmp_path / "broken.yaml")
    deadline = time.time() + 300
    while time.time() < deadline and _epoch_of(broken / "resume.pt") < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = _epoch_of(broken / "resume.pt")
    assert 2 <= done < 6, "the run was not killed in the middle"
    assert not (broken / "last.pt").exists()
    resumed = subprocess.run([sys.executable, "-m", "neuroexapt.cli", "train", "--no-progress",
                              "--resume", str(broken)], capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    rows = [[json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
            for run in (whole, broken)]
    assert rows[0] == rows[1] and len(rows[0]) == 6
    assert rows[0][-1]["parameters"] < rows[0][0]["parameters"], "nothing pruned: weak test"
    models = [neuroexapt.load(run / "last.pt", lambda: DigitsCNN(width=16))[0]
              for run in (whole, broken)]
    a, b = (m.state_dict() for m in models)
    import torch

    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
