"""What the training-framework callbacks share: DNM's decision after an evaluation."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["GrowthStep"]


class GrowthStep:
    """A :class:`~neuroexapt.core.DNMFramework` driven by a monitored metric.

    Args:
        config: the DNM configuration (checked here, so a bad key fails at construction).
        monitor: the metric's name (for the callbacks' messages).
        mode: ``"max"`` (higher is better) or ``"min"``.
        options: further DNMFramework arguments.
    """

    def __init__(self, config: Any, monitor: str, mode: str, options: dict[str, Any]) -> None:
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
        from neuroexapt.policy.config import DNMConfig

        self.config = DNMConfig.from_dict(config)
        self.monitor, self.mode, self.options = monitor, mode, dict(options)
        self.dnm: Any = None

    def start(self, model: nn.Module, **options: Any) -> None:
        """Build the framework around ``model`` (once)."""
        from neuroexapt.core import DNMFramework

        if self.dnm is None:
            self.dnm = DNMFramework(model, self.config, **{**self.options, **options})

    def after_evaluation(self, epoch: int, value: float, optimizer: torch.optim.Optimizer
                         ) -> dict[str, Any] | None:
        """Measure, record ``value`` of the monitored metric, and grow if the policy says so;
        the result of the change, or None."""
        assert self.dnm is not None
        self.dnm.optimizer = optimizer
        self.dnm.update_caches()
        self.dnm.record_performance(value if self.mode == "max" else -value)
        go, reasons = self.dnm.should_trigger_morphogenesis(epoch)
        if not go:
            return None
        result = self.dnm.execute_morphogenesis(epoch)
        logger.info("epoch %d: %d changes, parameters %d -> %d (%s)", epoch,
                    len(result["events"]), result["parameters_before"],
                    result["parameters_after"], "; ".join(reasons[:2]))
        return result

    def close(self) -> None:
        """Remove the framework's hooks."""
        if self.dnm is not None:
            self.dnm.close()
            self.dnm = None
