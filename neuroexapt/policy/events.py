"""Morphogenesis events: what changed, where, why, and what it measured."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EventLog", "MorphogenesisEvent"]

logger = logging.getLogger(__name__)

EVENT_KINDS = ("neuron_division", "layer_addition", "connection_growth", "rollback")


@dataclass
class MorphogenesisEvent:
    """One architecture change (or the rollback of one).

    Attributes:
        epoch: epoch at which it happened.
        kind: ``"neuron_division"``, ``"layer_addition"``, ``"connection_growth"`` or
            ``"rollback"``.
        layer: the layer edited (``"src->dst"`` for a connection).
        reasons: why, as measured (bottleneck metrics with values and thresholds).
        params_before: parameter count before.
        params_after: parameter count after.
        metric_before: validation metric recorded before the change.
        metric_after: validation metric recorded at the next epoch (filled in later).
        details: edit arguments (units split, modules inserted, ...).
    """

    epoch: int
    kind: str
    layer: str
    reasons: list[str]
    params_before: int
    params_after: int
    metric_before: float | None = None
    metric_after: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


class EventLog:
    """Events in memory and, when ``path`` is set, appended to a JSON-lines file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.events: list[MorphogenesisEvent] = []
        self._earlier = ""  # lines the file already held (an earlier run): kept on rewrites
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._earlier = self.path.read_text()
                if self._earlier and not self._earlier.endswith("\n"):
                    self._earlier += "\n"  # so that appended events start on their own line
                    self.path.write_text(self._earlier)

    def add(self, event: MorphogenesisEvent) -> None:
        """Record ``event`` (written at once, one JSON object per line)."""
        self.events.append(event)
        logger.info("epoch %d: %s at %s (%d -> %d parameters)", event.epoch, event.kind,
                    event.layer, event.params_before, event.params_after)
        self._write(event)

    def update_metric_after(self, metric: float) -> None:
        """Fill ``metric_after`` of the events that lack it (rewrites the file)."""
        changed = False
        for e in self.events:
            if e.metric_after is None and e.kind != "rollback":
                e.metric_after = metric
                changed = True
        if changed and self.path is not None:
            self.path.write_text(self._earlier + "".join(json.dumps(e.to_dict()) + "\n"
                                                         for e in self.events))

    def _write(self, event: MorphogenesisEvent) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(event.to_dict()) + "\n")
