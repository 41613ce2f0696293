"""The Trainer's run state on disk: ``resume.pt`` after every epoch, and resuming from it.

``Trainer(..., checkpoint_dir=d)`` writes, besides ``best.pt``:

* ``d/resume.pt`` after every epoch (:func:`neuroexapt.save` format): the model (gates not
  folded in) with its edit history, the optimizer, and as policy state the Trainer's own:
  the epoch, the history, the best metric, the feedback factor, the gates and their
  optimizer, the scheduler and the global torch random state (the gates' noise and dropout
  draw from it);
* ``d/resume_pending.pt`` while a structural change awaits its rollback check (the model and
  optimizer state from before the change), removed once the change is kept or undone.

``trainer.fit(train, val, epochs, resume=True)`` on a Trainer built as at the start of the run
(the same model definition, unedited, and optimizer) replays the edits in place, loads every
state and goes on from the next epoch: with the same data order, the run continues as if it
had never stopped. Both files are written atomically (a temporary file renamed), so a run
killed at any moment resumes from the last complete epoch. (``best.pt`` is the model to use;
``resume.pt`` is for resuming.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import CheckpointError, ConfigError
from neuroexapt.ops.checkpoint import restore, save
from neuroexapt.policy.rollback import Snapshot

logger = logging.getLogger(__name__)

__all__ = ["PENDING_FILE", "RESUME_FILE", "RunState", "read_run", "write_run"]

RESUME_FILE, PENDING_FILE = "resume.pt", "resume_pending.pt"
_KIND = "neuroexapt-trainer"


@dataclass
class RunState:
    """Where a Trainer run stands after an epoch (plain data and tensors)."""

    epoch: int
    history: dict[str, list[float]]
    best: float
    feedback: float
    gates: dict[str, torch.Tensor]
    gate_optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: torch.Tensor
    pending: bool  # a change awaits its rollback check (in resume_pending.pt)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": _KIND, **vars(self)}


class _Before:
    """The optimizer state and metric from before a pending change (its file's policy)."""

    def __init__(self, optimizer_state: dict[str, Any] | None, metric: float, epoch: int
                 ) -> None:
        self.optimizer_state, self.metric, self.epoch = optimizer_state, metric, epoch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": _KIND, "optimizer_state": self.optimizer_state, "metric": self.metric,
                "epoch": self.epoch}


def write_run(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
              state: RunState, pending: tuple[Snapshot, float] | None) -> None:
    """Write ``resume.pt`` (and ``resume_pending.pt`` while a change awaits its check)."""
    folder.mkdir(parents=True, exist_ok=True)
    assert state.pending == (pending is not None)
    if pending is not None:  # first: a resume.pt never points at a pending file not written
        snapshot, metric = pending
        save(snapshot.model, folder / PENDING_FILE,
             policy=_Before(snapshot.optimizer_state, metric, state.epoch))
    save(model, folder / RESUME_FILE, optimizer, policy=state)
    if pending is None:
        (folder / PENDING_FILE).unlink(missing_ok=True)


def read_run(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             unedited: Callable[[], nn.Module]) -> tuple[dict[str, Any],
                                                          tuple[Snapshot, float] | None]:
    """Restore ``model`` and ``optimizer`` in place from ``path`` (a ``resume.pt``); returns the
    Trainer's saved state and the pending change's snapshot and metric (None without one).
    ``unedited`` makes a copy of the model as built, called only when a change is pending.

    Raises:
        ConfigError: no such file.
        CheckpointError: not a Trainer's ``resume.pt``, or one of another model.
    """
    if not path.is_file():
        raise ConfigError(f"resume: no checkpoint '{path}'; pass resume=True with the "
                          "checkpoint_dir of the run, or the path of its resume.pt")
    state = restore(path, model, optimizer)
    if not state or state.get("kind") != _KIND:
        raise CheckpointError(f"'{path}' is not a Trainer's resume.pt (it has no Trainer state)")
    pending = None
    if state.get("pending"):  # a resume_pending.pt of another epoch is left over from a kill
        before = path.parent / PENDING_FILE
        fresh = unedited()
        saved = restore(before, fresh) if before.is_file() else None
        if not saved or saved.get("kind") != _KIND or saved.get("epoch") != state["epoch"]:
            raise CheckpointError(f"'{path}' awaits the rollback check of a change but "
                                  f"'{before}' is missing or of another epoch")
        pending = (Snapshot(fresh, saved["optimizer_state"]), float(saved["metric"]))
    logger.info("resumed from %s after epoch %d%s", path, state["epoch"],
                " (a change awaits its rollback check)" if pending else "")
    return state, pending
