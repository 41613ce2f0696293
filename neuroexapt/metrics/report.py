"""Results of :func:`neuroexapt.analyze`: per-layer metrics, scores and reasons."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["AnalysisReport", "LayerAnalysis", "Reason"]


@dataclass(frozen=True)
class Reason:
    """Why a layer was ranked a bottleneck: a metric, its value, its score and the threshold."""

    metric: str
    value: float
    score: float
    threshold: float

    def __str__(self) -> str:
        return (f"{self.metric}={self.value:.4g} (score {self.score:.2f} >= "
                f"{self.threshold:.2f})")


@dataclass
class LayerAnalysis:
    """Everything measured about one layer."""

    name: str
    units: int
    batches: int
    metrics: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    score: float = 0.0
    reasons: list[Reason] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # per-unit scores of a custom importance metric that returns one score per unit
    unit_importance: list[float] | None = None

    @property
    def is_bottleneck(self) -> bool:
        """True when at least one metric passed its threshold."""
        return bool(self.reasons)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@dataclass
class AnalysisReport:
    """Per-layer results, ranked by bottleneck score (highest first)."""

    layers: list[LayerAnalysis]
    task_type: str
    label_entropy: float | None
    batches: int
    never_ran: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # execution order of the layers
    # the statistics behind the metrics, per layer (not serialised)
    stats: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getitem__(self, name: str) -> LayerAnalysis:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer '{name}' in the report; layers: {[x.name for x in self.layers]}")

    def bottlenecks(self, k: int | None = None) -> list[LayerAnalysis]:
        """Layers with at least one reason, best candidates first."""
        found = [x for x in self.layers if x.is_bottleneck]
        return found if k is None else found[:k]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (non-finite numbers become None)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stats"}
        data["layers"] = [asdict(x) for x in self.layers]
        return _clean(data)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON for machines."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A fixed-width table for people."""
        names = sorted({m for x in self.layers for m in x.metrics})
        cols = " ".join(f"{n[:14]:>14}" for n in names)
        head = f"{'layer':<28} {'units':>6} {'score':>6}  {cols}"
        rows = [head, "-" * len(head)]
        for x in self.layers:
            cells = " ".join(f"{x.metrics.get(n, float('nan')):>14.4g}" for n in names)
            rows.append(f"{x.name[:28]:<28} {x.units:>6} {x.score:>6.2f}  {cells}")
            rows.extend(f"    because {r}" for r in x.reasons)
            rows.extend(f"    warning: {w}" for w in x.warnings)
        if self.never_ran:
            rows.append(f"never ran: {', '.join(self.never_ran)}")
        return "\n".join(rows)
