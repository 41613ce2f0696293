"""``neuroexapt.analyze``: measure every chosen layer and rank the bottlenecks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.errors import AnalysisError, ConfigError
from neuroexapt.metrics.collector import ActivationCollector, LayerSpec, LayerStats, model_output
from neuroexapt.metrics.estimators import label_entropy
from neuroexapt.metrics.formulas import TASK_TYPES
from neuroexapt.metrics.layer_metrics import (
    ImportanceFn,
    ablation_loss,
    activation_diversity,
    get_importance_metric,
    gradient_variance,
    importance_value,
    information_retained,
)
from neuroexapt.metrics.report import AnalysisReport, LayerAnalysis, Reason

logger = logging.getLogger(__name__)

__all__ = ["BOTTLENECK_METRICS", "DEFAULT_THRESHOLDS", "analyze", "report_from_stats"]

BOTTLENECK_METRICS: tuple[str, ...] = (
    "gradient_variance", "activation_diversity", "information_flow", "performance_sensitivity",
)
# A metric's score is in [0, 1]; a layer is a bottleneck by a metric when its score reaches
# the threshold. gradient_variance and performance_sensitivity are scored relative to the
# largest layer, activation_diversity is the effective-rank ratio, information_flow the share
# of H(Y) lost since the previous layer.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "gradient_variance": 0.5, "activation_diversity": 0.9, "information_flow": 0.1,
    "performance_sensitivity": 0.5,
}
Batch = tuple[Any, torch.Tensor]


def _as_inputs(x: Any) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _validate(metrics: Sequence[str], thresholds: Mapping[str, float] | None,
              task_type: str, batches: int) -> dict[str, float]:
    unknown = [m for m in metrics if m not in BOTTLENECK_METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; valid: {', '.join(BOTTLENECK_METRICS)}")
    merged = dict(DEFAULT_THRESHOLDS)
    for key, value in (thresholds or {}).items():
        if key not in DEFAULT_THRESHOLDS:
            raise ConfigError(
                f"unknown threshold {key!r}; valid: {', '.join(DEFAULT_THRESHOLDS)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(f"threshold {key} must be in [0, 1], got {value!r}")
        merged[key] = float(value)
    if task_type not in TASK_TYPES:
        raise ConfigError(f"unknown task_type {task_type!r}; valid: {', '.join(TASK_TYPES)}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError(f"batches must be a positive int, got {batches!r}")
    return merged


def _execution_order(model: nn.Module, names: list[str], inputs: tuple[Any, ...]) -> list[str]:
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda *_, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]


def _collect(model: nn.Module, collector: ActivationCollector, data: Iterable[Batch],
             loss_fn: Callable[..., torch.Tensor], batches: int) -> tuple[int, int, Batch]:
    seen = bad = 0
    first: Batch | None = None
    with collector, torch.enable_grad():
        for x, y in data:
            collector.set_targets(y)
            loss = loss_fn(model_output(model(*_as_inputs(x))), y)
            seen += 1
            if not torch.isfinite(loss):
                bad += 1
            else:
                first = first or (x, y)  # the default held-out batch: the first finite one
                if loss.requires_grad:  # a frozen model has no gradients to measure
                    loss.backward()
            if seen >= batches:
                break
    if not seen:
        raise AnalysisError("the loader yielded no batch; pass a loader with data")
    if first is None:
        raise AnalysisError(
            f"all {seen} losses were NaN or infinite; check the inputs, the learning rate and "
            "the loss function before analysing"
        )
    return seen, bad, first


def analyze(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    layers: LayerSpec = None,
    metrics: Sequence[str] = BOTTLENECK_METRICS,
    batches: int = 8,
    task_type: str = "classification",
    loss_fn: Callable[..., torch.Tensor] | None = None,
    held_out: Batch | None = None,
    thresholds: Mapping[str, float] | None = None,
    mi_method: str = "ksg",
    reservoir: int = 512,
    importance: str | ImportanceFn | None = None,
) -> AnalysisReport:
    """Measure the chosen layers on ``batches`` batches and rank the bottlenecks.

    The model runs in eval mode (its BatchNorm statistics do not change); gradients are
    computed for the measurements and every parameter's ``.grad`` is restored afterwards.

    Args:
        model: the model to analyse.
        loader: iterable of ``(inputs, targets)`` batches.
        layers: module names, types, or None for every Conv and Linear layer.
        metrics: which of :data:`BOTTLENECK_METRICS` to compute and rank by.
        batches: number of batches to record.
        task_type: ``"classification"`` (integer targets) or ``"regression"``.
        loss_fn: defaults to cross-entropy (classification) or mean squared error.
        held_out: batch for ``performance_sensitivity`` (default: the first recorded batch).
        thresholds: per-metric score thresholds overriding :data:`DEFAULT_THRESHOLDS`.
        mi_method: estimator for ``information_flow`` (see ``metrics.mutual_information``).
        reservoir: samples kept per layer for the information estimators.
        importance: a registered importance metric name or ``fn(layer_output, targets)``
            returning a scalar or one score per unit (see
            :func:`~neuroexapt.metrics.layer_metrics.importance_value`), reported as the
            ``importance`` metric (per-unit scores also as ``unit_importance``).

    Returns:
        The :class:`AnalysisReport`, layers ranked by score.
    """
    _validate(metrics, thresholds, task_type, batches)
    if loss_fn is None:
        loss_fn = F.cross_entropy if task_type == "classification" else F.mse_loss
    if importance is not None:
        get_importance_metric(importance)  # an unknown name fails before any work
    collector = ActivationCollector(model, layers, reservoir=reservoir)
    grads = {p: p.grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for p in grads:  # backward accumulates into an existing .grad in place
            p.grad = None
        seen, bad, first = _collect(model, collector, loader, loss_fn, batches)
        held = held_out or first
        order = _execution_order(model, collector.layers, _as_inputs(held[0]))
        report = report_from_stats(
            model, {n: collector[n] for n in collector.layers}, order, metrics=metrics,
            thresholds=thresholds, task_type=task_type, loss_fn=loss_fn, held_out=held,
            mi_method=mi_method, importance=importance, batches=seen,
        )
    finally:
        for p, g in grads.items():
            p.grad = g
        for m, mode in modes.items():
            m.training = mode
    if bad:
        for r in report.layers:
            r.warnings.append(f"{bad} of {seen} batches had a non-finite loss and were skipped")
    return report


def report_from_stats(
    model: nn.Module,
    stats: Mapping[str, LayerStats],
    order: Sequence[str],
    *,
    metrics: Sequence[str] = BOTTLENECK_METRICS,
    thresholds: Mapping[str, float] | None = None,
    task_type: str = "classification",
    loss_fn: Callable[..., torch.Tensor] | None = None,
    held_out: Batch | None = None,
    mi_method: str = "ksg",
    importance: str | ImportanceFn | None = None,
    batches: int = 0,
    ablate_top: int | None = None,
) -> AnalysisReport:
    """Metrics, scores and ranking from statistics already collected (by hooks or by hand).

    ``performance_sensitivity`` needs ``held_out`` (and ``loss_fn``); without it the metric is
    left out. ``order`` is the layers' execution order (information loss is measured along it).
    The metric costs one forward pass per layer; with ``ablate_top=k`` it is measured only on
    the ``k`` layers the other metrics score highest (the candidates), and the others are
    scored without it.
    """
    limits = _validate(metrics, thresholds, task_type, max(1, batches))
    if ablate_top is not None and (isinstance(ablate_top, bool) or not isinstance(ablate_top, int)
                                   or ablate_top < 1):
        raise ConfigError(f"ablate_top must be an int >= 1 or None, got {ablate_top!r}")
    if loss_fn is None:
        loss_fn = F.cross_entropy if task_type == "classification" else F.mse_loss
    sensitivity = "performance_sensitivity" in metrics and held_out is not None
    scored = [m for m in metrics if sensitivity or m != "performance_sensitivity"]
    metrics = [m for m in metrics if m != "performance_sensitivity"]
    importance_fn = get_importance_metric(importance) if importance is not None else None
    never = [n for n in order if not stats[n].batches]
    results = _measure(stats, list(order), metrics, task_type, mi_method, importance_fn)
    h_y = _label_entropy(stats, list(order), task_type)
    if sensitivity:
        assert held_out is not None
        measured = [r for r in results if r.batches]
        if ablate_top is not None and ablate_top < len(measured) and metrics:
            _score(measured, metrics, limits, h_y)  # rank the candidates by the cheap metrics
            measured = sorted(measured, key=lambda r: -r.score)[:ablate_top]
            for r in results:
                r.scores, r.reasons, r.score = {}, [], 0.0
        _ablate(model, measured, held_out, loss_fn)
    _score(results, scored, limits, h_y)
    results.sort(key=lambda r: -r.score)
    return AnalysisReport(results, task_type, h_y, batches, never, list(order), dict(stats))


def _label_entropy(collector: Mapping[str, LayerStats], order: list[str], task: str
                   ) -> float | None:
    if task != "classification":
        return None
    for name in order:
        if collector[name].batches:
            _, y = collector[name].samples()
            return label_entropy(y) if y is not None else None
    return None


def _ablate(model: nn.Module, results: Sequence[LayerAnalysis], held: Batch,
            loss_fn: Callable[..., torch.Tensor]) -> None:
    """``performance_sensitivity`` of each result's layer: the loss increase when it is zeroed."""
    if not results:
        return
    modules = dict(model.named_modules())
    inputs, targets = _as_inputs(held[0]), held[1]
    with torch.no_grad():
        base = float(loss_fn(model_output(model(*inputs)), targets))
    for r in results:
        ablated = ablation_loss(model, modules[r.name], inputs, targets, loss_fn)
        r.metrics["performance_sensitivity"] = max(0.0, ablated - base)


