"""Per-layer and per-unit metrics computed from a collector's :class:`LayerStats`.

The four bottleneck metrics of the DNM design document:

* ``gradient_variance``: mean over units of the variance, across samples, of the loss gradient
  w.r.t. the unit. Samples that disagree about what a layer should output are the sign of a
  layer that cannot serve them all.
* ``activation_diversity``: effective rank of the layer's pooled activations divided by the
  number of units it can use (``min(units, samples)``); near 1 the layer uses every dimension
  it has. Dead and saturated unit fractions are reported beside it.
* ``information_flow``: information the layer keeps about the labels, I(L;Y), and the part of
  it lost relative to the previous layer.
* ``performance_sensitivity``: increase of a held-out loss when the layer's output (or one
  unit) is ablated, i.e. replaced by its batch mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError
from neuroexapt.metrics.collector import LayerStats, model_output
from neuroexapt.metrics.estimators import effective_rank, hsic, mutual_information, unit_entropy

__all__ = [
    "ImportanceFn",
    "ablation_loss",
    "activation_diversity",
    "get_importance_metric",
    "gradient_variance",
    "importance_value",
    "information_retained",
    "list_importance_metrics",
    "register_importance_metric",
    "unit_scores",
]

ImportanceFn = Callable[[torch.Tensor, torch.Tensor], Any]
UNIT_SCORE_KINDS = ("gradient", "activation", "entropy", "hybrid")


def gradient_variance(stats: LayerStats) -> float:
    """Mean over units of Var[dLoss/dunit] across recorded samples."""
    return float(stats.grad_var.nan_to_num(0.0).mean())


def activation_diversity(stats: LayerStats) -> dict[str, float]:
    """Effective-rank ratio, dead fraction and saturated fraction of a layer."""
    x, _ = stats.samples()
    usable = min(x.shape[1], x.shape[0]) if x.shape[0] else 0
    ratio = effective_rank(x) / usable if x.shape[0] >= 2 and usable else float("nan")
    out = {"rank_ratio": float(ratio), "dead_fraction": float(stats.dead_fraction.mean())}
    try:
        out["saturated_fraction"] = float(stats.saturated_fraction.mean())
    except ConfigError:  # not tracked without a saturation threshold
        out["saturated_fraction"] = float("nan")
    return out


def information_retained(stats: LayerStats, method: str = "ksg",
                         sigma: float | str | None = "median") -> float:
    """I(L;Y) in nats from the layer's reservoir of pooled activations and labels
    (``sigma`` is the bandwidth of ``method="renyi"``)."""
    x, y = stats.samples()
    if y is None:
        raise ConfigError(
            f"layer '{stats.name}' has no targets: call collector.set_targets(y) before each "
            "forward pass (analyze() does it for you)"
        )
    kwargs: dict[str, Any] = {"method": method}
    if method == "renyi":
        kwargs["sigma"] = sigma
    return mutual_information(x, y, **kwargs)


def unit_scores(stats: LayerStats, kind: str = "hybrid") -> torch.Tensor:
    """Per-unit scores for choosing units to split (high) or remove (low).

    ``"gradient"``: E[g^2], how much the loss wants the unit to change. ``"activation"``: the
    unit's activation variance (a unit that never varies carries nothing). ``"entropy"``: the
    binned entropy of the unit over the reservoir. ``"hybrid"``: the mean of the gradient and
    activation scores, each divided by its maximum.
    """
    if kind not in UNIT_SCORE_KINDS:
        raise ConfigError(f"unknown unit score {kind!r}; valid: {', '.join(UNIT_SCORE_KINDS)}")
    if kind == "gradient":
        return (stats.grad_mean.pow(2) + stats.grad_var).nan_to_num(0.0)
    if kind == "activation":
        return stats.var.nan_to_num(0.0)
    if kind == "entropy":
        return unit_entropy(stats.samples()[0])
    g, a = unit_scores(stats, "gradient"), unit_scores(stats, "activation")
    return 0.5 * (g / g.max().clamp(min=1e-30) + a / a.max().clamp(min=1e-30))


def ablation_loss(
    model: nn.Module, layer: nn.Module, inputs: tuple[torch.Tensor, ...],
    targets: torch.Tensor, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    units: torch.Tensor | None = None, noise: float | None = None, seed: int = 0,
) -> float:
    """Held-out loss with ``layer``'s output (or only ``units`` of it) ablated or perturbed.

    Ablation (default) replaces each unit by its mean over the batch (and positions); with
    ``noise=s`` the unit is perturbed instead by Gaussian noise of ``s`` times its standard
    deviation (seeded). Units are channels (dim 1) of 3+-D outputs of convolutions, otherwise
    the last dim. The model is evaluated as it is (call it in eval mode) under
    ``torch.no_grad()``.
    """
    if noise is not None and (isinstance(noise, bool) or not noise >= 0):
        raise ConfigError(f"noise must be a number >= 0 or None, got {noise!r}")
    gen = torch.Generator().manual_seed(seed)

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else out.dim() - 1
        reduce = [d for d in range(out.dim()) if d != dim]
        if noise is None:
            mean = out.mean(dim=reduce, keepdim=True).expand_as(out).clone()  # in-place safe
        else:
            std = out.std(dim=reduce, keepdim=True) if out.numel() > out.shape[dim] else 0.0
            jitter = torch.randn(out.shape, generator=gen).to(out)
            mean = out + noise * std * jitter
        if units is None:
            return mean
        mask_shape = [1] * out.dim()
        mask_shape[dim] = out.shape[dim]
        mask = torch.zeros(out.shape[dim], dtype=torch.bool, device=out.device)
        mask[units.to(out.device)] = True
        return torch.where(mask.view(mask_shape), mean, out)

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return float(loss_fn(model_output(model(*inputs)), targets))
    finally:
        handle.remove()


def _mi(x: torch.Tensor, y: torch.Tensor) -> float:
    return mutual_information(x, y)


def _hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    return hsic(x, y)


_IMPORTANCE: dict[str, ImportanceFn] = {"mutual_information": _mi, "hsic": _hsic}


def register_importance_metric(name: str, fn: ImportanceFn) -> None:
    """Register ``fn(layer_output [N, D], target_output [N] or [N, K]) -> score``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an importance metric needs a non-empty name, got {name!r}")
    if not callable(fn):
        raise ConfigError(f"importance metric '{name}' must be callable, got {fn!r}")
    _IMPORTANCE[name] = fn


