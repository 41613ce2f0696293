"""DNMFramework: Dynamic Neural Morphogenesis, the training-loop API of the first design document.

A thin facade over the analysis engine (:mod:`neuroexapt.metrics`), the policy parts
(:mod:`neuroexapt.policy`) and the edits (:mod:`neuroexapt.ops`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError, NeuroExaptError
from neuroexapt.graph import trace
from neuroexapt.metrics.report import AnalysisReport, LayerAnalysis
from neuroexapt.ops import EditRecord, add_skip, deepen, widen
from neuroexapt.ops.edit import count_parameters
from neuroexapt.policy.analyzer import LayerPerformanceAnalyzer
from neuroexapt.policy.config import DNMConfig
from neuroexapt.policy.connections import ConnectionGrowthManager
from neuroexapt.policy.division import AdaptiveNeuronDivision
from neuroexapt.policy.events import EventLog, MorphogenesisEvent
from neuroexapt.policy.rollback import Snapshot
from neuroexapt.policy.triggers import MorphogenesisTrigger

logger = logging.getLogger(__name__)

__all__ = ["DNMFramework", "DNMNet2Net"]

Batch = tuple[Any, torch.Tensor]


class DNMNet2Net:
    """Function-preserving transfers used by DNM: the core edits, verified."""

    @staticmethod
    def split(model: nn.Module, layer: str, units: list[int], **kw: Any) -> EditRecord:
        """Net2WiderNet: duplicate ``units`` of ``layer`` (outputs unchanged)."""
        return widen(model, layer, len(units), units=units, verify=True, **kw)

    @staticmethod
    def deeper(model: nn.Module, layer: str, **kw: Any) -> EditRecord:
        """Net2DeeperNet: an identity-initialised layer after ``layer``."""
        return deepen(model, layer, verify=True, **kw)

    @staticmethod
    def connect(model: nn.Module, src: str, dst: str, **kw: Any) -> EditRecord:
        """A zero-initialised skip connection from ``src`` into ``dst``."""
        return add_skip(model, src, dst, verify=True, **kw)


class DNMFramework:
    """Grows a model where it is short of capacity, while it trains.

    Args:
        model: the model, edited in place (``dnm.model`` is the same object).
        config: the design document's dict (or a :class:`DNMConfig`); unknown keys are rejected.
        optimizer: the optimizer that trains ``model``; its state follows every change. Without
            it, the first morphogenesis raises :class:`ConfigError` (a new parameter that no
            optimizer updates would silently stay at its initial value).
        probe: ``(inputs, targets)`` batches (a DataLoader or a list, or one batch) the
            framework analyses with its own hooks when ``update_caches()`` gets no arguments.
        example_inputs: a batch the model accepts, for tracing (default: the probe's first).
        task_type: ``"classification"`` or ``"regression"``.
        loss_fn: the loss used for gradients and sensitivity (default by task type).
        layers: layers to analyse (names or types; default every Conv and Linear).
        events_path: JSON-lines file receiving every :class:`MorphogenesisEvent`.
        seed: seed of the separation noise.

    Example:
        >>> dnm = DNMFramework(model, {"morphogenesis_interval": 3}, optimizer=opt,
        ...                    probe=val_batches)
        >>> for epoch in range(epochs):
        ...     ...  # train, validate
        ...     dnm.update_caches()
        ...     dnm.record_performance(val_acc)
        ...     go, reasons = dnm.should_trigger_morphogenesis(epoch + 1, train_m, val_m)
        ...     if go:
        ...         results = dnm.execute_morphogenesis(epoch + 1)
    """

    def __init__(
        self, model: nn.Module, config: Mapping[str, Any] | DNMConfig | None = None, *,
        optimizer: torch.optim.Optimizer | None = None, probe: Any = None,
        example_inputs: Any = None, task_type: str = "classification",
        loss_fn: Callable[..., torch.Tensor] | None = None, layers: Any = None,
        events_path: str | None = None, seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        self.config = DNMConfig.from_dict(config)
        self._model = model
        self.optimizer = optimizer
        self.probe = _as_probe(probe)
        self.example_inputs = example_inputs if example_inputs is not None else (
            _first_inputs(self.probe) if self.probe is not None else None)
        cfg = self.config
        self.analyzer = LayerPerformanceAnalyzer(
            cfg.bottleneck_detection_metrics, task_type=task_type, loss_fn=loss_fn,
            layers=layers, batches=cfg.analysis_batches)
        self.division = AdaptiveNeuronDivision(
            cfg.neuron_division_strategy, cfg.division_noise_scale,
            cfg.progressive_activation_epochs, cfg.division_fraction, seed)
        self.connections = ConnectionGrowthManager()
        self.net2net = DNMNet2Net()
        self.trigger = MorphogenesisTrigger(cfg)
        self.events = EventLog(events_path)
        self.report: AnalysisReport | None = None
        self._snapshot: tuple[Snapshot, float | None, int] | None = None  # (state, metric, until)
        self._epoch = 0

    @property
    def model(self) -> nn.Module:
        """The model being grown (the object passed in, edited in place)."""
        return self._model

    # ------------------------------------------------------------------ measurements
    def update_caches(self, activations: Mapping[str, torch.Tensor] | None = None,
                      gradients: Mapping[str, torch.Tensor] | None = None,
                      targets: torch.Tensor | None = None) -> AnalysisReport:
        """Measure the layers: from the given tensors, or from the probe with own hooks."""
        if activations is not None:
            held = next(iter(self.probe)) if self.probe is not None else None
            self.report = self.analyzer.from_tensors(self._model, activations, gradients,
                                                     targets, held)
        elif self.probe is not None:
            self.report = self.analyzer.from_probe(self._model, self.probe)
        else:
            raise ConfigError(
                "update_caches() has nothing to measure: give DNMFramework a probe= of "
                "(inputs, targets) batches, or pass activations={layer: tensor}, "
                "gradients={layer: tensor} and targets"
            )
        return self.report

    def record_performance(self, val_metric: float) -> None:
        """Record the validation metric of the epoch just finished (higher is better)."""
        value = float(val_metric)
        if value != value:  # NaN
            raise ConfigError("record_performance got NaN; pass the validation metric")
        self._epoch += 1
        self.trigger.record(value)
        self.events.update_metric_after(value)
        self.division.step_epoch(self._model)
        self._check_rollback(value)

    def should_trigger_morphogenesis(
        self, epoch: int, train_metrics: Mapping[str, float] | None = None,
        val_metrics: Mapping[str, float] | None = None,
    ) -> tuple[bool, list[str]]:
        """Whether to change the architecture now, with the measured reasons."""
        evidence = []
        for layer in (self.report.bottlenecks() if self.report is not None else []):
            evidence.append(f"'{layer.name}': " + "; ".join(str(r) for r in layer.reasons))
        return self.trigger.check(int(epoch), evidence)

    # ------------------------------------------------------------------ changes
    def execute_morphogenesis(self, epoch: int) -> dict[str, Any]:
        """Apply up to ``max_morphogenesis_per_epoch`` changes at the ranked bottlenecks."""
        if self.optimizer is None:
            raise ConfigError(
                "execute_morphogenesis needs the optimizer: create DNMFramework(model, config, "
                "optimizer=optimizer) or set dnm.optimizer = optimizer, so that new parameters "
                "are trained and the optimizer's state follows each change"
            )
        if self.example_inputs is None:
            raise ConfigError("give DNMFramework example_inputs= or a probe= to trace the model")
        if self.report is None:
            self.update_caches()
        assert self.report is not None
        cfg = self.config
        budget = min(cfg.max_morphogenesis_per_epoch,
                     cfg.max_architecture_changes - self.trigger.changes)
        before = count_parameters(self._model)
        snapshot = Snapshot.take(self._model, self.optimizer) if cfg.rollback_enabled else None
        new_events: list[MorphogenesisEvent] = []
        for layer in self.report.bottlenecks():
            if len(new_events) >= budget:
                break
            event = self._change(layer, epoch)
            if event is not None:
                new_events.append(event)
        if new_events:
            self.trigger.changes += len(new_events)
            self.trigger.evaluating_until = epoch + cfg.evaluation_window
            metric = self.trigger.history[-1] if self.trigger.history else None
            if snapshot is not None:  # evaluated over the next evaluation_window records
                self._snapshot = (snapshot, metric, self._epoch + cfg.evaluation_window)
            self.report = None  # measurements of the old architecture
        kinds = [e.kind for e in new_events]
        return {
            "neuron_divisions": kinds.count("neuron_division"),
            "connections_added": kinds.count("connection_growth"),
            "layers_added": kinds.count("layer_addition"),
            "parameters_before": before,
            "parameters_after": count_parameters(self._model),
            "parameters_added": count_parameters(self._model) - before,
            "events": [e.to_dict() for e in new_events],
        }

    def _change(self, layer: LayerAnalysis, epoch: int) -> MorphogenesisEvent | None:
        reasons = [str(r) for r in layer.reasons]
        kw = {"example_inputs": self.example_inputs, "optimizer": self.optimizer}
        metric = self.trigger.history[-1] if self.trigger.history else None
        attempts: list[tuple[str, Callable[[], tuple[EditRecord, str] | None]]] = []
        lossy = any(r.metric == "information_flow" for r in layer.reasons)
        if lossy and self.config.allow_connections:
            attempts.append(("connection_growth", lambda: self._grow_connection()))
        stats = self.report.stats.get(layer.name) if self.report is not None else None
        attempts.append(("neuron_division", lambda: (self.division.divide(
            self._model, layer.name, stats=stats, **kw), layer.name)))
        if self.config.allow_deepen and not self._is_output(layer.name):
            attempts.append(("layer_addition", lambda: (self.net2net.deeper(
                self._model, layer.name, **kw), layer.name)))
        limit = self.config.max_parameters
        for kind, attempt in attempts:
            before = count_parameters(self._model)
            if limit is not None and before >= limit:
                return None
            undo = Snapshot.take(self._model, self.optimizer) if limit is not None else None
            pending, connected = list(self.division.pending), set(self.connections.connected)
            try:
                done = attempt()
            except NeuroExaptError as e:
                logger.info("%s at '%s' not possible: %s", kind, layer.name, e)
                continue
            if done is None:
                continue
            if undo is not None and limit is not None and count_parameters(self._model) > limit:
                undo.restore(self._model, self.optimizer)
                self.division.pending[:] = pending
                self.connections.connected = connected
                logger.info("%s at '%s' would exceed max_parameters=%d; undone", kind,
                            layer.name, limit)
                continue
            record, where = done
            event = MorphogenesisEvent(epoch, kind, where, reasons, before,
                                       count_parameters(self._model), metric,
                                       details=dict(record.args))
            self.events.add(event)
            return event
        return None

    def _is_output(self, layer: str) -> bool:
        """Whether ``layer`` computes the model's output (deepening there adds no capacity)."""
        return trace(self._model, self.example_inputs).produces_output(layer)

    def _grow_connection(self) -> tuple[EditRecord, str] | None:
        assert self.report is not None
        done = self.connections.grow(self._model, self.report, self.report.order,
                                     example_inputs=self.example_inputs,
                                     optimizer=self.optimizer)
        if done is None:
            return None
        record, _ = done
        return record, record.target

    def _check_rollback(self, value: float) -> None:
        if self._snapshot is None:
            return
        snapshot, before, until = self._snapshot
        drop = (before - value) if before is not None else 0.0
        if self.config.rollback_enabled and drop > self.config.performance_drop_threshold:
            params = count_parameters(self._model)
            snapshot.restore(self._model, self.optimizer)
            self.division.pending.clear()
            self.events.add(MorphogenesisEvent(
                self._epoch, "rollback", "*",
                [f"validation fell by {drop:.4f} > performance_drop_threshold="
                 f"{self.config.performance_drop_threshold}"],
                params, count_parameters(self._model), before, value))
            self._snapshot = None
        elif self._epoch >= until:
            self._snapshot = None


def _as_probe(probe: Any) -> Iterable[Batch] | None:
    if probe is None:
        return None
    if isinstance(probe, tuple) and len(probe) == 2 and isinstance(probe[1], torch.Tensor):
        return [probe]
    if not hasattr(probe, "__iter__"):
        raise ConfigError(f"probe must be an (inputs, targets) batch or an iterable of them, "
                          f"got {type(probe).__name__}")
    return probe


def _first_inputs(probe: Iterable[Batch]) -> Any:
    for x, _ in probe:
        return x[:8] if isinstance(x, torch.Tensor) else tuple(t[:8] for t in x)
    raise ConfigError("the probe yielded no batch")
