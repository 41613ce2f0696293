"""What an edit does to the units of one group, independent of the tensors involved."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuroexapt.optim.parammap import DimMap

__all__ = ["TensorUpdate", "UnitPlan", "along", "take_index"]


@dataclass(frozen=True)
class UnitPlan:
    """New units of a group described from the old ones.

    Attributes:
        index: int64 [new_size]; new unit ``j`` is a copy of old unit ``index[j]``.
        scale: float64 [new_size]; factor for tensors that read the units (a unit split in
            ``c`` copies has its outgoing weights divided by ``c``).
        fresh: bool [new_size]; units with fresh incoming and zero outgoing weights.
        noise: relative standard deviation of noise added to copies' incoming weights.
    """

    index: torch.Tensor
    scale: torch.Tensor
    fresh: torch.Tensor
    noise: float = 0.0

    @property
    def new_size(self) -> int:
        """Number of units after the edit."""
        return int(self.index.numel())

    @property
    def selects(self) -> bool:
        """True when the plan only keeps and reorders units (no copies, fresh units or noise):
        then every member's tensor is indexed the same way whatever its role."""
        return (not bool(self.fresh.any()) and self.noise == 0
                and bool((self.scale == 1).all())
                and self.index.unique().numel() == self.index.numel())

    @classmethod
    def keep(cls, keep: torch.Tensor) -> UnitPlan:
        """A plan that keeps the units ``keep`` (in that order) and drops the others."""
        n = keep.numel()
        return cls(keep.long(), torch.ones(n, dtype=torch.float64),
                   torch.zeros(n, dtype=torch.bool))


@dataclass(frozen=True)
class TensorUpdate:
    """A new value for ``module.attr`` and how it maps to the old one."""

    attr: str
    value: torch.Tensor
    dims: tuple[DimMap, ...]


def take_index(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, index)`` where index ``-1`` gives zeros (a fresh position)."""
    out = t.index_select(dim, index.clamp(min=0).to(t.device))
    return out * along(out, dim, (index >= 0).to(t.dtype))


def along(t: torch.Tensor, dim: int, values: torch.Tensor) -> torch.Tensor:
    """``values`` [t.shape[dim]] shaped to broadcast against ``t`` along ``dim``."""
    shape = [1] * t.dim()
    shape[dim] = values.numel()
    return values.to(device=t.device, dtype=t.dtype).view(shape)