def get_importance_metric(name: str | ImportanceFn) -> ImportanceFn:
    """The registered metric ``name`` (a callable is returned as it is)."""
    if callable(name):
        return name
    if name not in _IMPORTANCE:
        raise ConfigError(
            f"unknown importance metric {name!r}; registered: "
            f"{', '.join(list_importance_metrics())}"
        )
    return _IMPORTANCE[name]


def importance_value(fn: ImportanceFn, layer: str, x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[float, torch.Tensor | None]:
    """Call an importance metric on one layer and check what it returns.

    ``fn(layer_output [N, D], target_output)`` may return a scalar (a Python number, a 0-d or
    one-element tensor: the layer's importance) or a ``[D]`` tensor (one score per unit; the
    layer's importance is then their mean). Returns ``(layer importance, per-unit scores or
    None)``.

    Raises:
        ConfigError: ``fn`` raised, or returned something else, or a NaN or infinite value;
            the message names the layer and the value.
    """
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        value = fn(x, y)
    except Exception as e:
        raise ConfigError(f"the importance metric {name} raised on layer '{layer}' "
                          f"(layer_output {tuple(x.shape)}, target_output {tuple(y.shape)}): "
                          f"{type(e).__name__}: {e}") from e
    units = None
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        if value.dim() != 1 or value.numel() != x.shape[1]:
            raise ConfigError(
                f"the importance metric {name} returned a tensor of shape {tuple(value.shape)} "
                f"on layer '{layer}'; return a scalar (the layer's importance) or a "
                f"[{x.shape[1]}] tensor (one score per unit)")
        units = value.detach().to(torch.float64).cpu()
        score = float(units.mean())
    else:
        try:
            score = float(value.detach().reshape(()) if isinstance(value, torch.Tensor)
                          else value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"the importance metric {name} returned {value!r} on layer "
                              f"'{layer}'; return a number (the layer's importance) or a "
                              f"[{x.shape[1]}] tensor (one score per unit)") from e
    if not math.isfinite(score) or (units is not None and not bool(torch.isfinite(units).all())):
        raise ConfigError(f"the importance metric {name} returned a non-finite value on layer "
                          f"'{layer}': {value!r}; return finite scores")
    return score, units


def list_importance_metrics() -> list[str]:
    """Names of the registered importance metrics."""
    return sorted(_IMPORTANCE)