def _measure(
    collector: Mapping[str, LayerStats], order: list[str], metrics: Sequence[str],
    task_type: str, mi_method: str, importance_fn: ImportanceFn | None,
) -> list[LayerAnalysis]:
    out = []
    for name in order:
        stats = collector[name]
        result = LayerAnalysis(name, stats.units or 0, stats.batches)
        if not stats.batches:
            out.append(result)
            continue
        if stats.nan_count or stats.inf_count:
            result.warnings.append(
                f"{stats.nan_count} NaN and {stats.inf_count} Inf values were left out")
        m = result.metrics
        if "gradient_variance" in metrics and stats.grad_batches:
            m["gradient_variance"] = gradient_variance(stats)
        if "activation_diversity" in metrics:
            m.update(activation_diversity(stats))
        if "information_flow" in metrics and task_type == "classification" \
                and stats.samples()[1] is not None:
            m["information"] = information_retained(stats, mi_method)
        if importance_fn is not None:
            x, y = stats.samples()
            m["importance"], units = importance_value(importance_fn, name, x,
                                                      y if y is not None else x)
            if units is not None:
                result.unit_importance = units.tolist()
        out.append(result)
    previous = None
    for result in out:
        info = result.metrics.get("information")
        if info is not None:
            result.metrics["information_lost"] = max(0.0, previous - info) \
                if previous is not None else 0.0
            previous = info
    return out


def _score(results: list[LayerAnalysis], metrics: Sequence[str], limits: dict[str, float],
           h_y: float | None) -> None:
    def top(key: str) -> float:
        vals = [r.metrics[key] for r in results if math.isfinite(r.metrics.get(key, math.nan))]
        return max(vals, default=0.0)

    tops = {k: top(k) for k in ("gradient_variance", "performance_sensitivity")}
    for r in results:
        raw = {
            "gradient_variance": ("gradient_variance", tops["gradient_variance"]),
            "activation_diversity": ("rank_ratio", 1.0),
            "information_flow": ("information_lost", h_y or 0.0),
            "performance_sensitivity": ("performance_sensitivity",
                                        tops["performance_sensitivity"]),
        }
        for metric in metrics:
            key, scale = raw[metric]
            value = r.metrics.get(key, math.nan)
            if not math.isfinite(value) or scale <= 0:
                continue
            score = min(1.0, value / scale)
            r.scores[metric] = score
            if score >= limits[metric]:
                r.reasons.append(Reason(metric, value, score, limits[metric]))
        r.score = sum(r.scores.values()) / len(r.scores) if r.scores else 0.0
