"""Configuration of the DNM framework: every key of the design document, validated once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from neuroexapt.errors import ConfigError
from neuroexapt.metrics.analyze import BOTTLENECK_METRICS

__all__ = ["DIVISION_STRATEGIES", "DNMConfig"]

DIVISION_STRATEGIES: tuple[str, ...] = ("gradient_based", "activation_based", "hybrid")


@dataclass(frozen=True)
class DNMConfig:
    """Settings of :class:`neuroexapt.core.DNMFramework` (keys of the design document).

    Build it from the document's dict with :meth:`from_dict`; unknown keys and bad values are
    rejected by name with the valid choices.
    """

    # trigger control
    morphogenesis_interval: int = 3  # epochs between checks
    max_morphogenesis_per_epoch: int = 1  # changes applied in one execute_morphogenesis call
    performance_improvement_threshold: float = 0.01  # gain over the window below which = plateau
    # neuron division
    neuron_division_strategy: str = "hybrid"  # gradient_based | activation_based | hybrid
    division_noise_scale: float = 0.1  # relative std of the symmetry-breaking noise
    progressive_activation_epochs: int = 5  # epochs over which that noise is switched on
    # bottleneck detection
    bottleneck_detection_metrics: tuple[str, ...] = BOTTLENECK_METRICS
    # safety
    rollback_enabled: bool = True  # restore model and optimizer when validation drops
    performance_drop_threshold: float = 0.05  # drop of the validation metric that triggers it
    max_architecture_changes: int = 10  # total changes over the run
    # beyond the document
    division_fraction: float = 0.25  # units added to a layer per division, as a fraction
    evaluation_window: int = 2  # epochs after a change during which a drop rolls it back
    plateau_window: int = 3  # epochs over which improvement is measured
    max_parameters: int | None = None  # refuse changes that would exceed this count
    analysis_batches: int = 4  # probe batches analysed by each update_caches()
    allow_deepen: bool = True  # deepen at a bottleneck when splitting is not possible
    allow_connections: bool = True  # grow skip connections where information is lost
    trigger_on_bottleneck: bool = False  # trigger on bottleneck evidence alone, without plateau
    # growth policy (neuroexapt.policy.growth)
    growth_budget: int | str | None = None  # cost the grown model may reach: absolute, or "2x"
    growth_cost: str = "macs"  # macs | parameters: what the budget and the ranking count
    growth_by: float = 0.5  # fraction of total_epochs by which the budget is spent
    growth_steps: int = 4  # growth steps the budget is spread over
    total_epochs: int | None = None  # epochs of the whole run (needed with growth_budget)
    growth_init: str = "orthogonal"  # orthogonal | gradmax | split: how new units start
    new_unit_lr_scale: float = 1.0  # learning-rate factor of new units' entries
    new_unit_lr_epochs: int = 3  # epochs that factor lasts
    record_every: int = 10  # training batches between two recorded ones
    growth_multiple: int = 8  # grown widths are multiples of this (CPU vector kernels)

    def __post_init__(self) -> None:
        _positive_int("morphogenesis_interval", self.morphogenesis_interval)
        _positive_int("max_morphogenesis_per_epoch", self.max_morphogenesis_per_epoch)
        _positive_int("max_architecture_changes", self.max_architecture_changes, zero=True)
        _positive_int("evaluation_window", self.evaluation_window)
        _positive_int("plateau_window", self.plateau_window)
        _positive_int("analysis_batches", self.analysis_batches)
        _positive_int("progressive_activation_epochs", self.progressive_activation_epochs,
                      zero=True)
        _fraction("performance_improvement_threshold", self.performance_improvement_threshold)
        _fraction("performance_drop_threshold", self.performance_drop_threshold)
        _fraction("division_fraction", self.division_fraction, open_zero=True)
        if not _number(self.division_noise_scale) or self.division_noise_scale < 0:
            raise ConfigError(
                f"division_noise_scale must be a number >= 0, got {self.division_noise_scale!r}"
            )
        if self.neuron_division_strategy not in DIVISION_STRATEGIES:
            raise ConfigError(
                f"neuron_division_strategy {self.neuron_division_strategy!r} is not one of "
                f"{', '.join(DIVISION_STRATEGIES)}"
            )
        metrics = self.bottleneck_detection_metrics
        if isinstance(metrics, str) or not metrics:
            raise ConfigError("bottleneck_detection_metrics must be a non-empty list of names, "
                              f"from {', '.join(BOTTLENECK_METRICS)}; got {metrics!r}")
        for m in metrics:
            if m not in BOTTLENECK_METRICS:
                raise ConfigError(f"bottleneck_detection_metrics has unknown metric {m!r}; "
                                  f"valid: {', '.join(BOTTLENECK_METRICS)}")
        object.__setattr__(self, "bottleneck_detection_metrics", tuple(metrics))
        for name in ("rollback_enabled", "allow_deepen", "allow_connections",
                     "trigger_on_bottleneck"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.max_parameters is not None:
            _positive_int("max_parameters", self.max_parameters)
        self._check_growth()

    def _check_growth(self) -> None:
        from neuroexapt.policy.growth import GROWTH_COSTS, GROWTH_INITS

        _positive_int("growth_steps", self.growth_steps)
        _positive_int("new_unit_lr_epochs", self.new_unit_lr_epochs)
        _positive_int("record_every", self.record_every)
        _positive_int("growth_multiple", self.growth_multiple)
        _fraction("growth_by", self.growth_by, open_zero=True)
        if self.growth_cost not in GROWTH_COSTS:
            raise ConfigError(f"growth_cost {self.growth_cost!r} is not one of "
                              f"{', '.join(GROWTH_COSTS)}")
        if self.growth_init not in GROWTH_INITS:
            raise ConfigError(f"growth_init {self.growth_init!r} is not one of "
                              f"{', '.join(GROWTH_INITS)}")
        if not _number(self.new_unit_lr_scale) or self.new_unit_lr_scale <= 0:
            raise ConfigError(f"new_unit_lr_scale must be a number > 0 (1 = off), got "
                              f"{self.new_unit_lr_scale!r}")
        if self.total_epochs is not None:
            _positive_int("total_epochs", self.total_epochs)
        budget = self.growth_budget
        if budget is None:
            return
        growth_ratio(budget)  # validates the form
        if self.total_epochs is None:
            raise ConfigError("growth_budget needs total_epochs (the run's number of epochs), "
                              "so that the budget is spent by growth_by of training; add "
                              "'total_epochs': epochs")

    def growth_target(self, current: float) -> float | None:
        """The cost the grown model may reach, given the model's ``current`` cost."""
        if self.growth_budget is None:
            return None
        ratio = growth_ratio(self.growth_budget)
        target = current * ratio if ratio is not None else float(self.growth_budget)
        if target < current:
            raise ConfigError(
                f"growth_budget={self.growth_budget!r} is below the model's current "
                f"{current:,.0f} {self.growth_cost}: pass a larger number, or a ratio such as "
                "'2x' (twice the current cost)")
        return target

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> DNMConfig:
        """Validate the design document's dict; unknown keys are rejected by name."""
        if config is None:
            return cls()
        if isinstance(config, DNMConfig):
            return config
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a dict or DNMConfig, got {type(config).__name__}")
        valid = [f.name for f in fields(cls)]
        for key in config:
            if key not in valid:
                raise ConfigError(f"unknown DNM config key {key!r}; valid keys: {', '.join(valid)}")
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bottleneck_detection_metrics"] = list(self.bottleneck_detection_metrics)
        return out


def growth_ratio(budget: Any) -> float | None:
    """The ratio of a ``"2x"`` budget, None for an absolute one; ConfigError for bad forms."""
    if isinstance(budget, str):
        text = budget.strip().lower()
        try:
            ratio = float(text[:-1]) if text.endswith("x") else math.nan
        except ValueError:
            ratio = math.nan
        if not (math.isfinite(ratio) and ratio >= 1):
            raise ConfigError(f"growth_budget {budget!r} must be a count (an int) or a ratio "
                              "of the current cost such as '2x' (at least '1x')")
        return ratio
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"growth_budget must be a positive int (an absolute count) or a "
                          f"ratio such as '2x', got {budget!r}")
    return None


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(name: str, v: Any, zero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1):
        raise ConfigError(f"{name} must be an int >= {0 if zero else 1}, got {v!r}")


def _fraction(name: str, v: Any, open_zero: bool = False) -> None:
    if not _number(v) or not (0 < v <= 1 if open_zero else 0 <= v <= 1):
        low = "(0" if open_zero else "[0"
        raise ConfigError(f"{name} must be a number in {low}, 1], got {v!r}")
