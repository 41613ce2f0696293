"""Trainer resume: a run stopped mid-way and resumed from ``resume.pt`` is the uninterrupted run,
bit for bit (issue 15); bad resumes are refused with the model and optimizer unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import neuroexapt
from neuroexapt.errors import CheckpointError, ConfigError
from neuroexapt.train.digits import DigitsCNN, load_digits


class _StopError(Exception):
    """Stands for the kill (the test of the CLI kills a real process)."""


class _Loader:
    """The same batches every pass; raises on pass ``stop_at`` (each epoch makes two passes:
    training and BatchNorm recalibration)."""

    def __init__(self, batches: list[Any], stop_at: int | None = None) -> None:
        self.batches, self.stop_at, self.passes = batches, stop_at, 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        if self.stop_at is not None and self.passes >= self.stop_at:
            raise _StopError
        return iter(self.batches)


@pytest.fixture(scope="module")
def data() -> tuple[list[Any], list[Any]]:
    x, y, xv, yv = load_digits(0)
    return ([(x[i : i + 64], y[i : i + 64]) for i in range(0, 1280, 64)],
            [(xv[i : i + 128], yv[i : i + 128]) for i in range(0, len(yv), 128)])


def _trainer(folder: Path | None) -> neuroexapt.Trainer:
    torch.manual_seed(0)
    model = DigitsCNN(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return neuroexapt.Trainer(
        model=model, optimizer=opt, info_weight=0.3, entropy_threshold=0.5, progress=False,
        checkpoint_dir=str(folder) if folder else None,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5))


def test_a_stopped_run_resumes_to_the_uninterrupted_run(data: tuple[list[Any], list[Any]],
                                                        tmp_path: Path) -> None:
    train, val = data
    whole = _trainer(tmp_path / "whole")
    expected = whole.fit(_Loader(train), val, epochs=6)
    assert sum(expected["pruned_units"][:4]) > 0, "nothing pruned before the stop: weak test"
    stopped = _trainer(tmp_path / "run")
    with pytest.raises(_StopError):  # in epoch 5: epoch 4's change still awaits its rollback check
        stopped.fit(_Loader(train, stop_at=9), val, epochs=6)
    assert (tmp_path / "run" / "resume_pending.pt").is_file()
    resumed = _trainer(tmp_path / "run")
    history = resumed.fit(_Loader(train), val, epochs=6, resume=True)
    assert history == expected
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert neuroexapt.get_history(resumed.model) == neuroexapt.get_history(whole.model)
    params = {id(p) for g in resumed.optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in resumed.model.parameters()}


def test_bad_resumes_are_refused_and_change_nothing(data: tuple[list[Any], list[Any]],
                                                   tmp_path: Path) -> None:
    train, val = data
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        _trainer(None).fit(train, val, epochs=2, resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        _trainer(tmp_path / "empty").fit(train, val, epochs=2, resume=True)
    _trainer(tmp_path / "done").fit(train, val, epochs=2)
    late = _trainer(tmp_path / "done")
    before = {k: v.clone() for k, v in late.model.state_dict().items()}
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        late.fit(train, val, epochs=2, resume=True)
    after = late.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)
    assert late.optimizer.state == {} and late.history["val_metric"] == []
    assert not late.model._forward_hooks and all(not m._forward_hooks
                                                 for m in late.model.modules())
    plain = tmp_path / "plain.pt"  # a checkpoint without a Trainer's state
    neuroexapt.save(DigitsCNN(width=16), plain)
    with pytest.raises(CheckpointError, match="not a Trainer"):
        _trainer(tmp_path / "x").fit(train, val, epochs=2, resume=plain)
