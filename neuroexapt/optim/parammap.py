"""Plain description of how an edit changed a model's parameters.

Every edit in :mod:`neuroexapt.ops` returns a :class:`ParamMap`; :func:`neuroexapt.optim.migrate`
reads it to carry an optimizer's state across the edit. Nothing here depends on the edit itself,
so an optimizer the user manages can be migrated with the same map.

Example:
    A Linear layer with 3 output units whose unit 1 is split in two (Net2Net) maps its weight
    rows as ``index=[0, 1, 2, 1]`` along dim 0; the next layer's weight maps its columns as
    ``index=[0, 1, 2, 1]`` along dim 1 with ``scale=[1, .5, 1, .5]`` (the outgoing weights of
    the split unit are divided between its two copies). ``index`` entries of ``-1`` mark fresh
    positions whose optimizer state starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["DimMap", "ParamChange", "ParamMap"]


@dataclass(frozen=True)
class DimMap:
    """How one dimension of a tensor was re-indexed.

    Attributes:
        dim: the dimension of the tensor that changed size or order.
        index: int64 tensor of the new size; position ``j`` of the new tensor takes position
            ``index[j]`` of the old one, ``-1`` for a fresh position (state zero).
        scale: optional float tensor of the new size, a multiplier along ``dim`` applied to
            first-moment state (momentum, ``exp_avg``) and, squared, to second-moment state
            (``exp_avg_sq``); ``None`` means all ones.
    """

    dim: int
    index: torch.Tensor
    scale: torch.Tensor | None = None


@dataclass(frozen=True)
class ParamChange:
    """One parameter replaced by a re-indexed one (``old`` may be ``new`` for pure renames)."""

    old: nn.Parameter
    new: nn.Parameter
    dims: tuple[DimMap, ...]  # applied in order


@dataclass
class ParamMap:
    """Everything an edit did to the set of parameters.

    Attributes:
        changed: parameters replaced by re-indexed versions of themselves.
        added: new parameters, each with a reference parameter whose optimizer param group
            should receive it (``None``: the first group).
        removed: parameters that no longer belong to the model.
    """

    changed: list[ParamChange] = field(default_factory=list)
    added: list[tuple[nn.Parameter, nn.Parameter | None]] = field(default_factory=list)
    removed: list[nn.Parameter] = field(default_factory=list)

    def extend(self, other: ParamMap) -> None:
        """Append the changes of ``other`` to this map."""
        self.changed.extend(other.changed)
        self.added.extend(other.added)
        self.removed.extend(other.removed)

    def is_empty(self) -> bool:
        """True when the edit touched no parameter."""
        return not (self.changed or self.added or self.removed)
