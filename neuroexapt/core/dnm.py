"""DNMFramework: Dynamic Neural Morphogenesis, the training-loop API of the first design document.

A thin facade over the analysis engine (:mod:`neuroexapt.metrics`), the policy parts
(:mod:`neuroexapt.policy`) and the edits (:mod:`neuroexapt.ops`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from neuroexapt.distributed import broadcast, is_distributed, rewrap, split_ddp, synchronize
from neuroexapt.errors import ConfigError, NeuroExaptError
from neuroexapt.graph import graph_cache
from neuroexapt.graph.wrappers import refuse_fullgraph
from neuroexapt.metrics.analyze import report_from_stats
from neuroexapt.metrics.cost import count_macs
from neuroexapt.metrics.recorder import BypassGradient, TrainingRecorder
from neuroexapt.metrics.report import AnalysisReport
from neuroexapt.ops import EditRecord, add_skip, deepen, widen
from neuroexapt.ops.edit import count_parameters
from neuroexapt.ops.history import get_history
from neuroexapt.optim.discover import OptimizerWatch
from neuroexapt.policy.analyzer import LayerPerformanceAnalyzer
from neuroexapt.policy.config import DNMConfig
from neuroexapt.policy.connections import ConnectionGrowthManager
from neuroexapt.policy.division import AdaptiveNeuronDivision, _Separation
from neuroexapt.policy.events import EventLog, MorphogenesisEvent
from neuroexapt.policy.expansion import Expander, Expansion, room_units
from neuroexapt.policy.growth import GrowthSchedule, LearningRateBoost, _Boosted
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

    The design document's loop works as written: ``DNMFramework(model, config)`` needs nothing
    else. The framework records statistics from every ``record_every``-th training batch with
    its own hooks (:class:`~neuroexapt.metrics.recorder.TrainingRecorder`), takes the inputs
    it traces with from them, and finds the optimizer that trains the model from the
    optimizer's own steps (:class:`~neuroexapt.optim.discover.OptimizerWatch`).

    Under ``torch.distributed`` (``torchrun``), pass the ``DistributedDataParallel`` model:
    statistics are all-reduced, rank 0's decisions are broadcast, every rank applies the same
    edits (verified), and the wrapper is rebuilt around the edited module after each change.
    Train with ``dnm.model`` (the current wrapper) from then on; the old one refuses to run
    (see :mod:`neuroexapt.distributed`).

    Args:
        model: the model, edited in place (``dnm.model`` is the same object, or the current
            DistributedDataParallel wrapper).
        config: the design document's dict (or a :class:`DNMConfig`); unknown keys are rejected.
        optimizer: the optimizer that trains ``model``; found by itself when omitted (two
            optimizers stepping the model, or none by the first change, raise
            :class:`ConfigError`). Its state follows every change.
        probe: optional ``(inputs, targets)`` batches (a DataLoader or a list, or one batch)
            that ``update_caches()`` analyses instead of the recorded training batches.
        example_inputs: a batch the model accepts, for tracing (default: the probe's first or
            the first recorded training batch).
        task_type: ``"classification"`` or ``"regression"``.
        loss_fn: the loss used for gradients and sensitivity (default by task type).
        layers: layers to analyse (names or types; default every Conv and Linear).
        events_path: JSON-lines file receiving every :class:`MorphogenesisEvent`.
        seed: seed of the separation noise and the new units' initialisation.

    Example:
        >>> dnm = DNMFramework(model, {"morphogenesis_interval": 3})
        >>> for epoch in range(epochs):
        ...     ...  # train, validate
        ...     dnm.update_caches()
        ...     dnm.record_performance(val_acc)
        ...     go, reasons = dnm.should_trigger_morphogenesis(epoch + 1, train_m, val_m)
        ...     if go:
        ...         results = dnm.execute_morphogenesis(epoch + 1)
    """

    #: ``update_caches()`` from the training batches measures ``performance_sensitivity``
    #: (a forward pass per layer) on this many candidates only: the layers the other metrics
    #: score highest.
    ablate_top: int | None = 3

    def __init__(
        self, model: nn.Module, config: Mapping[str, Any] | DNMConfig | None = None, *,
        optimizer: torch.optim.Optimizer | None = None, probe: Any = None,
        example_inputs: Any = None, task_type: str = "classification",
        loss_fn: Callable[..., torch.Tensor] | None = None, layers: Any = None,
        events_path: str | None = None, seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer= must be a torch.optim.Optimizer, got {optimizer!r}")
        self.config = DNMConfig.from_dict(config)
        refuse_fullgraph(model, "DNMFramework")
        model, self._ddp = split_ddp(model)
        self._model = model
        self.optimizer = optimizer
        self.probe = _as_probe(probe)
        self.example_inputs = example_inputs if example_inputs is not None else (
            _first_inputs(self.probe) if self.probe is not None else None)
        cfg = self.config
        self.seed = seed
        self.analyzer = LayerPerformanceAnalyzer(
            cfg.bottleneck_detection_metrics, task_type=task_type, loss_fn=loss_fn,
            layers=layers, batches=cfg.analysis_batches)
        self.division = AdaptiveNeuronDivision(
            cfg.neuron_division_strategy, cfg.division_noise_scale,
            cfg.progressive_activation_epochs, cfg.division_fraction, seed)
        self.connections = ConnectionGrowthManager()
        self.expander = Expander(
            init=cfg.growth_init, cost=cfg.growth_cost, fraction=cfg.division_fraction,
            multiple=cfg.growth_multiple, division=self.division, connections=self.connections,
            allow_deepen=cfg.allow_deepen, allow_connections=cfg.allow_connections, seed=seed)
        self.net2net = DNMNet2Net()
        self.trigger = MorphogenesisTrigger(cfg)
        self.events = EventLog(events_path)
        self.boost = LearningRateBoost(cfg.new_unit_lr_scale, cfg.new_unit_lr_epochs)
        self.report: AnalysisReport | None = None
        self.schedule: GrowthSchedule | None = None
        self._snapshot: tuple[Snapshot, float | None, int] | None = None  # (state, metric, until)
        self._epoch = 0
        self._bypass: dict[str, BypassGradient] = {}
        if cfg.growth_budget is not None and (cfg.growth_cost == "parameters"
                                              or self.example_inputs is not None):
            self._make_schedule()  # a budget below the current size fails here, early
        self.recorder = TrainingRecorder(model, layers, every=cfg.record_every, seed=seed)
        self._watch = OptimizerWatch(model) if optimizer is None else None

    @property
    def model(self) -> nn.Module:
        """The model being grown (the object passed in, edited in place; under DDP the current
        DistributedDataParallel wrapper, rebuilt after each change)."""
        return self._ddp if self._ddp is not None else self._model

    def close(self) -> None:
        """Remove every hook the framework installed (model, optimizer and global hooks)."""
        self.recorder.close()
        self.boost.remove_hooks()
        if self._watch is not None:
            self._watch.close()

    # ------------------------------------------------------------------ measurements
    def update_caches(self, activations: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
                      | None = None,
                      gradients: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
                      | None = None,
                      targets: torch.Tensor | None = None) -> AnalysisReport:
        """Measure the layers, and take the growth statistics recorded since the last call.

        With no arguments: from the probe when one was given, else from the training batches
        recorded by the framework's hooks. ``activations`` and ``gradients`` may be dicts
        ``{layer name: tensor}`` or lists in the order of :attr:`layers`.
        """
        if activations is not None:
            acts = self._by_layer(activations, "activations")
            grads = self._by_layer(gradients, "gradients") if gradients is not None else None
            held = next(iter(self.probe)) if self.probe is not None else None
            self.report = self.analyzer.from_tensors(self._model, acts, grads, targets, held)
        elif self.probe is not None:
            self.report = self.analyzer.from_probe(self._model, self.probe)
        else:
            self.report = self._report_from_training()
        self._take_bypass()
        return self.report

    @property
    def layers(self) -> list[str]:
        """The analysed layers, in model order (the order of list arguments)."""
        return list(self.recorder.layers)

    def _by_layer(self, values: Any, what: str) -> dict[str, torch.Tensor]:
        if isinstance(values, Mapping):
            unknown = [k for k in values if k not in self.recorder.stats]
            if unknown:
                raise ConfigError(
                    f"update_caches {what} names layer {unknown[0]!r}, which is not an "
                    f"analysed layer; use names from dnm.layers: {self.layers}")
            return dict(values)
        if isinstance(values, Sequence) and not isinstance(values, str | bytes):
            if len(values) != len(self.layers):
                raise ConfigError(
                    f"update_caches got {len(values)} {what} but the model has "
                    f"{len(self.layers)} analysed layers ({self.layers}); pass one tensor per "
                    "layer in that order, or a dict {layer name: tensor}")
            return dict(zip(self.layers, values, strict=True))
        raise ConfigError(f"update_caches {what} must be a dict {{layer name: tensor}} or a "
                          f"list of tensors in the order of dnm.layers, got "
                          f"{type(values).__name__}")

    def _report_from_training(self) -> AnalysisReport:
        rec = self.recorder
        if rec.error is not None:
            raise NeuroExaptError(
                f"recording statistics from the training batches failed: {rec.error}; give "
                "DNMFramework a probe= of (inputs, targets) batches to measure the layers")
        if not rec.recorded:
            raise ConfigError(
                "update_caches() found no recorded training batch: call it after training "
                "steps (forward and backward in train mode; every "
                f"{self.config.record_every}th batch is recorded, record_every), or give "
                "DNMFramework a probe= of (inputs, targets) batches")
        stats = {n: s for n, s in rec.stats.items() if s.batches}
        order = [n for n in rec.layers if n in stats]
        held = rec.last_batch if rec.labels_inferred else None
        metrics = [m for m in self.config.bottleneck_detection_metrics
                   if held is not None or m not in ("information_flow",)]
        report = report_from_stats(self._model, stats, order, metrics=metrics,
                                   task_type=self.analyzer.task_type,
                                   loss_fn=self.analyzer.loss_fn, held_out=held,
                                   batches=rec.recorded, ablate_top=self.ablate_top)
        if held is None:
            for r in report.layers:
                r.warnings.append("no labels could be recovered from the loss gradient (not a "
                                  "softmax cross-entropy): information_flow and "
                                  "performance_sensitivity left out; pass a probe= for them")
        return report

    def _take_bypass(self) -> None:
        """Keep the recorded growth statistics for the next decision; start new ones."""
        fresh = {k: v for k, v in self.recorder.growth.items() if v.batches}
        if fresh:
            self._bypass = fresh
        if self.example_inputs is None and self.recorder.example_inputs is not None:
            self.example_inputs = self.recorder.example_inputs
        self.recorder.reset()

    def record_performance(self, val_metric: float) -> None:
        """Record the validation metric of the epoch just finished (higher is better)."""
        value = float(val_metric)
        if value != value:  # NaN
            raise ConfigError("record_performance got NaN; pass the validation metric")
        self._epoch += 1
        self.trigger.record(value)
        self.events.update_metric_after(value)
        self.division.step_epoch(self._model)
        self.boost.step_epoch(self._model)
        self._check_rollback(value)

    def should_trigger_morphogenesis(
        self, epoch: int, train_metrics: Mapping[str, float] | None = None,
        val_metrics: Mapping[str, float] | None = None,
    ) -> tuple[bool, list[str]]:
        """Whether to change the architecture now, with the measured reasons."""
        evidence = []
        for layer in (self.report.bottlenecks() if self.report is not None else []):
            evidence.append(f"'{layer.name}': " + "; ".join(str(r) for r in layer.reasons))
        epoch = int(epoch)
        schedule = self._schedule_for_decision()
        if schedule is not None and self.trigger.changes < self.config.max_architecture_changes:
            if schedule.due(epoch):
                return True, [f"growth schedule: step {schedule.done + 1} of "
                              f"{len(schedule.epochs)} at epoch {epoch} (steps at epochs "
                              f"{schedule.epochs}; budget {schedule.budget:,.0f} "
                              f"{self.config.growth_cost})", *evidence]
            if epoch > schedule.epochs[-1]:
                return False, [f"growth budget is spent by epoch {schedule.epochs[-1]} "
                               f"(growth_by={self.config.growth_by})"]
        return broadcast(self.trigger.check(epoch, evidence))  # rank 0 decides for all

    # ------------------------------------------------------------------ changes
    def execute_morphogenesis(self, epoch: int) -> dict[str, Any]:
        """Apply the growth step or up to ``max_morphogenesis_per_epoch`` changes.

        Returns the counts of the document (``neuron_divisions``, ``connections_added``,
        ``layers_added``), the parameters before and after, and the events.
        """
        if self.optimizer is None:
            assert self._watch is not None
            self.optimizer = self._watch.optimizer("execute_morphogenesis")
        if self.example_inputs is None:
            self.example_inputs = self.recorder.example_inputs
        if self.example_inputs is None:
            raise ConfigError(
                "execute_morphogenesis has no inputs to trace the model with: call it after "
                "training steps (the framework takes them from the first recorded batch), or "
                "pass DNMFramework(..., example_inputs=batch) or probe=")
        if self.report is None and (self.probe is not None or self.recorder.recorded):
            self.update_caches()
        if not self._bypass and self.recorder.growth:
            self._take_bypass()
        cfg = self.config
        before = count_parameters(self._model)
        since = len(get_history(self._model))
        snapshot = Snapshot.take(self._model, self.optimizer) \
            if cfg.rollback_enabled or is_distributed() else None
        schedule = self._schedule_for_decision()
        scheduled = schedule is not None and schedule.due(int(epoch))
        with graph_cache(self._model):
            if scheduled:
                assert schedule is not None
                new_events = self._grow_step(epoch, schedule)
            else:
                budget = min(cfg.max_morphogenesis_per_epoch,
                             cfg.max_architecture_changes - self.trigger.changes)
                new_events = self._grow_ranked(epoch, budget, schedule)
        if scheduled:
            assert schedule is not None
            schedule.done += 1  # a step that fit nothing leaves its share to the next ones
        if is_distributed():  # every rank holds rank 0's edits, weights and optimizer state
            synchronize(self._model, self.optimizer, since, snapshot)
            new_events = broadcast(new_events)
            if self._ddp is not None and len(get_history(self._model)) > since:
                self._ddp = rewrap(self._ddp, self._model)
        if new_events:
            self.trigger.changes += 1 if scheduled else len(new_events)
            self.trigger.evaluating_until = epoch + cfg.evaluation_window
            metric = self.trigger.history[-1] if self.trigger.history else None
            if snapshot is not None:  # evaluated over the next evaluation_window records
                self._snapshot = (snapshot, metric, self._epoch + cfg.evaluation_window)
            self.report = None  # measurements of the old architecture
            self._bypass = {}
            self.recorder.attach()  # new modules; attach() starts new statistics
        else:
            logger.warning("execute_morphogenesis at epoch %s changed nothing: %s", epoch,
                           self._why_nothing())
        self._update_recording()
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

    # ------------------------------------------------------------------ growth policy
    def _cost(self) -> float:
        if self.config.growth_cost == "parameters":
            return float(count_parameters(self._model))
        assert self.example_inputs is not None
        inputs = self.example_inputs
        one = inputs[:1] if isinstance(inputs, torch.Tensor) else tuple(t[:1] for t in inputs)
        return float(count_macs(self._model, one))

    def _make_schedule(self) -> None:
        cfg = self.config
        current = self._cost()
        target = cfg.growth_target(current)
        assert target is not None and cfg.total_epochs is not None
        self.schedule = GrowthSchedule(current, target, cfg.total_epochs, cfg.growth_by,
                                       cfg.growth_steps)

    def _schedule_for_decision(self) -> GrowthSchedule | None:
        if self.config.growth_budget is None:
            return None
        if self.schedule is None:
            if self.example_inputs is None:
                self.example_inputs = self.recorder.example_inputs
            if self.example_inputs is None:
                return None  # no batch seen yet: the MAC budget is resolved at the first
            self._make_schedule()
        return self.schedule

    def _room(self, schedule: GrowthSchedule | None, current: float | None = None) -> float:
        """Cost that may still be added (the growth budget and max_parameters), given the
        model's ``current`` cost when it is known."""
        room = math.inf
        if schedule is not None:
            room = schedule.budget - (self._cost() if current is None else current)
        limit = self.config.max_parameters
        if limit is not None:
            left = limit - count_parameters(self._model)
            room = min(room, left if self.config.growth_cost == "parameters" else
                       (math.inf if left > 0 else 0.0))
        return room

    def _fits(self, schedule: GrowthSchedule | None) -> Callable[[], bool]:
        limit = self.config.max_parameters

        def fits() -> bool:
            if limit is not None and count_parameters(self._model) > limit:
                return False
            return schedule is None or self._cost() <= schedule.budget * (1 + 1e-9)
        return fits

    def _grow_step(self, epoch: int, schedule: GrowthSchedule) -> list[MorphogenesisEvent]:
        """One scheduled step: the step's budget handed out by marginal gain per cost."""
        options = self.expander.options(self._model, self.example_inputs, self._bypass)
        current = self._cost()
        room = self._room(schedule, current)
        step = min(schedule.step_budget(current), room)
        made = self.expander.step(self._model, options, step, example_inputs=self.example_inputs,
                                  optimizer=self.optimizer,
                                  stats=self.report.stats if self.report is not None else None,
                                  epochs_left=self._epochs_left(), room=room)
        return [self._event(epoch, m) for m in made]

    def _grow_ranked(self, epoch: int, budget: int, schedule: GrowthSchedule | None
                     ) -> list[MorphogenesisEvent]:
        """Triggered growth: the best layers by gain per cost, ``division_fraction`` each."""
        options = self.expander.options(self._model, self.example_inputs, self._bypass)
        room = self._room(schedule)
        made = self.expander.expand(
            self._model, budget, example_inputs=self.example_inputs, optimizer=self.optimizer,
            options=options, report=self.report, max_units=lambda o: room_units(room, o),
            fits=self._fits(schedule), epochs_left=self._epochs_left())
        return [self._event(epoch, m) for m in made]

    def _event(self, epoch: int, made: Expansion) -> MorphogenesisEvent:
        """Log one change as an event (with the analysis' reasons), boost new units."""
        record = made.record
        if made.kind == "neuron_division":
            assert self.optimizer is not None
            self.boost.add(self._model, record, self.optimizer, self.example_inputs)
        reasons = list(made.reasons)
        if self.report is not None and made.layer in self.report.stats:
            reasons += [str(r) for r in self.report[made.layer].reasons if str(r) not in reasons]
        metric = self.trigger.history[-1] if self.trigger.history else None
        event = MorphogenesisEvent(epoch, made.kind, made.layer, reasons, record.params_before,
                                   record.params_after, metric, details=dict(record.args))
        self.events.add(event)
        return event

    def _growth_over(self) -> bool:
        """Whether no change can follow: changes spent, or every scheduled step taken."""
        if self.trigger.changes >= self.config.max_architecture_changes:
            return True
        schedule = self.schedule
        return schedule is not None and schedule.done >= len(schedule.epochs)

    def _update_recording(self) -> None:
        """Stop recording bypass gradients (the costly part) once no growth can use them."""
        self.recorder.record_growth = not self._growth_over()

    def _epochs_left(self) -> int | None:
        """record_performance calls still followed by training (None: run length unknown)."""
        total = self.config.total_epochs
        return None if total is None else total - 1 - self._epoch

    def _why_nothing(self) -> str:
        if self.trigger.changes >= self.config.max_architecture_changes:
            return "max_architecture_changes is spent"
        if not self._bypass and self.report is None:
            return ("no statistics: no training batch was recorded since the last change "
                    "(train between calls), and no probe= was given")
        if not self.expander.options(self._model, self.example_inputs, self._bypass):
            return ("no layer can grow: every analysed layer is an output layer, frozen, or "
                    "has no measured bypass gradient; see dnm.report.table()")
        return "the growth budget or max_parameters leaves no room for one more unit"

    def _check_rollback(self, value: float) -> None:
        if self._snapshot is None:
            return
        snapshot, before, until = self._snapshot
        drop = broadcast((before - value) if before is not None else 0.0)  # rank 0's metric
        if self.config.rollback_enabled and drop > self.config.performance_drop_threshold:
            params = count_parameters(self._model)
            snapshot.restore(self._model, self.optimizer)
            self.division.pending.clear()
            self.boost.clear()
            self.report, self._bypass = None, {}
            self.recorder.attach()  # the restored modules are new objects
            if self._ddp is not None:
                self._ddp = rewrap(self._ddp, self._model)
            self.events.add(MorphogenesisEvent(
                self._epoch, "rollback", "*",
                [f"validation fell by {drop:.4f} > performance_drop_threshold="
                 f"{self.config.performance_drop_threshold}"],
                params, count_parameters(self._model), before, value))
            self._snapshot = None
        elif self._epoch >= until:
            self._snapshot = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The policy's state as plain data: triggers, budget, pending separations, events.

        ``neuroexapt.save(model, path, optimizer, policy=dnm)`` stores it in the checkpoint;
        ``load(...).policy_state`` gives it back for :meth:`load_state_dict` on a framework
        built around the loaded model, so a resumed run neither repeats nor forgets changes.
        A rollback snapshot in evaluation is not kept (the resumed run evaluates no pending
        change).
        """
        names = {id(p): n for n, p in self._model.named_parameters()}
        pending = [{"epochs_left": sep.epochs_left,
                    "scale": sep.scale,
                    "tensors": [[names[id(p)], dim, orig, copy]
                                for p, dim, orig, copy in sep.tensors if id(p) in names]}
                   for sep in self.division.pending]
        boosted = [[names[id(e.param)], e.dim, e.index, e.epochs_left]
                   for e in self.boost.entries if id(e.param) in names]
        return {
            "epoch": self._epoch,
            "history": list(self.trigger.history),
            "changes": self.trigger.changes,
            "evaluating_until": self.trigger.evaluating_until,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "connected": [list(p) for p in sorted(self.connections.connected)],
            "pending": pending,
            "boosted": boosted,
            "events": [e.to_dict() for e in self.events.events],
            "generator": self.division._gen.get_state(),
            "grown": self.expander._made,  # growths so far: each seeds its new units' fan-in
            # what the recorder holds since the last change, and its sampling, so that a
            # resumed run records and decides what an uninterrupted one would
            "recorder": self.recorder.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after the model and optimizer were restored)."""
        recorder = state.get("recorder") if isinstance(state, Mapping) else None
        if isinstance(recorder, Mapping) and "stats" in recorder:
            self.recorder.check_state(dict(recorder))  # before anything changes
        try:
            params = dict(self._model.named_parameters())
            self._epoch = int(state["epoch"])
            self.trigger.history = [float(v) for v in state["history"]]
            self.trigger.changes = int(state["changes"])
            self.trigger.evaluating_until = int(state["evaluating_until"])
            if state["schedule"] is not None:
                if self.schedule is None:
                    cfg = self.config
                    assert cfg.total_epochs is not None
                    self.schedule = GrowthSchedule(0.0, 0.0, cfg.total_epochs, cfg.growth_by,
                                                   cfg.growth_steps)
                self.schedule.load_state_dict(state["schedule"])
            self.connections.connected = {tuple(p) for p in state["connected"]}
            self.division.pending = [
                _Separation([(params[n], int(d), o, c) for n, d, o, c in sep["tensors"]],
                            int(sep["epochs_left"]), float(sep["scale"]))
                for sep in state["pending"]]
            self.boost.clear()
            for n, d, idx, left in state["boosted"]:
                self.boost.entries.append(_Boosted(params[n], int(d), idx, int(left)))
            if self.boost.entries:
                if self.optimizer is None:
                    raise ConfigError("the checkpoint boosts new units' learning rate: pass "
                                      "DNMFramework(..., optimizer=optimizer) before loading")
                self.boost._hook(self.optimizer)
            self.events.events = [MorphogenesisEvent(**e) for e in state["events"]]
            self.division._gen.set_state(state["generator"])
            self.expander._made = int(state.get("grown", 0))  # absent in earlier versions
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"not a DNMFramework state (or one of another model): {e!r}") \
                from e
        self._snapshot, self.report, self._bypass = None, None, {}
        self.recorder.attach()
        if recorder:  # absent in checkpoints of earlier versions
            if "stats" in recorder:
                self.recorder.load_state_dict(recorder)
            else:  # sampling state only (earlier versions)
                self.recorder.steps = int(recorder["steps"])
                self.recorder._due = bool(recorder["due"])
                self.recorder._gen.set_state(recorder["generator"])
        self._update_recording()


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
