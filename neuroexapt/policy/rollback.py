"""Snapshots of a model and its optimizer that can be restored bit for bit, in place."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroexapt.graph.cache import invalidate
from neuroexapt.optim.named import load_named_state, named_state

__all__ = ["Snapshot"]


@dataclass
class Snapshot:
    """A deep copy of a model (structure, weights, buffers, edit history) and its optimizer."""

    model: nn.Module
    optimizer_state: dict[str, Any] | None

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Snapshot:
        """Copy ``model`` and the optimizer's state (by parameter name)."""
        state = named_state(model, optimizer) if optimizer is not None else None
        return cls(copy.deepcopy(model), state)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Put ``model`` (the same object) and the optimizer's state back as when taken.

        The optimizer's hyper-parameters (``lr`` and the like) keep their current values, so
        a learning-rate schedule is not rewound by a rollback.
        """
        fresh = copy.deepcopy(self.model)  # keep the snapshot reusable
        model.__dict__.clear()
        model.__dict__.update(fresh.__dict__)  # every module's mode comes back with it
        invalidate(model)  # graphs cached by graph_cache describe the replaced modules
        if optimizer is not None and self.optimizer_state is not None:
            # a copy: load_state_dict keeps the given tensors, which the optimizer then
            # updates in place
            state = copy.deepcopy(self.optimizer_state)
            # hyper-parameters (lr, momentum, ...) follow their schedule: keep the current ones
            current = [{k: v for k, v in g.items() if k != "params"}
                       for g in optimizer.param_groups]
            load_named_state(model, optimizer, state, reassign=True)
            for group, hyper in zip(optimizer.param_groups, current, strict=True):
                group.update(hyper)
