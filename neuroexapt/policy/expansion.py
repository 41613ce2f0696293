"""Where and how to grow: the one expansion policy of DNM, ``expand_layers`` and the Trainer.

:class:`Expander` turns measurements into function-preserving changes:

* **units** where they buy the most per cost (:mod:`neuroexapt.policy.growth`): layers ranked
  by the expected gain of ``fraction`` more units divided by their cost, or, for a scheduled
  step, units handed out one chunk at a time within the step's budget;
* a **skip connection** around a layer that loses information about the labels
  (``information_flow``), tried first for such a layer;
* **deepening** (an identity-initialised layer) where units cannot be added.

Without bypass-gradient statistics (a model whose layers have no dense consumer, or data that
was never recorded) it falls back to the analysis report's bottleneck ranking, trying a
Net2Net split, then a deeper layer, at each bottleneck. Every change is atomic: one that
raises, or that a caller's ``fits`` check refuses, leaves model and optimizer as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError, NeuroExaptError
from neuroexapt.graph import trace
from neuroexapt.metrics.collector import model_output
from neuroexapt.metrics.recorder import BypassGradient, TrainingRecorder
from neuroexapt.metrics.report import AnalysisReport
from neuroexapt.ops import EditRecord, deepen
from neuroexapt.ops.transaction import transaction
from neuroexapt.policy.connections import ConnectionGrowthManager
from neuroexapt.policy.division import AdaptiveNeuronDivision
from neuroexapt.policy.growth import (
    GrowthOption,
    allocate,
    grow_layer,
    growth_options,
    remap_directions,
)

logger = logging.getLogger(__name__)

__all__ = ["EXPAND_METHODS", "Expander", "Expansion", "measure_bypass"]

EXPAND_METHODS: tuple[str, ...] = ("mutate", "split", "deepen", "skip")
KINDS = {"units": "neuron_division", "skip": "connection_growth", "deepen": "layer_addition"}


@dataclass
class Expansion:
    """One change made: its kind (an event kind), where, the edit and the measured reasons."""

    kind: str
    layer: str
    record: EditRecord
    reasons: list[str] = field(default_factory=list)


class _RefusedError(Exception):
    """Raised inside a transaction to undo a change the caller's limits refuse."""


