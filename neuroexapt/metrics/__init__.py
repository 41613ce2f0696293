"""Measuring what a network's units carry: entropy, mutual information, HSIC, effective rank.

Estimators are pure functions of activation tensors, in nats, bounded where the quantity is
(mutual information with K classes never exceeds ``log K``).

Example:
    >>> from neuroexapt import metrics
    >>> x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    >>> metrics.mutual_information(x, y, method="ksg")  # about 0: x ignores y
"""

from __future__ import annotations

from neuroexapt.metrics.analyze import BOTTLENECK_METRICS, DEFAULT_THRESHOLDS, analyze
from neuroexapt.metrics.collector import ActivationCollector, LayerStats
from neuroexapt.metrics.cost import count_macs, measure_latency
from neuroexapt.metrics.estimators import (
    MI_METHODS,
    SIGMA_RULES,
    UNIT_ENTROPY_METHODS,
    effective_rank,
    entropy,
    hsic,
    label_entropy,
    mutual_information,
    renyi_entropy,
    unit_entropy,
)
from neuroexapt.metrics.formulas import (
    PSI,
    TASK_TYPES,
    StructuralEntropy,
    layer_importance,
    output_kl,
    psi,
    redundancy,
)
from neuroexapt.metrics.layer_metrics import (
    ablation_loss,
    activation_diversity,
    get_importance_metric,
    gradient_variance,
    information_retained,
    list_importance_metrics,
    register_importance_metric,
    unit_scores,
)
from neuroexapt.metrics.report import AnalysisReport, LayerAnalysis, Reason
from neuroexapt.metrics.stats import NonFiniteCount, Reservoir, RunningMoments

__all__ = [
    "BOTTLENECK_METRICS",
    "DEFAULT_THRESHOLDS",
    "MI_METHODS",
    "PSI",
    "SIGMA_RULES",
    "TASK_TYPES",
    "UNIT_ENTROPY_METHODS",
    "ActivationCollector",
    "AnalysisReport",
    "LayerAnalysis",
    "LayerStats",
    "NonFiniteCount",
    "Reason",
    "Reservoir",
    "RunningMoments",
    "StructuralEntropy",
    "ablation_loss",
    "activation_diversity",
    "analyze",
    "count_macs",
    "effective_rank",
    "entropy",
    "get_importance_metric",
    "gradient_variance",
    "hsic",
    "information_retained",
    "label_entropy",
    "layer_importance",
    "list_importance_metrics",
    "measure_latency",
    "mutual_information",
    "output_kl",
    "psi",
    "redundancy",
    "register_importance_metric",
    "renyi_entropy",
    "unit_entropy",
    "unit_scores",
]
