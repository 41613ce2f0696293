"""When to change the architecture: interval, plateau, bottleneck evidence, budgets."""

from __future__ import annotations

from dataclasses import dataclass, field

from neuroexapt.policy.config import DNMConfig

__all__ = ["MorphogenesisTrigger"]


@dataclass
class MorphogenesisTrigger:
    """Decides whether to trigger morphogenesis; keeps the validation history it needs.

    A check happens every ``morphogenesis_interval`` epochs. It fires when the change budget
    (``max_architecture_changes``) is not spent, no earlier change is still being evaluated,
    and the validation metric has reached a plateau: its last value exceeds the best of the
    ``plateau_window`` values before it by less than ``performance_improvement_threshold``
    (one epoch that does not beat the recent best is enough). The layers
    the analysis ranked as bottlenecks are reported with it and decide where to change. With
    ``trigger_on_bottleneck`` a bottleneck alone also triggers (bottleneck scores are relative
    to the other layers, so some layer nearly always qualifies: use it with a small budget).
    """

    config: DNMConfig
    history: list[float] = field(default_factory=list)
    changes: int = 0
    evaluating_until: int = -1  # last epoch of the current evaluation window

    def record(self, metric: float) -> None:
        """Append one validation measurement."""
        self.history.append(float(metric))

    def plateau(self) -> tuple[bool, str]:
        """Whether the metric stopped improving, with the measured improvement."""
        w = self.config.plateau_window
        if len(self.history) <= w:
            return False, f"only {len(self.history)} validation records, plateau needs {w + 1}"
        last, best = self.history[-1], max(self.history[-w - 1 : -1])
        gain = last - best
        limit = self.config.performance_improvement_threshold
        text = (f"validation improved by {gain:+.4f}: last {last:.4f} vs best {best:.4f} of "
                f"the {w} epochs before (threshold {limit})")
        return gain < limit, text

    def check(self, epoch: int, bottlenecks: list[str]) -> tuple[bool, list[str]]:
        """(trigger?, reasons); ``bottlenecks`` lists reasons from the analysis."""
        cfg = self.config
        if self.changes >= cfg.max_architecture_changes:
            return False, [f"budget spent: {self.changes} of {cfg.max_architecture_changes} "
                           "architecture changes made"]
        if epoch % cfg.morphogenesis_interval != 0:
            return False, [f"epoch {epoch} is not a multiple of morphogenesis_interval="
                           f"{cfg.morphogenesis_interval}"]
        if epoch <= self.evaluating_until:
            return False, [f"the last change is evaluated until epoch {self.evaluating_until}"]
        stalled, text = self.plateau()
        evidence = [f"bottleneck: {b}" for b in bottlenecks]
        if stalled:
            return True, [f"plateau: {text}", *evidence]
        if cfg.trigger_on_bottleneck and evidence:
            return True, evidence
        return False, [f"no plateau: {text}"]
