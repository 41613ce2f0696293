"""``neuroexapt.NeuroExapt``: the information-theoretic API of the second design document.

A thin facade over the analysis engine (:func:`neuroexapt.analyze`), the criteria language
(:class:`neuroexapt.policy.Criteria`) and the edits (:mod:`neuroexapt.ops`).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.errors import ConfigError, NeuroExaptError
from neuroexapt.graph import trace
from neuroexapt.metrics.analyze import analyze
from neuroexapt.metrics.estimators import unit_entropy
from neuroexapt.metrics.formulas import StructuralEntropy, output_kl, psi
from neuroexapt.metrics.layer_metrics import unit_scores
from neuroexapt.metrics.report import AnalysisReport
from neuroexapt.ops import EditRecord, narrow, unit_norms
from neuroexapt.ops.edit import count_parameters
from neuroexapt.ops.transaction import model_outputs, transaction
from neuroexapt.optim.discover import OptimizerWatch
from neuroexapt.policy.connections import ConnectionGrowthManager
from neuroexapt.policy.criteria import Criteria
from neuroexapt.policy.expansion import EXPAND_METHODS, Expander, measure_bypass
from neuroexapt.policy.pruning import PruneResult, prune_to
from neuroexapt.train.sinks import RunLogger

logger = logging.getLogger(__name__)

__all__ = ["EXPAND_METHODS", "MONITOR_METRICS", "NeuroExapt", "facade_of"]

MONITOR_METRICS: tuple[str, ...] = ("entropy", "mi_gain", "struct_complexity")
# criteria metrics that are estimated from class labels: none exist for regression
LABEL_METRICS = frozenset({"mutual_information", "information", "information_lost",
                           "redundancy"})
# models wrapped by a NeuroExapt, so that a Trainer finds the facade of its model
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, NeuroExapt] = weakref.WeakKeyDictionary()
Batch = tuple[Any, torch.Tensor]


class NeuroExapt:
    """Measures a model's information flow and prunes or expands it from the measurements.

    Args:
        task_type: ``"classification"`` or ``"regression"`` (loss, estimators and psi follow).
        depth: network depth in the redundancy formula (default: the number of Conv and
            Linear layers of the wrapped model).
        entropy_weight: beta of the structural entropy balance: how much a change of the
            model's output distribution raises structural entropy.
        lam: lambda of the redundancy formula.

    Edits made through the facade migrate the optimizer that trains the model: the one given
    as ``optimizer=``, else :attr:`optimizer` (a :class:`~neuroexapt.Trainer` sets its own),
    else the one optimizer seen stepping the model's parameters since :meth:`wrap_model`
    (PyTorch's global step hooks); several such optimizers are a :class:`ConfigError`.

    Example:
        >>> ne = NeuroExapt(task_type="classification", depth=18, entropy_weight=0.5)
        >>> model = ne.wrap_model(model)
        >>> ne.measure(val_loader)
        >>> ne.prune_layers(criteria="entropy<0.2")
    """

    def __init__(self, task_type: str = "classification", depth: int | None = None,
                 entropy_weight: float = 0.5, *, lam: float = 0.05) -> None:
        psi(task_type)  # validates the task type
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                                  or depth < 1):
            raise ConfigError(f"depth must be a positive int or None, got {depth!r}")
        if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, int | float) \
                or not math.isfinite(entropy_weight) or entropy_weight < 0:
            raise ConfigError(f"entropy_weight must be a number >= 0, got {entropy_weight!r}")
        self.task_type, self.depth, self.lam = task_type, depth, float(lam)
        self.structure = StructuralEntropy(alpha=1.0, beta=float(entropy_weight))
        self.model: nn.Module | None = None
        self._report: AnalysisReport | None = None
        self._stale = False  # the model changed since _report: measure _probe on demand
        self.history: dict[str, list[float]] = {}
        self._importance: Callable[[torch.Tensor, torch.Tensor], float] | None = None
        self._sink: RunLogger | None = None
        self._probe: list[Batch] | None = None
        self._connections = ConnectionGrowthManager()  # pairs connected stay connected
        self._steps = 0
        self._pending_kl = 0.0  # KL(p_old || p_new) of edits since the last measurement
        self.optimizer: torch.optim.Optimizer | None = None  # migrated by every edit
        self._watch: OptimizerWatch | None = None

    # ------------------------------------------------------------------ set-up
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Attach ``model`` (returned unchanged: same object, class, forward and state)."""
        if not isinstance(model, nn.Module):
            raise ConfigError(f"wrap_model expects an nn.Module, got {type(model).__name__}")
        self.model = model
        _WRAPPED[model] = self
        if self._watch is not None:
            self._watch.close()
        self._watch = OptimizerWatch(model)
        if self.depth is None:
            self.depth = max(1, sum(isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
                                    for m in model.modules()))
        return model

    def set_importance_metric(self, fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
        """Use ``fn(layer_output, target_output) -> importance_score`` as layer importance.

        ``layer_output`` is a ``[N, D]`` float tensor: N recorded samples of the layer's D
        units (channels averaged over positions); ``target_output`` is what the layer should
        inform: the ``[N]`` class labels (classification) or the ``[N, K]`` targets
        (regression). The score is a number (the layer's importance), or a ``[D]`` tensor
        (one score per unit, for unit-level decisions; the layer's importance is their mean).

        ``fn`` is called at every measurement (:meth:`measure`, and every epoch of a
        :class:`~neuroexapt.Trainer` while a monitor or this metric is set). Its score is the
        ``importance`` of criteria (``ne.prune_layers(criteria="importance < 0.1")``: a
        per-unit score selects units, a layer score the layer's units) and weighs the
        Trainer's pruning: each layer's entropy threshold is multiplied by ``2 (1 - q)``,
        ``q`` its importance quantile among the gated layers, and per-unit scores choose which
        of a layer's candidate units go first. A metric that raises, or returns NaN, infinity
        or a tensor of another shape, is a :class:`ConfigError` naming the layer and value.
        """
        if not callable(fn):
            raise ConfigError(f"set_importance_metric expects a callable "
                              f"fn(layer_output, target_output) -> score, got {fn!r}")
        self._importance = fn

    @property
    def importance_metric(self) -> Callable[[torch.Tensor, torch.Tensor], float] | None:
        """The metric set by :meth:`set_importance_metric`, or None."""
        return self._importance

    def monitor(self, metrics: Sequence[str] = MONITOR_METRICS,
                log_dir: str | None = None) -> dict[str, list[float]]:
        """Record ``metrics`` at every :meth:`measure`; returns the (live) history.

        A :class:`~neuroexapt.Trainer` measures the model after every epoch while a monitor is
        set, so the history gains one value per metric and epoch, readable while training
        runs. ``entropy``: mean unit entropy over the layers (nats); ``mi_gain``: change of
        the total information the layers keep about the target since the last measurement;
        ``struct_complexity``: the structural entropy S of the balance formula. With
        ``log_dir``, TensorBoard scalars and ``history.jsonl`` are written there.
        """
        unknown = [m for m in metrics if m not in MONITOR_METRICS]
        if unknown or not metrics:
            raise ConfigError(f"unknown monitor metric {unknown[0] if unknown else None!r}; "
                              f"valid: {', '.join(MONITOR_METRICS)}")
        self.history = {m: [] for m in metrics}
        self._sink = RunLogger(log_dir) if log_dir is not None else None
        return self.history

    # ------------------------------------------------------------------ measurements
    def measure(self, data: Iterable[Batch] | None = None, batches: int = 4) -> AnalysisReport:
        """Analyse the wrapped model on ``batches`` batches of ``data``.

        Without ``data``, the batches of the last measurement are used again (after
        :meth:`~neuroexapt.Trainer.fit`: the Trainer's validation batches).
        """
        model = self._require_model()
        if data is None:
            if not self._probe:
                raise ConfigError(_NO_DATA)
            data = self._probe
        self._probe = list(_take(data, batches))
        if not self._probe:
            raise ConfigError("measure got no batch; pass (inputs, targets) batches")
        previous = self._report
        self._report = analyze(model, self._probe, batches=len(self._probe),
                               task_type=self.task_type, importance=self._importance)
        self._stale = False
        self._record(previous)
        return self._report

    @property
    def report(self) -> AnalysisReport | None:
        """The last measurement (None before any), taken again first if the model changed
        since and the data to measure it on is known (after :meth:`~neuroexapt.Trainer.fit`,
        the Trainer's validation batches: see :meth:`measure_later`)."""
        if self._stale and self._probe:
            self.measure()
        return self._report

    def measure_later(self, data: Iterable[Batch], batches: int = 4) -> None:
        """Measure on ``data`` when a report is next needed, not now.

        The Trainer calls it at the end of ``fit``: ``ne.prune_layers()``, ``ne.measure()`` and
        ``ne.report`` then describe the trained model without ``fit`` paying for an analysis
        nobody may read.
        """
        self._probe = list(_take(data, batches))
        self._stale = True

    def _record(self, previous: AnalysisReport | None) -> None:
        assert self._report is not None
        info = [x.metrics.get("information", 0.0) for x in self._report.layers]
        before = [x.metrics.get("information", 0.0) for x in previous.layers] if previous else []
        measured = [s for s in self._report.stats.values() if s.batches]
        entropies = [float(unit_entropy(s.samples()[0]).mean()) for s in measured
                     if s.samples()[0].shape[0] > 1]
        self.structure.step(info, kl=self._pending_kl)
        self._pending_kl = 0.0
        values = {"entropy": sum(entropies) / len(entropies) if entropies else 0.0,
                  "mi_gain": sum(info) - sum(before) if previous else 0.0,
                  "struct_complexity": self.structure.value}
        self._steps += 1
        for key in self.history:
            self.history[key].append(values[key])
        if self._sink is not None:
            self._sink.log(self._steps, **{k: values[k] for k in self.history})

    def layer_values(self, layer: str) -> dict[str, Any]:
        """Metric values of ``layer`` for criteria: per-unit tensors and per-layer floats."""
        report = self._require_report()
        stats = report.stats.get(layer)
        if stats is None or not stats.batches:
            raise ConfigError(f"layer '{layer}' was not measured; measured: {report.order}")
        x, _ = stats.samples()
        scores = unit_scores(stats, "hybrid") if stats.grad_batches else unit_scores(
            stats, "activation")
        metrics = report[layer].metrics
        h_o = report.label_entropy or 0.0
        # I(L;O) is estimated for classification only: unmeasured, it is NaN (which criteria
        # never select), not 0 (with which "mi < 0.1" would empty every layer in regression)
        info = metrics.get("information", math.nan)
        budget = h_o * math.exp(-self.lam * (self.depth or 1))
        # the custom importance metric when one is set: per unit, or the layer's score
        importance: Any = (scores / scores.max().clamp(min=1e-30)).float()
        if report[layer].unit_importance is not None:
            importance = torch.tensor(report[layer].unit_importance, dtype=torch.float32)
        elif "importance" in metrics:
            importance = metrics["importance"]
        values: dict[str, Any] = {
            "entropy": unit_entropy(x).float(),
            "importance": importance,
            "mutual_information": info,
            "information": info,
            "information_lost": metrics.get("information_lost", math.nan),
            "redundancy": 1.0 - info / budget if budget > 0 else math.nan,
            "sensitivity": metrics.get("performance_sensitivity", 0.0),
            "gradient_variance": metrics.get("gradient_variance", 0.0),
            "rank_ratio": metrics.get("rank_ratio", 0.0),
            "dead_fraction": stats.dead_fraction.float(),
        }
        try:  # incoming weight norm of each unit (summed over tied producers)
            group = trace(self._require_model(), self._inputs()).group_of(layer)
            if group.size == len(values["entropy"]):
                values["norm"] = unit_norms(self._require_model(), group).sqrt().float()
        except NeuroExaptError as e:
            logger.debug("no unit norms for '%s': %s", layer, e)
        return values

    # ------------------------------------------------------------------ structure
    def prune_layers(self, criteria: str = "entropy<0.2", *, data: Iterable[Batch] | None = None,
                     optimizer: torch.optim.Optimizer | None = None) -> list[EditRecord]:
        """Remove, for real, the units that ``criteria`` selects in every measured layer.

        Per-unit metrics: ``entropy`` (nats), ``importance`` (0..1: the hybrid of gradient and
        activation scores; a custom metric's score once one is set, per unit or per layer),
        ``dead_fraction``;
        per-layer: ``mutual_information``, ``redundancy``, ``sensitivity``,
        ``information_lost``, ``gradient_variance``, ``rank_ratio``. A layer whose every unit
        is selected keeps its most important unit; layers whose units cannot be resized (the
        output) are skipped with the reason logged. The model is measured again afterwards.
        """
        rule = Criteria.parse(criteria)
        needs_labels = sorted(rule.names & LABEL_METRICS)
        if needs_labels and self.task_type != "classification":
            raise ConfigError(
                f"criteria {criteria!r} uses {', '.join(needs_labels)}, estimated from class "
                f"labels only; task_type={self.task_type!r} has none. Use entropy, importance, "
                "sensitivity, gradient_variance, rank_ratio, dead_fraction or norm")
        model = self._require_model()
        optimizer = self._optimizer_for(optimizer, "prune_layers")
        if data is not None:
            self.measure(data)
        report = self._require_report()
        inputs = self._inputs()
        before = self._outputs()
        # all or nothing: an error in any layer (ours or the model's) restores the model,
        # the optimizer and the history
        ranges: dict[str, list[float]] = {}  # what the criteria's metrics measured, for the log
        with transaction(model, optimizer):
            records = []
            for layer in report.order:
                if not report.stats[layer].batches:
                    continue
                values = self.layer_values(layer)
                for name in rule.names & values.keys():
                    v = torch.as_tensor(values[name], dtype=torch.float64).flatten()
                    ranges.setdefault(name, []).extend([float(v.min()), float(v.max())])
                chosen = _selected(rule, values)
                if not chosen:
                    continue
                if len(chosen) == len(values["entropy"]):
                    rank = values["importance"]
                    keep = int(rank.argmax()) if isinstance(rank, torch.Tensor) else 0
                    chosen = [u for u in chosen if u != keep]
                try:
                    records.append(narrow(model, layer, remove=chosen, example_inputs=inputs,
                                          optimizer=optimizer))
                except NeuroExaptError as e:
                    logger.info("prune '%s' skipped: %s", layer, e)
        if not records:
            measured = "; ".join(f"{k} from {min(v):.3g} to {max(v):.3g}"
                                 for k, v in sorted(ranges.items()))
            logger.warning("prune_layers(%r) removed nothing: no unit of a resizable layer "
                           "matched (measured %s); loosen the criteria", criteria,
                           measured or "nothing")
        if records:
            self._pending_kl += self._kl_since(before)
            self.measure(self._probe or [])
        return records

    def prune_to(self, amount: float, *, data: Iterable[Batch], by: str = "parameters",
                 score: str = "information", steps: int = 5, allocation: str = "global",
                 optimizer: torch.optim.Optimizer | None = None) -> PruneResult:
        """Remove the units carrying the least information per cost until ``by`` falls by
        ``amount`` (see :func:`neuroexapt.prune_to`; the loss follows ``task_type``).
        The model is measured again on ``data`` afterwards."""
        model = self._require_model()
        optimizer = self._optimizer_for(optimizer, "prune_to")
        loss = F.cross_entropy if self.task_type == "classification" else F.mse_loss
        batches = list(_take(data, 8))
        before = self._outputs()
        result = prune_to(model, batches, amount, by=by, score=score, loss_fn=loss,
                          batches=len(batches) or 1, steps=steps, allocation=allocation,
                          optimizer=optimizer)
        if result.records:
            self._pending_kl += self._kl_since(before)
            self.measure(batches)
        return result

    def relax(self, spec: Mapping[str, Any], *, example_inputs: Any = None,
              mode: str = "gumbel", tau: float = 1.0) -> nn.Module:
        """Turn layers of the wrapped model into choices: continuous relaxation of discrete
        architectural choices (see :func:`neuroexapt.relax.relax`). Search them with
        :meth:`search` or ``Trainer(..., search_epochs=...)``, then :meth:`discretize`."""
        from neuroexapt.relax import relax

        model = self._require_model()
        if example_inputs is None and self._probe:
            example_inputs = self._inputs()
        return relax(model, spec, example_inputs=example_inputs, mode=mode, tau=tau)

    def search(self, data: Iterable[Batch], epochs: int, **options: Any) -> Any:
        """Train the weights and the choices of the relaxed model in turn
        (:func:`neuroexapt.relax.search`; the loss follows ``task_type``)."""
        from neuroexapt.relax import search

        options.setdefault("loss_fn", F.cross_entropy if self.task_type == "classification"
                           else F.mse_loss)
        return search(self._require_model(), data, epochs, **options)

    def discretize(self, *, optimizer: torch.optim.Optimizer | None = None,
                   example_inputs: Any = None) -> nn.Module:
        """The plain model with every choice at its most probable option
        (:func:`neuroexapt.relax.discretize`); the optimizer follows."""
        from neuroexapt.relax import discretize

        return discretize(self._require_model(), optimizer=self._optimizer_for(
            optimizer, "discretize"), example_inputs=example_inputs)

    def expand_layers(self, method: str = "mutate", num_layers: int = 2, *,
                      data: Iterable[Batch] | None = None,
                      optimizer: torch.optim.Optimizer | None = None) -> list[EditRecord]:
        """Grow ``num_layers`` layers where new capacity buys the most per cost.

        The policy is :class:`neuroexapt.policy.expansion.Expander`, the one DNM uses: layers
        are ranked by the expected loss decrease of new units (the bypass gradient, measured
        on the probe batches) per MAC. ``"split"`` widens a layer by Net2Net splits,
        ``"deepen"`` inserts an identity layer, ``"skip"`` adds a connection around the layer
        that loses most information, ``"mutate"`` chooses per layer: a skip where information
        is lost, else new units (orthogonal fan-in, zero fan-out), else deepening. Every change
        preserves the function. Fewer than ``num_layers`` changes are made when not enough
        layers allow one; the reasons are logged.
        """
        if method not in EXPAND_METHODS:
            raise ConfigError(f"unknown method {method!r}; valid: {', '.join(EXPAND_METHODS)}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"num_layers must be a positive int, got {num_layers!r}")
        model = self._require_model()
        optimizer = self._optimizer_for(optimizer, "expand_layers")
        if data is not None:
            self.measure(data)
        report = self._require_report()
        inputs = self._inputs()
        loss = F.cross_entropy if self.task_type == "classification" else F.mse_loss
        expander = Expander(connections=self._connections)
        options = []
        if method in ("mutate", "split"):
            bypass = measure_bypass(model, self._probe or [], loss, layers=list(report.order))
            options = expander.options(model, inputs, bypass)
        with transaction(model, optimizer):  # all or nothing, as prune_layers
            made = expander.expand(model, num_layers, example_inputs=inputs,
                                   optimizer=optimizer, method=method, options=options,
                                   report=report)
        records = [m.record for m in made]
        for m in made:
            logger.info("expand_layers: %s at '%s': %s", m.kind, m.layer, "; ".join(m.reasons))
        if len(records) < num_layers:
            logger.warning("expand_layers made %d of %d changes: the other measured layers "
                           "allow none (output layers, frozen groups)", len(records), num_layers)
        if records:
            self.measure(self._probe or [])
        return records

    # ------------------------------------------------------------------ helpers
    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ConfigError("call ne.wrap_model(model) first")
        return self.model

    def _require_report(self) -> AnalysisReport:
        report = self.report
        if report is None:
            raise ConfigError(_NO_DATA)
        return report

    def _optimizer_for(self, given: torch.optim.Optimizer | None, what: str
                       ) -> torch.optim.Optimizer | None:
        """The optimizer an edit migrates (see the class docstring); None when none exists."""
        if given is not None:
            return given
        if self.optimizer is not None:
            return self.optimizer
        if self._watch is None or not self._watch.found:
            return None  # nothing has trained the model yet: no state can go stale
        return self._watch.optimizer(f"ne.{what}", fix="pass optimizer= to ne." + what)

    def _outputs(self) -> torch.Tensor | None:
        """The model's eval-mode outputs on the probe's first batch (classification only)."""
        if self.task_type != "classification" or not self._probe:
            return None
        x = self._probe[0][0]
        inputs = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        return model_outputs(self._require_model(), inputs)[0]

    def _kl_since(self, before: torch.Tensor | None) -> float:
        after = self._outputs()
        return output_kl(before, after) if before is not None and after is not None else 0.0

    def _inputs(self) -> Any:
        assert self._probe
        x = self._probe[0][0]
        return x[:8] if isinstance(x, torch.Tensor) else tuple(t[:8] for t in x)

    def parameters_count(self) -> int:
        """Parameters of the wrapped model."""
        return count_parameters(self._require_model())


_NO_DATA = ("nothing measured yet: call ne.measure(loader) with (inputs, targets) batches, pass "
            "data=, or train with neuroexapt.Trainer first (it measures on its validation data)")


def _take(data: Iterable[Batch], n: int) -> Iterable[Batch]:
    for i, batch in enumerate(data):
        if i >= n:
            break
        yield batch


def _selected(rule: Criteria, values: dict[str, Any]) -> list[int]:
    result = rule.evaluate(values)
    units = len(values["entropy"])
    if isinstance(result, torch.Tensor):
        return result.nonzero().flatten().tolist()
    return list(range(units)) if result else []


def facade_of(model: nn.Module) -> NeuroExapt | None:
    """The NeuroExapt that wrapped ``model``, if any."""
    return _WRAPPED.get(model)
