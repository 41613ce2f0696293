"""``search``: train a relaxed model's weights and its architecture parameters in turn.

First-order DARTS (Liu et al., ICLR 2019): the training batches are split in two, alternately:
even batches update the weights (their own optimizer, SGD with momentum by default), odd ones
the architecture parameters (Adam, ``betas=(0.5, 0.999)``, as DARTS), so the choices are
judged on data the weights were not fitted to. The Gumbel temperature falls geometrically
from ``tau[0]`` to ``tau[1]`` over the epochs. With ``penalty > 0`` the architecture loss adds
``penalty * expected_cost / reference_cost`` (:func:`neuroexapt.relax.expected_cost`, the
reference being the cost of the options as the search starts), which asks for a smaller
(``cost="parameters"``/``"macs"``) or faster (``"latency"``) model.

Each epoch's losses, temperature, expected cost and every option's probability are logged
(``log_dir``: ``history.jsonl`` and TensorBoard, and :func:`plot_choices` draws them).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.errors import AnalysisError, ConfigError
from neuroexapt.relax.api import (
    arch_parameters,
    choices,
    expected_cost,
    set_temperature,
    weight_parameters,
)
from neuroexapt.train.sinks import RunLogger

logger = logging.getLogger(__name__)

__all__ = ["SearchResult", "plot_choices", "search"]

Batch = tuple[Any, torch.Tensor]


@dataclass
class SearchResult:
    """What a search did.

    Attributes:
        rows: one dict per epoch: ``train_loss``, ``arch_loss``, ``tau``, ``cost`` and
            ``p/<choice>/<option>`` probabilities.
        chosen: the most probable option of each choice at the end.
        seconds: wall time of the search.
    """

    rows: list[dict[str, float]] = field(default_factory=list)
    chosen: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _args(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def search(
    model: nn.Module, data: Iterable[Batch], epochs: int, *,
    optimizer: torch.optim.Optimizer | None = None, lr: float = 0.05, arch_lr: float = 3e-3,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    tau: tuple[float, float] = (1.0, 0.1), penalty: float = 0.0, cost: str = "parameters",
    log_dir: str | os.PathLike[str] | None = None, tensorboard: bool = False,
) -> SearchResult:
    """Search the choices of a relaxed model (see the module docstring).

    Args:
        model: a model with choices (:func:`neuroexapt.relax.relax`), trained in place.
        data: ``(inputs, targets)`` batches, read once per epoch; even batches train the
            weights, odd ones the architecture.
        epochs: passes over ``data``.
        optimizer: the weights' optimizer (default SGD, momentum 0.9, ``lr``); it must not
            hold the architecture parameters.
        lr: learning rate of the default weights' optimizer.
        arch_lr: learning rate of the architecture parameters' Adam.
        loss_fn: the task loss.
        tau: the Gumbel temperature at the first and at the last epoch.
        penalty: weight of the relative expected cost in the architecture loss (0: none).
        cost: ``"parameters"``, ``"macs"`` or ``"latency"``.
        log_dir: where ``history.jsonl`` (and with ``tensorboard=True`` TensorBoard scalars)
            are written.

    Raises:
        ConfigError: no choice in the model, bad arguments, an optimizer holding
            architecture parameters.
        AnalysisError: ``data`` yields fewer than two batches, or a loss is not finite.
    """
    found = choices(model)
    if not found:
        raise ConfigError("search: the model has no relaxed choice (call relax first)")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive int, got {epochs!r}")
    if not (isinstance(tau, tuple | list) and len(tau) == 2 and all(
            isinstance(t, int | float) and t > 0 for t in tau)):
        raise ConfigError(f"tau must be (first, last) positive temperatures, got {tau!r}")
    if not isinstance(penalty, int | float) or isinstance(penalty, bool) or penalty < 0:
        raise ConfigError(f"penalty must be a number >= 0, got {penalty!r}")
    arch = list(arch_parameters(model))
    if optimizer is None:
        optimizer = torch.optim.SGD(weight_parameters(model), lr=lr, momentum=0.9,
                                    weight_decay=3e-4)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) in held for p in arch):
        raise ConfigError("search: the weights' optimizer holds architecture parameters; "
                          "build it over neuroexapt.relax.weight_parameters(model)")
    arch_opt = torch.optim.Adam(arch, lr=arch_lr, betas=(0.5, 0.999), weight_decay=1e-3)
    reference = float(expected_cost(model, cost).detach()) if penalty > 0 else 1.0
    sink = RunLogger(log_dir, tensorboard=tensorboard) if log_dir is not None else None
    result = SearchResult()
    start = time.perf_counter()
    model.train()
    try:
        for epoch in range(epochs):
            t = tau[0] * (tau[1] / tau[0]) ** (epoch / max(1, epochs - 1))
            set_temperature(model, t)
            sums, counts = [0.0, 0.0], [0, 0]
            for i, (x, y) in enumerate(data):
                side = i % 2  # 0: weights, 1: architecture
                loss = loss_fn(model(*_args(x)), y)
                total = loss
                if side and penalty > 0:
                    total = loss + penalty * expected_cost(model, cost) / max(reference, 1e-12)
                if not torch.isfinite(total):
                    raise AnalysisError(f"search: the loss is {float(total)} at epoch "
                                        f"{epoch + 1}, batch {i}; lower lr or arch_lr")
                opt = arch_opt if side else optimizer
                optimizer.zero_grad(set_to_none=True)
                arch_opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                sums[side] += float(loss.detach())
                counts[side] += 1
            if counts[1] == 0:
                raise AnalysisError("search: data yielded fewer than two batches; the "
                                    "architecture needs batches of its own")
            row = {"epoch": float(epoch + 1), "train_loss": sums[0] / counts[0],
                   "arch_loss": sums[1] / counts[1], "tau": t,
                   "cost": float(expected_cost(model, cost).detach())
                   if all(cost in c.costs for c in found.values()) else math.nan}
            for name, choice in found.items():
                for k, p in enumerate(choice.probabilities().detach().tolist()):
                    row[f"p/{name}/{k}"] = p
            result.rows.append(row)
            if sink is not None:
                sink.log(epoch + 1, **{k: v for k, v in row.items() if k != "epoch"})
            logger.info("search epoch %d: loss %.4f / %.4f, tau %.3f, chosen %s", epoch + 1,
                        row["train_loss"], row["arch_loss"], t,
                        {n: c.index for n, c in found.items()})
    finally:
        if sink is not None:
            sink.close()
    result.chosen = {name: c.index for name, c in found.items()}
    result.seconds = time.perf_counter() - start
    return result


def plot_choices(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """PNG of every option's probability per epoch, one panel per choice."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from e
    if not result.rows:
        raise ConfigError("plot_choices: the search logged no epoch")
    names = list(dict.fromkeys(k.split("/")[1] for k in result.rows[0] if k.startswith("p/")))
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * len(names)), squeeze=False)
    epochs = [r["epoch"] for r in result.rows]
    for ax, name in zip(axes[:, 0], names, strict=True):
        keys = [k for k in result.rows[0] if k.startswith(f"p/{name}/")]
        for key in keys:
            ax.plot(epochs, [r[key] for r in result.rows], marker="o",
                    label=f"option {key.rsplit('/', 1)[1]}")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("epoch")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
