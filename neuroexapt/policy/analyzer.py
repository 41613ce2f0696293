"""LayerPerformanceAnalyzer: the DNM view of the analysis engine."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError
from neuroexapt.metrics.analyze import analyze, report_from_stats
from neuroexapt.metrics.collector import CHANNELS_FIRST, LayerStats, _units_view
from neuroexapt.metrics.report import AnalysisReport

__all__ = ["LayerPerformanceAnalyzer"]

Batch = tuple[Any, torch.Tensor]


class LayerPerformanceAnalyzer:
    """Measures layers with the configured ``bottleneck_detection_metrics`` and ranks them.

    Either from probe batches (its own hooks: :meth:`from_probe`) or from activations,
    gradients and targets gathered by the caller (:meth:`from_tensors`).
    """

    def __init__(self, metrics: Sequence[str], *, task_type: str = "classification",
                 loss_fn: Callable[..., torch.Tensor] | None = None,
                 layers: Any = None, batches: int = 4) -> None:
        self.metrics = tuple(metrics)
        self.task_type, self.loss_fn, self.layers, self.batches = (
            task_type, loss_fn, layers, batches)

    def from_probe(self, model: nn.Module, probe: Iterable[Batch]) -> AnalysisReport:
        """Run the probe batches through the model (eval mode) and rank the layers."""
        batches = list(itertools.islice(iter(probe), self.batches))
        return analyze(model, batches, layers=self.layers, metrics=self.metrics,
                       batches=self.batches, task_type=self.task_type, loss_fn=self.loss_fn)

    def from_tensors(
        self, model: nn.Module, activations: Mapping[str, torch.Tensor],
        gradients: Mapping[str, torch.Tensor] | None, targets: torch.Tensor | None,
        held_out: Batch | None = None,
    ) -> AnalysisReport:
        """Rank layers from ``{layer: activation}``, ``{layer: gradient}`` and targets."""
        if not isinstance(activations, Mapping) or not activations:
            raise ConfigError(
                "activations must be a dict {layer name: output tensor [N, ...]}; or call "
                "update_caches() with no arguments and give DNMFramework a probe= batch"
            )
        modules = dict(model.named_modules())
        stats: dict[str, LayerStats] = {}
        for name, act in activations.items():
            if name not in modules:
                raise ConfigError(f"activations names an unknown layer '{name}'")
            stats[name] = _fill(name, modules[name], act, (gradients or {}).get(name), targets)
        return report_from_stats(model, stats, list(activations), metrics=self.metrics,
                                 task_type=self.task_type, loss_fn=self.loss_fn,
                                 held_out=held_out, batches=1)


def _fill(name: str, module: nn.Module, act: torch.Tensor, grad: torch.Tensor | None,
          targets: torch.Tensor | None) -> LayerStats:
    stats = LayerStats(name, reservoir=512, seed=0, saturation=None)
    unit_dim = 1 if isinstance(module, CHANNELS_FIRST) or act.ndim >= 4 else -1
    values = _units_view(act.detach(), unit_dim)  # [N, D, P]
    stats.record(values, values.transpose(1, 2).reshape(-1, values.shape[1]), targets)
    if grad is not None:
        g = _units_view(grad.detach(), unit_dim)
        stats.record_gradient(g, g.transpose(1, 2).reshape(-1, g.shape[1]))
    return stats
