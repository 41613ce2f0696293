"""Connection growth: skip connections around layers where information about the labels is lost."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import NeuroExaptError
from neuroexapt.metrics.report import AnalysisReport
from neuroexapt.ops import EditRecord, add_skip

logger = logging.getLogger(__name__)

__all__ = ["ConnectionGrowthManager"]


class ConnectionGrowthManager:
    """Adds a zero-initialised skip connection around the layer that loses most information.

    With the layers in execution order and ``I_i = I(L_i; Y)`` measured by the analysis, the
    loss at layer ``i`` is ``I_{i-1} - I_i``. Where it is at least ``min_loss`` nats, the output
    of layer ``i-1`` is connected into the input of the layer after ``i`` (``add_skip``), so
    what layer ``i`` discards can reach the next one. Pairs already connected are skipped.
    """

    def __init__(self, min_loss: float = 0.05) -> None:
        self.min_loss = min_loss
        self.connected: set[tuple[str, str]] = set()

    def candidates(self, report: AnalysisReport, order: list[str]) -> list[tuple[str, str, str]]:
        """(src, dst, reason) proposals, largest information loss first."""
        info = {x.name: x.metrics.get("information") for x in report.layers}
        ranked = [n for n in order if info.get(n) is not None]
        out = []
        for i in range(1, len(ranked) - 1):
            lost = info[ranked[i - 1]] - info[ranked[i]]
            pair = (ranked[i - 1], ranked[i + 1])
            if lost >= self.min_loss and pair not in self.connected:
                reason = (f"information_flow: '{ranked[i]}' loses {lost:.3f} nats about the "
                          f"labels (I={info[ranked[i - 1]]:.3f} -> {info[ranked[i]]:.3f})")
                out.append((lost, *pair, reason))
        return [(s, d, r) for _, s, d, r in sorted(out, reverse=True)]

    def grow(self, model: nn.Module, report: AnalysisReport, order: list[str], *,
             example_inputs: Any, optimizer: torch.optim.Optimizer | None,
             ) -> tuple[EditRecord, str] | None:
        """Add the best feasible connection; None when there is none."""
        for src, dst, reason in self.candidates(report, order):
            try:
                record = add_skip(model, src, dst, example_inputs=example_inputs,
                                  optimizer=optimizer, verify=True)
            except NeuroExaptError as e:
                logger.debug("skip %s -> %s not possible: %s", src, dst, e)
                continue
            self.connected.add((src, dst))
            return record, reason
        return None
