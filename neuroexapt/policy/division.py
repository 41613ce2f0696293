"""Adaptive neuron division: which units to split, how many, and their gradual separation."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError, SurgeryError
from neuroexapt.graph import Group, trace
from neuroexapt.metrics.collector import LayerStats
from neuroexapt.metrics.layer_metrics import unit_scores
from neuroexapt.ops import EditRecord, unit_norms, widen
from neuroexapt.ops.resize import atom_units, per_atom, split_plan
from neuroexapt.policy.config import DIVISION_STRATEGIES

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveNeuronDivision"]

_SCORE_KIND = {"gradient_based": "gradient", "activation_based": "activation", "hybrid": "hybrid"}


@dataclass
class _Separation:
    """Copies still being separated: (parameter, dim, rows of originals, rows of copies)."""

    tensors: list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]]
    epochs_left: int
    scale: float = 0.0  # noise of one dose, relative to the weights' std


class AdaptiveNeuronDivision:
    """Splits the most useful units of a layer (Net2Net) and separates the copies gradually.

    ``gradient_based`` splits the units with the largest E[g^2] (the loss most wants them to
    change), ``activation_based`` those with the largest activation variance, ``hybrid`` the
    mean of both after normalising each by its maximum. New units start as exact copies (the
    function is unchanged) whose outgoing weights receive opposite noise, which keeps the
    function exactly and lets training separate them; over ``progressive_epochs`` epochs each
    copy pair also receives opposite noise on its incoming weights, ``noise_scale /
    progressive_epochs`` of the weights' std per epoch, which leaves the function unchanged to
    first order.

    Example:
        >>> division = AdaptiveNeuronDivision("hybrid", noise_scale=0.1, progressive_epochs=5)
        >>> record = division.divide(model, "features.3", stats=collector["features.3"],
        ...                          example_inputs=x, optimizer=opt)
    """

    def __init__(self, strategy: str = "hybrid", noise_scale: float = 0.1,
                 progressive_epochs: int = 5, fraction: float = 0.25, seed: int = 0) -> None:
        if strategy not in DIVISION_STRATEGIES:
            raise ConfigError(f"unknown division strategy {strategy!r}; valid: "
                              f"{', '.join(DIVISION_STRATEGIES)}")
        self.strategy, self.noise_scale = strategy, float(noise_scale)
        self.progressive_epochs, self.fraction = progressive_epochs, fraction
        self.pending: list[_Separation] = []
        self._gen = torch.Generator().manual_seed(seed)

    def scores(self, model: nn.Module, group: Group, stats: LayerStats | None) -> torch.Tensor:
        """Per-unit scores of the strategy (weight norms when no statistics fit the group)."""
        if stats is not None and stats.batches and stats.units == group.size:
            needs_grad = self.strategy != "activation_based"
            if not needs_grad or stats.grad_batches:
                return unit_scores(stats, _SCORE_KIND[self.strategy]).double().cpu()
        return unit_norms(model, group)

    def choose(self, model: nn.Module, group: Group, stats: LayerStats | None,
               count: int | None = None) -> list[int]:
        """The units to split: ``count`` (default ``fraction`` of the group), equally many per
        segment."""
        a = group.atom  # attention heads: whole heads are split
        per = group.size // group.segments // a
        k = max(1, round(self.fraction * per)) if count is None else \
            max(1, math.ceil(count / group.segments / a))
        scores = per_atom(self.scores(model, group, stats), a)
        chosen: list[int] = []
        for s in range(group.segments):
            seg = scores[s * per : (s + 1) * per]
            chosen += atom_units(group, (seg.argsort(descending=True, stable=True)[:k]
                                         + s * per).tolist())
        return sorted(chosen)

    def divide(self, model: nn.Module, layer: str, *, stats: LayerStats | None = None,
               example_inputs: Any = None,
               optimizer: torch.optim.Optimizer | None = None,
               count: int | None = None, epochs_left: int | None = None) -> EditRecord:
        """Split ``count`` (default ``fraction`` of the group) chosen units of ``layer``'s
        group; raises SurgeryError if impossible.

        At the split the copies' outgoing weights get opposite noise (exact: the copies'
        activations are equal), so their fan-ins separate by training from the first step.
        ``epochs_left`` is the number of :meth:`step_epoch` calls still followed by training
        (known when the run's length is): the fan-in doses are squeezed into them, and
        applied at once when there is none, so that the noise always lands while training
        goes on.
        """
        graph = trace(model, example_inputs) if example_inputs is not None else None
        if graph is None:
            raise ConfigError("divide needs example_inputs= to trace the model")
        group = graph.group_of(layer)
        if group.normalizers or group.sums:
            names = ", ".join(n if "'" in n else repr(n)
                              for n in [*group.normalizers, *group.sums])
            raise SurgeryError(f"the units of '{layer}' are combined by {names}: "
                               "splitting a few of them would change the output")
        units = self.choose(model, group, stats, count)
        plan = split_plan(group, units, "split", 0.0)
        record = widen(model, layer, len(units), units=units, example_inputs=example_inputs,
                       optimizer=optimizer, verify=True)
        self._schedule(model, layer, example_inputs, plan.index, epochs_left)
        return record

    def _schedule(self, model: nn.Module, layer: str, inputs: Any, index: torch.Tensor,
                  epochs_left: int | None = None) -> None:
        firsts: dict[int, int] = {}
        pairs = []
        for j, u in enumerate(index.tolist()):
            if u in firsts:
                pairs.append((firsts[u], j))
            else:
                firsts[u] = j
        group = trace(model, inputs).group_of(layer)
        tensors = _paired_entries(model, group, pairs, "out")  # the copies' fan-ins
        doses = self.progressive_epochs
        if epochs_left is not None:
            doses = min(doses, max(0, epochs_left))
        sep = _Separation(tensors, max(1, doses), self.noise_scale / max(1, doses))
        if self.noise_scale > 0 and tensors:
            self._break_symmetry(model, group, pairs, sep.scale)
            self.pending.append(sep)
            if doses == 0:
                self._dose(model, sep)

    def _break_symmetry(self, model: nn.Module, group: Any, pairs: list[tuple[int, int]],
                        scale: float) -> None:
        """Opposite noise on the copies' outgoing weights: exact, yet the twins separate.

        The two copies of a unit compute the same activation ``h``, so giving their fan-outs
        ``a/2 + n`` and ``a/2 - n`` leaves every consumer's input ``a h`` unchanged (the
        paired units of Variance Transfer, Yuan et al., 2023), while the gradients of their
        fan-ins now differ: copies never stay identical for an epoch waiting for the first
        dose. ``n`` has ``scale`` (one dose) of the consumer weight's std.
        """
        with torch.no_grad():
            for param, dim, orig, copy in _paired_entries(model, group, pairs, "in"):
                _opposite_noise(param, dim, orig, copy, scale, self._gen)

    def step_epoch(self, model: nn.Module) -> int:
        """Apply one epoch of separation noise; returns how many rows were moved."""
        return sum(self._dose(model, sep) for sep in list(self.pending))

    def _dose(self, model: nn.Module, sep: _Separation) -> int:
        """One dose (``noise_scale / doses`` of the weights' std) for ``sep``."""
        alive = {id(p) for p in model.parameters()}
        moved = 0
        scale = sep.scale
        with torch.no_grad():
            for param, dim, orig, copy in sep.tensors:
                if id(param) not in alive:
                    continue  # the layer was edited again: its rows moved
                _opposite_noise(param, dim, orig, copy, scale, self._gen)
                moved += orig.numel()
        sep.epochs_left -= 1
        if sep.epochs_left <= 0:
            self.pending.remove(sep)
        return moved


def _paired_entries(model: nn.Module, group: Any, pairs: list[tuple[int, int]], role: str
                    ) -> list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]]:
    """``(weight, dim, entries of originals, entries of copies)`` of ``group``'s weight members
    of ``role`` (``"out"``: the fan-ins, ``"in"``: the fan-outs) for the (original, copy)
    unit ``pairs``; biases and other 1-d members are left out."""
    out = []
    for m in group.members:
        if m.role != role or not m.tensor:
            continue
        param = getattr(model.get_submodule(m.module) if m.module else model, m.tensor)
        if param.dim() < 2:
            continue
        entries = [(m.offset + a * m.block + t, m.offset + b * m.block + t)
                   for a, b in pairs for t in range(m.block)]
        out.append((param, m.dim, torch.tensor([e[0] for e in entries]),
                    torch.tensor([e[1] for e in entries])))
    return out


def _opposite_noise(param: torch.Tensor, dim: int, orig: torch.Tensor, copy: torch.Tensor,
                    scale: float, gen: torch.Generator) -> None:
    """Add noise of ``scale`` times ``param``'s std to the ``orig`` entries, minus it to the
    ``copy`` entries (along ``dim``)."""
    orig, copy = orig.to(param.device), copy.to(param.device)
    rows = param.index_select(dim, orig)
    std = float(param.detach().float().std()) or 1.0
    noise = torch.randn(rows.shape, generator=gen).to(rows) * std * scale
    param.index_add_(dim, orig, noise)
    param.index_add_(dim, copy, -noise)
