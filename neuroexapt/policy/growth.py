"""Growth: when, where and how a model gains units, by expected loss decrease per unit of cost.

One policy serves :class:`neuroexapt.core.DNMFramework`, ``NeuroExapt.expand_layers`` and the
Trainer's expansion.

*Where.* For every growable layer (a Linear or dense zero-padded Conv2d whose units are a
resizable group with that single producer, read only by dense Conv/Linear layers) the
:class:`~neuroexapt.metrics.recorder.TrainingRecorder` accumulates the bypass gradient ``M``:
the gradient of the loss w.r.t. a linear connection from the layer's input patches to its
consumers' outputs. ``k`` new units whose fan-in are the top right singular vectors of ``M``
and whose fan-out is zero receive a fan-out gradient of squared norm ``s_1^2 + ... + s_k^2``
(GradMax, Evci et al., ICLR 2022): the first-order loss decrease one step of unit length can
buy. That gain is in the loss's own units for every layer, so dividing it by what the units
cost (multiply-accumulates per forward pass, or parameters) makes layers comparable: a
channel at 8x8 costs 16 times fewer MACs than one at 32x32. Units are handed out one at a time
to the layer with the largest marginal gain per cost until the step's budget is spent.

*How* (``init``):

* ``"gradmax"``: fan-in along the top singular vectors of ``M`` (further units, beyond its
  rank, orthogonal to them), scaled to the mean norm of the layer's existing fan-ins; fan-out
  zero, so the function is unchanged and the fan-out's gradient is the largest possible;
* ``"orthogonal"``: random fan-in orthogonal to the existing units' fan-ins (NORTH's idea,
  Maile et al., 2022), same scale, fan-out zero;
* ``"split"``: Net2Net splits of the layer's best units (the division strategy chooses them),
  separated by antisymmetric noise whose first dose lands at once.

*When*: :class:`GrowthSchedule` spreads a budget over the first ``growth_by`` of training.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError, NeuroExaptError, SurgeryError
from neuroexapt.graph import Group, trace
from neuroexapt.metrics.recorder import BypassGradient
from neuroexapt.ops import EditRecord, widen
from neuroexapt.ops.resize import unit_entries
from neuroexapt.ops.transaction import transaction

logger = logging.getLogger(__name__)

__all__ = ["GROWTH_COSTS", "GROWTH_INITS", "GrowthOption", "GrowthSchedule", "LearningRateBoost",
           "allocate", "bypass_pairs", "grow_layer", "growth_options", "remap_directions",
           "unit_cost"]

GROWTH_INITS: tuple[str, ...] = ("gradmax", "orthogonal", "split")
GROWTH_COSTS: tuple[str, ...] = ("macs", "parameters")


# --------------------------------------------------------------------------- where
def _dense(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


def bypass_pairs(model: nn.Module, example_inputs: Any, layers: Iterable[str]
                 ) -> dict[str, list[str]]:
    """``{growable layer: the dense layers reading its units}`` (see the module docstring)."""
    graph = trace(model, example_inputs)
    modules = dict(model.named_modules())
    recorded = set(layers)
    out: dict[str, list[str]] = {}
    for name in recorded:
        if not _dense(modules[name]):
            continue
        try:
            group = graph.group_of(name)
        except NeuroExaptError:
            continue
        if not group.resizable or group.producers != [name] or group.mixed:
            continue
        readers = {m.module for m in group.members if m.role == "in"}
        if any(m.role == "custom" for m in group.members):
            continue
        if not readers or not all(r in recorded and _dense(modules[r]) for r in readers):
            continue
        out[name] = sorted(readers)
    return out


def unit_cost(model: nn.Module, graph: Any, group: Group, by: str) -> float:
    """What one more unit of ``group`` costs: MACs of one sample's forward, or parameters.

    Per Conv/Linear weight member, ``weight.numel() / weight.shape[dim] * block`` entries per
    unit, times (for MACs) the output positions of that layer (``H_out * W_out``, tokens).
    Per-unit parameters of normalisation layers count for ``"parameters"``.
    """
    total = 0.0
    for m in group.members:
        if not m.tensor:
            continue
        owner = model.get_submodule(m.module) if m.module else model
        t = getattr(owner, m.tensor, None)
        if not isinstance(t, torch.Tensor) or m.tensor not in owner._parameters:
            continue
        per_unit = t.numel() / max(1, t.shape[m.dim]) * m.block
        if by == "parameters":
            total += per_unit
        elif isinstance(owner, nn.Linear | nn.modules.conv._ConvNd) and m.tensor == "weight":
            total += per_unit * _positions(graph, m.module, owner)
    return total


def _positions(graph: Any, name: str, module: nn.Module) -> float:
    """Output positions per sample of ``name`` (spatial size, or tokens)."""
    try:
        meta = graph.node_of(name).meta.get("tensor_meta")
    except NeuroExaptError:
        return 1.0
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2:
        return 1.0
    units = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else \
        module.out_features
    return math.prod(shape) / (shape[0] * units)


@dataclass
class GrowthOption:
    """One layer that can grow, with the marginal gain of each extra unit and its cost.

    Attributes:
        layer: the layer whose units grow.
        size: its current number of units.
        cost_per_unit: MACs or parameters one more unit costs.
        gains: marginal gain of the 1st, 2nd, ... new unit (squared singular values of the
            bypass gradient, descending); empty when no bypass gradient was measured.
        directions: the matching fan-in directions ``[r, in_features * k * k]`` (or None).
    """

    layer: str
    size: int
    cost_per_unit: float
    gains: torch.Tensor
    directions: torch.Tensor | None = None

    def gain(self, units: int) -> float:
        """Expected first-order gain of ``units`` new units."""
        return float(self.gains[:units].sum())

    def reason(self, units: int, by: str) -> str:
        """The measured reason, for events."""
        g = self.gain(units)
        return (f"growth: {units} units, expected gain {g:.3e} (sum of the top squared singular "
                f"values of the bypass gradient) for {units * self.cost_per_unit:,.0f} {by}: "
                f"{g / max(units * self.cost_per_unit, 1e-30):.3e} per {by[:-1]}")


def growth_options(model: nn.Module, example_inputs: Any, bypass: dict[str, BypassGradient],
                   by: str = "macs") -> list[GrowthOption]:
    """Every growable layer with a measured bypass gradient, as a :class:`GrowthOption`."""
    if by not in GROWTH_COSTS:
        raise ConfigError(f"growth cost must be one of {', '.join(GROWTH_COSTS)}, got {by!r}")
    graph = trace(model, example_inputs)
    out = []
    for name, entry in bypass.items():
        if entry.matrix is None or not entry.batches:
            continue
        try:
            group = graph.group_of(name)
        except NeuroExaptError:
            continue
        if not group.resizable or group.output:
            continue
        cost = unit_cost(model, graph, group, by)
        if cost <= 0:
            continue
        _, s, vh = torch.linalg.svd(entry.mean(), full_matrices=False)
        out.append(GrowthOption(name, group.size, cost, s.pow(2), vh))
    return out


def allocate(options: Sequence[GrowthOption], budget: float, *, multiple: int = 1,
             max_fraction: float = 1.0, room: float | None = None) -> dict[str, int]:
    """Hand out units in chunks to the largest marginal gain per cost, within ``budget``.

    A chunk brings a layer to the next multiple of ``multiple`` units (widths that suit the
    CPU's vector kernels); its gain is the sum of its units' marginal gains. A layer gains at
    most ``max_fraction`` of its size per call (at least one chunk) and never more units than
    its bypass gradient has non-zero singular values.

    With ``room`` (the hard limit, e.g. what is left of a whole growth budget), a ``budget``
    smaller than every chunk is rounded to the nearest chunk: when nothing fits, chunks are
    taken while at least half of each fits in ``budget`` and all of it in ``room``, so a small
    model still grows at its early steps instead of leaving their share to later ones.
    """
    def chunk(o: GrowthOption, k: int) -> int:
        width = o.size + k
        return multiple - width % multiple if multiple > 1 else 1

    def gain(o: GrowthOption, k: int, n: int) -> float:
        return float(o.gains[k:k + n].sum())

    heap: list[tuple[float, int, int, int]] = []
    taken = dict.fromkeys((o.layer for o in options), 0)

    def push(i: int, k: int) -> None:
        o = options[i]
        n = chunk(o, k)
        limit = max(n, math.floor(max_fraction * o.size))
        top = float(o.gains[0]) if len(o.gains) else 0.0
        if k + n > limit or k >= len(o.gains) or not top > 0:
            return
        g = gain(o, k, n)
        if g > 1e-12 * top:
            heapq.heappush(heap, (-g / (n * o.cost_per_unit), i, k, n))

    def fill(relaxed: bool) -> dict[str, int]:
        heap.clear()
        taken.update(dict.fromkeys(taken, 0))
        for i in range(len(options)):
            push(i, 0)
        spent = 0.0
        hard = room if relaxed and room is not None else budget
        while heap:
            _, i, k, n = heapq.heappop(heap)
            o = options[i]
            cost = n * o.cost_per_unit
            if spent + cost > hard or spent + (cost / 2 if relaxed else cost) > budget:
                continue
            spent += cost
            taken[o.layer] = k + n
            push(i, k + n)
        return {name: n for name, n in taken.items() if n}

    plan = fill(relaxed=False)
    return plan if plan or room is None else fill(relaxed=True)


def remap_directions(option: GrowthOption, model: nn.Module, record: EditRecord) -> None:
    """Carry ``option``'s fan-in directions across an edit that re-indexed the layer's inputs.

    When a neighbouring layer grew in the same step, this layer's weight gained input
    columns: a direction keeps its entries on the old inputs and is zero on new ones (on the
    second and later copies of a split input too, which leaves it reading the same signal).
    """
    if option.directions is None or record.param_map is None:
        return
    weight = getattr(model.get_submodule(option.layer), "weight", None)
    for change in record.param_map.changed:
        if change.new is not weight:
            continue
        d = option.directions
        for dm in change.dims:
            if dm.dim != 1:
                continue
            rest = d.shape[1] // max(1, change.old.shape[1])
            view = d.view(d.shape[0], -1, rest)
            first = torch.zeros(len(dm.index), dtype=torch.bool)
            seen: set[int] = set()
            for j, u in enumerate(dm.index.tolist()):
                first[j] = u >= 0 and u not in seen
                seen.add(u)
            out = view.new_zeros(d.shape[0], len(dm.index), rest)
            keep = first.nonzero().flatten()
            out[:, keep] = view[:, dm.index[keep]]
            d = out.reshape(d.shape[0], -1)
        option.directions = d


# --------------------------------------------------------------------------- how
def _fan_in_member(group: Group, layer: str) -> Any:
    for m in group.members:
        if m.role == "out" and m.module == layer and m.tensor == "weight":
            return m
    raise SurgeryError(f"'{layer}' has no weight producing its units")


def _new_fan_in(old: torch.Tensor, n: int, directions: torch.Tensor | None,
                gen: torch.Generator) -> torch.Tensor:
    """``n`` unit-norm fan-in rows: the given directions first, then random rows orthogonal
    to them and, where there is room, to the existing rows ``old`` [units, F]."""
    f = old.shape[1]
    empty = torch.zeros(0, f, dtype=torch.float64)
    chosen = directions[:n].double().cpu() if directions is not None else empty
    missing = n - chosen.shape[0]
    if missing > 0:
        extra = torch.randn(missing, f, generator=gen, dtype=torch.float64)
        span = torch.cat([chosen, old.double().cpu()], 0)
        if span.shape[0] + missing > f:
            span = chosen  # no room beside the existing rows: orthogonal to the chosen ones
        if span.shape[0] and span.shape[0] + missing <= f:
            q, _ = torch.linalg.qr(span.T)
            extra = extra - (extra @ q) @ q.T
        chosen = torch.cat([chosen, extra], 0)
    return chosen / chosen.norm(dim=1, keepdim=True).clamp(min=1e-30)


def grow_layer(model: nn.Module, layer: str, units: int, *, init: str,
               example_inputs: Any, optimizer: torch.optim.Optimizer | None = None,
               option: GrowthOption | None = None, split: Any = None, stats: Any = None,
               seed: int = 0, epochs_left: int | None = None) -> EditRecord:
    """Add ``units`` units to ``layer`` with ``init`` (see the module docstring), verified.

    ``split`` is the :class:`~neuroexapt.policy.division.AdaptiveNeuronDivision` used by
    ``init="split"`` (``epochs_left``: see its ``divide``). Atomic: on any error the model and
    optimizer are as before.
    """
    if init not in GROWTH_INITS:
        raise ConfigError(f"unknown growth init {init!r}; valid: {', '.join(GROWTH_INITS)}")
    if init == "split":
        if split is None:
            raise ConfigError("init='split' needs the division (AdaptiveNeuronDivision)")
        return split.divide(model, layer, stats=stats, example_inputs=example_inputs,
                            optimizer=optimizer, count=units, epochs_left=epochs_left)
    gen = torch.Generator().manual_seed(seed)
    with transaction(model, optimizer):
        group = trace(model, example_inputs).group_of(layer)
        member = _fan_in_member(group, layer)
        module = model.get_submodule(layer)
        old = unit_entries(module.weight.detach(), member, group.size)
        record = widen(model, layer, units, strategy="zero", example_inputs=example_inputs,
                       optimizer=optimizer, verify=True)
        directions = option.directions if (init == "gradmax" and option is not None) else None
        rows = _new_fan_in(old.double(), units, directions, gen)
        scale = float(old.double().norm(dim=1).mean()) or 1.0
        weight = module.weight
        with torch.no_grad():
            fresh = rows.mul(scale).to(weight.dtype).view(units, *weight.shape[1:])
            weight[group.size : group.size + units] = fresh.to(weight.device)
            if getattr(module, "bias", None) is not None:
                module.bias[group.size : group.size + units] = 0.0
        record.args["init"] = init
    return record


# --------------------------------------------------------------------------- when
@dataclass
class GrowthSchedule:
    """A growth budget spent in ``steps`` equal parts by epoch ``by * total_epochs`` (and
    before the last epoch).

    Attributes:
        start: the model's cost when the schedule was made.
        budget: the cost the grown model may reach.
        total_epochs: epochs of the whole run.
        by: fraction of the run by which the budget is spent.
        steps: number of growth steps.
        done: growth steps taken so far.
    """

    start: float
    budget: float
    total_epochs: int
    by: float
    steps: int
    done: int = 0
    epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # never at the last epoch: units added then would never be trained
        last = max(1, min(math.floor(self.by * self.total_epochs), self.total_epochs - 1))
        n = min(self.steps, last)
        self.epochs = sorted({max(1, round(last * (i + 1) / n)) for i in range(n)})

    def due(self, epoch: int) -> bool:
        """Whether a growth step is scheduled at ``epoch`` and steps remain."""
        return self.done < len(self.epochs) and epoch in self.epochs[self.done:]

    def step_budget(self, current: float) -> float:
        """Cost this step may add: the remaining budget over the remaining steps."""
        left = max(1, len(self.epochs) - self.done)
        return max(0.0, (self.budget - current) / left)

    def state_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {"start": self.start, "budget": self.budget, "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.start, self.budget, self.done = float(state["start"]), float(state["budget"]), \
            int(state["done"])


# --------------------------------------------------------------------------- learning rate
@dataclass
class _Boosted:
    param: nn.Parameter
    dim: int
    index: torch.Tensor
    epochs_left: int


class LearningRateBoost:
    """Scales the optimizer's update of new units' entries by ``factor`` for some epochs.

    It works for any optimizer: a step pre-hook saves the new entries, a post-hook scales the
    update they received (``before + factor * (after - before)``), which is a learning rate of
    ``factor`` times the group's for those entries only (Variance Transfer, Yuan et al., 2023,
    trains new weights with a larger rate). Entries of a parameter that a later edit replaced
    are dropped.
    """

    def __init__(self, factor: float, epochs: int) -> None:
        self.factor, self.epochs = float(factor), int(epochs)
        self.entries: list[_Boosted] = []
        self._saved: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def active(self) -> bool:
        """Whether it changes anything."""
        return self.factor != 1.0 and self.epochs > 0

    def add(self, model: nn.Module, record: EditRecord, optimizer: torch.optim.Optimizer,
            example_inputs: Any) -> None:
        """Boost the entries of the units ``record`` added (producer rows and consumer columns)."""
        if not self.active:
            return
        group = trace(model, example_inputs).group_of(record.target)
        added = int(record.args.get("by", 0))
        if not added:
            return
        old = group.size - added
        for m in group.members:
            if m.role not in ("out", "in") or not m.tensor:
                continue
            owner = model.get_submodule(m.module) if m.module else model
            p = owner._parameters.get(m.tensor)
            if p is None:
                continue
            idx = (torch.arange(old, group.size).view(-1, 1) * m.block
                   + torch.arange(m.block)).flatten() + m.offset
            self.entries.append(_Boosted(p, m.dim, idx, self.epochs))
        self._hook(optimizer)

    def _hook(self, optimizer: torch.optim.Optimizer) -> None:
        if self._optimizer is optimizer and self._handles:
            return
        self.remove_hooks()
        self._optimizer = optimizer
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        self._saved = [e.param.detach().index_select(e.dim, e.index.to(e.param.device))
                       for e in self.entries]

    @torch.no_grad()
    def _post(self, *_: Any) -> None:
        for e, before in zip(self.entries, self._saved, strict=False):
            idx = e.index.to(e.param.device)
            after = e.param.index_select(e.dim, idx)
            e.param.index_copy_(e.dim, idx, before + self.factor * (after - before))
        self._saved = []

    def step_epoch(self, model: nn.Module) -> None:
        """One epoch passed: expire entries, drop those of replaced parameters."""
        alive = {id(p) for p in model.parameters()}
        for e in self.entries:
            e.epochs_left -= 1
        self.entries = [e for e in self.entries if e.epochs_left > 0 and id(e.param) in alive]
        if not self.entries:
            self.remove_hooks()

    def clear(self) -> None:
        """Forget every entry (after a rollback) and remove the hooks."""
        self.entries = []
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Remove the optimizer hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._optimizer = None
