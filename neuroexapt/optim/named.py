"""Optimizer state keyed by parameter name, so it survives rebuilding the model's parameters."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import NeuroExaptError

__all__ = ["load_named_state", "named_state"]


def named_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter names instead of positions (a deep copy).

    Raises:
        NeuroExaptError: the optimizer holds parameters that are not in ``model``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(flat) if id(p) not in names]
    if missing:
        raise NeuroExaptError(
            f"the optimizer holds {len(missing)} parameters that are not in the model; use "
            "the optimizer that trains this model"
        )
    state = optimizer.state_dict()
    index_to_name = {i: names[id(p)] for i, p in enumerate(flat)}
    groups = [{**g, "params": [index_to_name[i] for i in g["params"]]}
              for g in state["param_groups"]]
    return copy.deepcopy({"param_groups": groups,
                          "state": {index_to_name[i]: s for i, s in state["state"].items()}})


def load_named_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
    *, reassign: bool = False,
) -> None:
    """Load state written by :func:`named_state` into ``optimizer``.

    Args:
        model: the model whose parameters the names refer to.
        optimizer: the optimizer to fill; it must have as many param groups as ``saved``.
        saved: the output of :func:`named_state`.
        reassign: point each group at the named parameters (restoring a snapshot of an edited
            model); otherwise the groups must already hold exactly those parameters.

    Raises:
        NeuroExaptError: the groups or names do not match.
    """
    params = dict(model.named_parameters())
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise NeuroExaptError(
            f"the saved optimizer has {len(groups)} param groups, this one "
            f"{len(optimizer.param_groups)}"
        )
    unknown = [n for g in groups for n in g["params"] if n not in params]
    if unknown:
        raise NeuroExaptError(f"the saved optimizer names parameters the model lacks: "
                              f"{unknown[:3]}")
    order: list[str] = []
    for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
        names = saved_group["params"]
        if not reassign and {id(params[n]) for n in names} != {id(p) for p in group["params"]}:
            raise NeuroExaptError("the optimizer's param groups do not match the saved state")
        group["params"] = [params[n] for n in names]
        order.extend(names)
    index = {n: i for i, n in enumerate(order)}
    optimizer.load_state_dict({
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
        "state": {index[n]: s for n, s in saved["state"].items()},
    })
