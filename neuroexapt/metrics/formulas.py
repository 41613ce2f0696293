"""The three formulas of the information-theoretic design document, as documented functions.

* Layer importance ``I(L_i;O) = H(O) - H(O|L_i) * psi(task)``.
* Redundancy ``R = 1 - sum_i I(L_i;O) / (H(O) * exp(-lambda * depth))``.
* Structural entropy balance ``dS/dt = -alpha * I(L_i;O) + beta * KL(p_old || p_new)``,
  tracked across edits by :class:`StructuralEntropy`.

All quantities are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from neuroexapt.errors import ConfigError

__all__ = [
    "PSI",
    "TASK_TYPES",
    "StructuralEntropy",
    "layer_importance",
    "output_kl",
    "psi",
    "redundancy",
]

# psi(task): the share of the output's conditional entropy H(O|L) that a layer is charged
# with. For classification the target is a discrete label and H(O|L) is exactly the label
# uncertainty left once the layer is known, so psi = 1 and the importance is the mutual
# information I(L;O). For regression H(O|L) is a differential entropy that also holds the
# targets' irreducible noise, which no layer can remove; psi = 1/2 charges a layer with half
# of it. That value is a modelling choice, not a derived constant: pass psi_value= to change it.
PSI: dict[str, float] = {"classification": 1.0, "regression": 0.5}
TASK_TYPES: tuple[str, ...] = tuple(PSI)


def psi(task_type: str) -> float:
    """The task factor psi of the layer-importance formula (see :data:`PSI`)."""
    if task_type not in PSI:
        raise ConfigError(
            f"unknown task_type {task_type!r}; valid task types: {', '.join(TASK_TYPES)}"
        )
    return PSI[task_type]


def _check_finite(**values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {v!r}")


def layer_importance(
    h_output: float, h_output_given_layer: float, task_type: str = "classification",
    psi_value: float | None = None,
) -> float:
    """``I(L;O) = H(O) - H(O|L) * psi(task_type)``.

    Args:
        h_output: entropy of the output (labels or model outputs), nats.
        h_output_given_layer: conditional entropy of the output given the layer, nats.
        task_type: ``"classification"`` or ``"regression"`` (selects psi).
        psi_value: override psi.

    Returns:
        The importance in nats; with psi = 1 it equals the mutual information.
    """
    factor = psi(task_type)  # validates task_type even when psi is overridden
    factor = factor if psi_value is None else psi_value
    _check_finite(h_output=h_output, h_output_given_layer=h_output_given_layer, psi=factor)
    return float(h_output - h_output_given_layer * factor)


def redundancy(
    importances: Sequence[float], h_output: float, depth: int, lam: float = 0.05
) -> float:
    """``R = 1 - sum_i I(L_i;O) / (H(O) * exp(-lam * depth))``.

    ``H(O) exp(-lam depth)`` is the information a network of that depth is expected to keep
    about the output per layer budget: deeper networks are expected to retain less in each
    layer. R near 1 means the layers carry little of it (redundant capacity); R <= 0 means they
    carry at least that much. The value is not clamped: it can be negative when the layers'
    importances add up to more than the budget.
    """
    _check_finite(h_output=h_output, lam=lam)
    if h_output <= 0:
        raise ConfigError(f"h_output must be > 0 to normalise redundancy, got {h_output}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth must be a positive int, got {depth!r}")
    return float(1.0 - sum(importances) / (h_output * math.exp(-lam * depth)))


def output_kl(logits_old: torch.Tensor, logits_new: torch.Tensor) -> float:
    """Mean ``KL(p_old || p_new)`` between two batches of output distributions (logits)."""
    if logits_old.shape != logits_new.shape:
        raise ConfigError(
            f"output shapes differ: {tuple(logits_old.shape)} vs {tuple(logits_new.shape)}"
        )
    log_p = F.log_softmax(logits_old.double(), dim=-1)
    log_q = F.log_softmax(logits_new.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean().clamp(min=0.0))


@dataclass
class StructuralEntropy:
    """Integrates ``dS/dt = -alpha * sum_i I(L_i;O) + beta * KL(p_old || p_new)`` over time.

    Call :meth:`step` once per measurement (e.g. per epoch) with the layers' importances and
    the KL divergence between the model's output distributions before and after any edit made
    since the last step (0 when nothing changed or the edit preserved the function). ``S``
    falls while the layers carry information about the output and rises when edits disturb
    what the model computes.
    """

    alpha: float = 1.0
    beta: float = 1.0
    value: float = 0.0
    history: list[tuple[float, float, float]] = field(default_factory=list)  # (S, dS, KL)

    def step(self, importances: Sequence[float], kl: float = 0.0, dt: float = 1.0) -> float:
        """Advance by ``dt``; returns the change ``dS``."""
        _check_finite(kl=kl, dt=dt, alpha=self.alpha, beta=self.beta)
        if kl < 0:
            raise ConfigError(f"kl must be >= 0, got {kl}")
        ds = (-self.alpha * float(sum(importances)) + self.beta * kl) * dt
        self.value += ds
        self.history.append((self.value, ds, kl))
        return ds
