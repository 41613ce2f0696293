"""Measuring what a network's units carry: entropy, mutual information, HSIC, effective rank.

Estimators are pure functions of activation tensors, in nats, bounded where the quantity is
(mutual information with K classes never exceeds ``log K``).

Example:
    >>> from neuroexapt import metrics
    >>> x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    >>> metrics.mutual_information(x, y, method="ksg")  # about 0: x ignores y
"""

from __future__ import annotations

from neuroexapt.metrics.collector import ActivationCollector, LayerStats
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
from neuroexapt.metrics.stats import NonFiniteCount, Reservoir, RunningMoments

__all__ = [
    "MI_METHODS",
    "SIGMA_RULES",
    "UNIT_ENTROPY_METHODS",
    "ActivationCollector",
    "LayerStats",
    "NonFiniteCount",
    "Reservoir",
    "RunningMoments",
    "effective_rank",
    "entropy",
    "hsic",
    "label_entropy",
    "mutual_information",
    "renyi_entropy",
    "unit_entropy",
]