def measure_bypass(model: nn.Module, batches: Any, loss_fn: Callable[..., torch.Tensor],
                   layers: Any = None) -> dict[str, BypassGradient]:
    """Bypass gradients (:mod:`neuroexapt.metrics.recorder`) over ``(inputs, targets)`` batches.

    The model runs in eval mode (normalisation statistics do not move); every parameter's
    ``.grad`` and every module's mode are restored.
    """
    grads = {p: p.grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    recorder = TrainingRecorder(model, layers, every=1, modes="any")
    try:
        model.eval()
        with torch.enable_grad():
            for x, y in batches:
                inputs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
                loss_fn(model_output(model(*inputs)), y).backward()
        return {k: v for k, v in recorder.growth.items() if v.batches}
    finally:
        recorder.close()
        for p, g in grads.items():
            p.grad = g
        for m, mode in modes.items():
            m.training = mode


class Expander:
    """Chooses and makes growth changes (see the module docstring).

    Args:
        init: how new units start (``neuroexapt.policy.growth.GROWTH_INITS``).
        cost: ``"macs"`` or ``"parameters"``, what one unit costs in the ranking.
        fraction: units added to a layer by one ranked change, as a fraction of its units.
        multiple: grown widths are rounded up to multiples of this.
        division: the Net2Net division used by ``init="split"`` and the fallback.
        connections: the skip-connection manager (its ``connected`` pairs are remembered).
        allow_deepen: deepen where units cannot be added.
        allow_connections: add skip connections around layers that lose information.
        seed: seed of the new units' random fan-in.
    """

    def __init__(self, *, init: str = "orthogonal", cost: str = "macs", fraction: float = 0.25,
                 multiple: int = 8, division: AdaptiveNeuronDivision | None = None,
                 connections: ConnectionGrowthManager | None = None, allow_deepen: bool = True,
                 allow_connections: bool = True, seed: int = 0) -> None:
        self.init, self.cost, self.fraction, self.multiple = init, cost, fraction, multiple
        self.division = division if division is not None else AdaptiveNeuronDivision(
            "hybrid", noise_scale=0.0)
        self.connections = connections if connections is not None else \
            ConnectionGrowthManager()
        self.allow_deepen, self.allow_connections, self.seed = (
            allow_deepen, allow_connections, seed)
        self._made = 0

    # ------------------------------------------------------------------ ranking
    def options(self, model: nn.Module, example_inputs: Any,
                bypass: Mapping[str, BypassGradient] | None) -> list[GrowthOption]:
        """The growable layers with measured gains, best gain per cost first."""
        if not bypass:
            return []
        try:
            options = growth_options(model, example_inputs, dict(bypass), by=self.cost)
        except NeuroExaptError as e:
            logger.info("no growth options: %s", e)
            return []
        return sorted(options, key=lambda o: -self._per_cost(o))

    def units_for(self, option: GrowthOption) -> int:
        """``fraction`` of the layer, rounded up so that the width reaches a ``multiple``."""
        n = max(1, round(self.fraction * option.size))
        return n + (-(option.size + n)) % self.multiple

    def _per_cost(self, option: GrowthOption) -> float:
        n = self.units_for(option)
        return option.gain(n) / (n * option.cost_per_unit)

    # ------------------------------------------------------------------ changes
    def step(self, model: nn.Module, options: list[GrowthOption], budget: float, *,
             example_inputs: Any, optimizer: torch.optim.Optimizer | None,
             stats: Mapping[str, Any] | None = None, epochs_left: int | None = None,
             room: float | None = None) -> list[Expansion]:
        """A scheduled step: ``budget`` (cost units) handed out by marginal gain per cost.

        ``room`` is the hard limit (see :func:`~neuroexapt.policy.growth.allocate`).
        """
        plan = allocate(options, budget, multiple=self.multiple, room=room)
        by_name = {o.layer: o for o in options}
        made = []
        for layer, units in sorted(plan.items(), key=lambda kv: -by_name[kv[0]].gain(kv[1])):
            done = self._units(model, by_name[layer], units, example_inputs, optimizer,
                               stats, epochs_left, self.init)
            if done is not None:
                made.append(done)
                for other in options:  # their inputs may have gained units
                    remap_directions(other, model, done.record)
        return made

    def expand(self, model: nn.Module, count: int, *, example_inputs: Any,
               optimizer: torch.optim.Optimizer | None, method: str = "mutate",
               options: list[GrowthOption] | None = None, report: AnalysisReport | None = None,
               max_units: Callable[[GrowthOption], int] | None = None,
               fits: Callable[[], bool] | None = None, epochs_left: int | None = None
               ) -> list[Expansion]:
        """Up to ``count`` changes by ``method`` (one of :data:`EXPAND_METHODS`).

        ``max_units(option)`` caps the units one change may add (a budget); ``fits()`` is
        checked after every change, which is undone when it returns False.
        """
        if method not in EXPAND_METHODS:
            raise ConfigError(f"unknown method {method!r}; valid: {', '.join(EXPAND_METHODS)}")
        options = options or []
        stats = report.stats if report is not None else None
        made: list[Expansion] = []
        tried: set[str] = set()

        def attempt(kind: str, layer: str, make: Callable[[], Expansion | None]) -> None:
            if len(made) >= count:
                return
            try:
                with transaction(model, optimizer):
                    connected = set(self.connections.connected)
                    pending = list(self.division.pending)
                    done = make()
                    if done is not None and fits is not None and not fits():
                        self.connections.connected = connected
                        self.division.pending[:] = pending
                        raise _RefusedError
            except _RefusedError:
                logger.info("%s at '%s' would exceed the limits; undone", kind, layer)
                return
            except NeuroExaptError as e:
                logger.info("%s at '%s' not possible: %s", kind, layer, e)
                return
            if done is not None:
                made.append(done)
                tried.add(layer)

        if method in ("mutate", "skip") and self.allow_connections and report is not None:
            top = report.bottlenecks()[:1]
            if method == "skip" or (top and _lossy(top[0])):
                attempt("connection growth", "*", lambda: self._skip(
                    model, report, example_inputs, optimizer))
        if method in ("mutate", "split"):
            init = "split" if method == "split" else self.init
            for option in options:
                n = self.units_for(option)
                if max_units is not None:
                    n = min(n, max_units(option))
                if n < 1 or option.gain(1) <= 0:
                    continue
                attempt("growth", option.layer, lambda o=option, n=n: self._units(
                    model, o, n, example_inputs, optimizer, stats, epochs_left, init))
        if method in ("mutate", "split", "deepen") and report is not None and len(made) < count:
            for layer in sorted(report.layers, key=lambda x: -x.score):
                if layer.name in tried or not layer.batches:
                    continue
                reasons = [str(r) for r in layer.reasons] or [f"analysis score {layer.score:.3f}"]
                if method != "deepen" and not options:  # no bypass statistics: split here
                    attempt("neuron division", layer.name, lambda n=layer.name, r=reasons: (
                        Expansion("neuron_division", n, self.division.divide(
                            model, n, stats=(stats or {}).get(n), example_inputs=example_inputs,
                            optimizer=optimizer, epochs_left=epochs_left), r)))
                if method == "split" or not self.allow_deepen or layer.name in tried:
                    continue
                try:
                    is_output = trace(model, example_inputs).produces_output(layer.name)
                except NeuroExaptError as e:  # the model cannot be traced: nothing to deepen
                    logger.info("deepening '%s' not possible: %s", layer.name, e)
                    continue
                if is_output:
                    continue  # deepening the output layer adds no capacity
                attempt("deepening", layer.name, lambda n=layer.name, r=reasons: Expansion(
                    "layer_addition", n, deepen(model, n, example_inputs=example_inputs,
                                                optimizer=optimizer, verify=True), r))
        return made

    def _units(self, model: nn.Module, option: GrowthOption, units: int, example_inputs: Any,
               optimizer: torch.optim.Optimizer | None, stats: Mapping[str, Any] | None,
               epochs_left: int | None, init: str) -> Expansion | None:
        try:
            record = grow_layer(model, option.layer, units, init=init,
                                example_inputs=example_inputs, optimizer=optimizer,
                                option=option, split=self.division,
                                stats=(stats or {}).get(option.layer),
                                seed=self.seed + self._made, epochs_left=epochs_left)
        except NeuroExaptError as e:
            logger.info("growth of '%s' not possible: %s", option.layer, e)
            return None
        self._made += 1
        return Expansion("neuron_division", option.layer, record,
                         [option.reason(units, self.cost)])

    def _skip(self, model: nn.Module, report: AnalysisReport, example_inputs: Any,
              optimizer: torch.optim.Optimizer | None) -> Expansion | None:
        done = self.connections.grow(model, report, report.order, example_inputs=example_inputs,
                                     optimizer=optimizer)
        if done is None:
            return None
        record, reason = done
        return Expansion("connection_growth", record.target, record, [reason])


def _lossy(layer: Any) -> bool:
    return any(r.metric == "information_flow" for r in layer.reasons)


def room_units(room: float, option: GrowthOption) -> int:
    """Units of ``option`` that fit in ``room`` cost units (all when it is infinite)."""
    if not math.isfinite(room):
        return 1 << 30
    return max(0, math.floor(room / option.cost_per_unit))
