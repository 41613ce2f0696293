"""Pruning to a target: remove the units that carry the least information per unit of cost.

:func:`prune_to` removes, for real (:func:`neuroexapt.ops.narrow_many`), units of every
resizable inner group until the model's parameters, MACs or measured latency fall by
``amount``. It works in ``steps`` rounds on a linear schedule (each round re-measures), and in
each round removes the units with the lowest ``score / cost`` over all groups at once, in one
transaction with one trace of the model:

* ``score="information"`` (default): the information about the target that removing the unit
  loses, estimated to first order on labelled batches (each round re-scores on its share of
  the first ``batches``, so the whole call reads each about once). Removing unit ``u`` zeroes
  the weights that read it (the ``"in"`` members of its group, every consumer included), so
  the loss, a cross-entropy in nats for classification, changes by ``d_b = -sum(theta * g)``
  over those weights on batch ``b``; the score is ``sqrt(mean_b d_b**2)``, in nats (the group
  Taylor criterion of Molchanov et al., "Importance Estimation for Neural Network Pruning",
  CVPR 2019, and the Fisher pruning of Theis et al., 2018). Groups read by no parameter fall
  back to the unit's own weights (``"out"`` and ``"pass"`` members).
* ``score="norm"``: group magnitude, the L2 norm of every weight entry of the unit, those
  that compute it (``"out"`` members) and those that read it (``"in"`` members, every
  consumer included), biases left out, divided by the group's mean (Torch-Pruning's
  ``GroupMagnitudeImportance(p=2)`` with its mean normaliser, Fang et al., "DepGraph", CVPR
  2023). Behind a normalisation layer a unit's incoming weights say little (the layer
  rescales them); the weights that read it carry its scale.

``cost`` is what removing the unit saves:

* ``by="parameters"``: every parameter entry of the group that belongs to the unit;
* ``by="macs"``: those entries of Conv/Linear weights times the positions where the layer runs,
  measured on the example;
* ``by="latency"``: seconds, from the latencies of the model's modules measured on the first
  batch on the machine it runs on (:func:`neuroexapt.measure_latency`): each module's time is
  shared among the units of its output (and, for a module that maps some groups to others,
  a Conv or a Linear, of its input), so a channel of a 32x32 layer, where convolutions,
  normalisation, activations and pooling all run on 16 times more positions, costs more than
  one of an 8x8 layer. The target is the measured latency of the whole forward.

``allocation="uniform"`` removes the same share of every group in each round (the share whose
units save what the round needs), as a uniform pruning ratio does, and uses the score only to
choose which units of each group go. The default ``"global"`` ranks all units together, which
removes the most for the least score but can leave a layer much thinner than the others.

``round_to`` keeps every pruned group larger than ``round_to`` units at a multiple of it:
vector units and GEMM kernels process channels in blocks of 8 or 16 (AVX2 / AVX-512 float32,
tensor cores), and a layer of 61 channels runs no faster than one of 64. Such a group is
rounded to the nearest multiple when it is pruned (never below ``round_to``); smaller groups
are pruned unit by unit. The default ``"auto"`` rounds to 8 the groups that have at least 32
units when ``prune_to`` starts (a step of at most a quarter of the group at first: rounding a
layer of 16 to 8 would halve it in one step); an explicit value larger than every prunable
group is a :class:`ConfigError`; ``None`` turns rounding off. A round never removes
more than ``max_fraction`` of a group's units (before rounding), nor its last one; groups
tied to the output, frozen or split in equal segments (GroupNorm, grouped convolutions) are
left alone.

Example:
    >>> result = prune_to(model, train_batches[:8], 0.5, by="parameters", optimizer=opt)
    >>> result.parameters_before, result.parameters_after
    (558538, 276904)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.errors import AnalysisError, ConfigError, NeuroExaptError
from neuroexapt.graph import ModelGraph, graph_cache, trace
from neuroexapt.graph.groups import Group, Member
from neuroexapt.graph.layout import Layout
from neuroexapt.graph.wrappers import accepts_wrapped
from neuroexapt.metrics.collector import model_output
from neuroexapt.metrics.cost import count_macs, measure_latency
from neuroexapt.ops import EditRecord, narrow_many
from neuroexapt.ops.edit import count_parameters
from neuroexapt.ops.resize import atom_units, per_atom, unit_entries, unit_norms
from neuroexapt.ops.transaction import transaction

logger = logging.getLogger(__name__)

__all__ = ["PRUNE_ALLOCATIONS", "PRUNE_COSTS", "PRUNE_SCORES", "PruneResult", "prune_to"]

PRUNE_SCORES: tuple[str, ...] = ("information", "norm")
PRUNE_COSTS: tuple[str, ...] = ("parameters", "macs", "latency")
PRUNE_ALLOCATIONS: tuple[str, ...] = ("global", "uniform")
AUTO_ROUND_TO = 8  # round_to="auto": float32 channels per AVX-256 register, tensor-core tile
# (applied to groups of at least 4 * 8 units)
Batch = tuple[Any, torch.Tensor]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass
class PruneResult:
    """What :func:`prune_to` did, measured before and after."""

    parameters_before: int
    parameters_after: int
    macs_before: int
    macs_after: int
    rounds: int
    units_removed: int
    records: list[EditRecord] = field(default_factory=list)
    # measured seconds of one forward of the first batch (by="latency" only)
    latency_before: float | None = None
    latency_after: float | None = None


@accepts_wrapped
def prune_to(
    model: nn.Module, data: Iterable[Batch], amount: float, *, by: str = "parameters",
    score: str = "information", loss_fn: LossFn = F.cross_entropy, batches: int = 8,
    steps: int = 5, max_fraction: float = 0.5, round_to: int | str | None = "auto",
    allocation: str = "global", optimizer: torch.optim.Optimizer | None = None,
) -> PruneResult:
    """Remove units until ``by`` (parameters, MACs of one sample, or the measured latency of
    the first batch) falls by ``amount``.

    Args:
        model: the model, edited in place.
        data: ``(inputs, targets)`` batches; the first ``batches`` are used to score units,
            each round on its share of them in turn (the model is run in eval mode; its
            ``.grad`` fields are restored afterwards).
        amount: the share to remove, in (0, 1).
        by: ``"parameters"``, ``"macs"`` or ``"latency"`` (see the module docstring).
        score: ``"information"`` or ``"norm"`` (see the module docstring).
        loss_fn: the task loss (cross-entropy by default; MSE for regression).
        batches: labelled batches used for scoring, over all rounds.
        steps: rounds of the linear schedule.
        max_fraction: the largest share of a group removed in one round.
        round_to: keep pruned groups at multiples of this many units (``"auto"``: 8;
            None: any size; see the module docstring).
        allocation: how many units each group loses: ``"global"`` ranks every unit of every
            group by ``score / cost``; ``"uniform"`` removes the same share of every group
            (the one that saves what the round needs) and uses the score only to choose which
            units go inside each group (see the module docstring).
        optimizer: optimizer whose state follows every edit.

    Returns:
        A :class:`PruneResult`; the target may be missed when no unit is left to remove (a
        warning says so).

    Raises:
        ConfigError: bad arguments, or a ``round_to`` larger than every prunable group.
        AnalysisError: ``data`` yields no batch, or the loss is not finite.

    Any error leaves the model, the optimizer and the edit history as they were before the
    call, whatever rounds had been done.
    """
    _check(amount, by, score, batches, steps, max_fraction, round_to)
    if allocation not in PRUNE_ALLOCATIONS:
        raise ConfigError(f"unknown allocation {allocation!r}; valid: "
                          f"{', '.join(PRUNE_ALLOCATIONS)}")
    step = AUTO_ROUND_TO if round_to == "auto" else round_to
    smallest = 4 * AUTO_ROUND_TO if round_to == "auto" else (step or 0) + 1
    probe = [b for _, b in zip(range(batches), data, strict=False)]
    if not probe:
        raise AnalysisError("prune_to got no batch; pass (inputs, targets) batches as data=")
    batch = _inputs(probe[0][0])  # latency is measured on the first batch as given
    example = tuple(t[:2] for t in batch)  # tracing and shape checks need no more
    one = tuple(t[:1] for t in batch)
    share = -(-len(probe) // steps)  # batches scored per round: each read about once
    params0, macs0 = count_parameters(model), count_macs(model, one)
    # one transaction over every round: a failure in any leaves the model as it was
    with transaction(model, optimizer), graph_cache(model):
        graph = trace(model, example)
        if round_to != "auto":
            _check_round_to(graph, step)
        # the groups kept at multiples of round_to: those large enough at the start
        rounded = {g.producers[0] for g in graph.groups
                   if _eligible(g) and g.size >= smallest and g.atom == 1}
        latency0 = measure_latency(model, batch)[0] if by == "latency" else None
        base = {"parameters": params0, "macs": macs0, "latency": latency0}[by]
        assert base is not None
        goal = base * (1.0 - amount)
        records: list[EditRecord] = []
        ideal: dict[str, float] = {}  # allocation="uniform": each group's unrounded size
        rounds = removed = 0
        current = base
        for rounds in range(1, 3 * steps + 1):
            if rounds > 1:
                current = _measure(model, by, one, batch)
            if current <= goal:
                rounds -= 1
                break
            # the next point of the linear schedule below the current value (a round rounded
            # to multiples of round_to may have gone past several)
            point = rounds
            target = max(goal, base * (1.0 - amount * min(point, steps) / steps))
            while target >= current and point < steps:
                point += 1
                target = max(goal, base * (1.0 - amount * point / steps))
            # each round re-scores on its share of the batches (about one pass per call):
            # re-scoring after each removal beats reusing the first estimates (on digits at
            # -50% MACs, 96.1% against 90.3% test accuracy before fine-tuning)
            start = (rounds - 1) * share % len(probe)
            scored = (probe + probe)[start : start + share]
            done, units = _round(model, scored, example, batch, current - target, current, by,
                                 score, loss_fn, max_fraction, step, rounded, allocation,
                                 ideal, optimizer)
            if not done:
                logger.warning("prune_to stopped at %.4g of the target %.4g %s: no unit left "
                               "that may be removed", current, goal, by)
                break
            records.extend(done)
            removed += units
        latency = measure_latency(model, batch)[0] if by == "latency" else None
    result = PruneResult(params0, count_parameters(model), macs0, count_macs(model, one),
                         rounds, removed, records, latency0, latency)
    logger.info("prune_to: parameters %d -> %d, MACs %d -> %d in %d rounds",
                result.parameters_before, result.parameters_after, result.macs_before,
                result.macs_after, rounds)
    return result


def _measure(model: nn.Module, by: str, one: tuple[torch.Tensor, ...],
             batch: tuple[torch.Tensor, ...]) -> float:
    if by == "parameters":
        return count_parameters(model)
    if by == "macs":
        return count_macs(model, one)
    return measure_latency(model, batch)[0]


def _check_round_to(graph: ModelGraph, round_to: int | None) -> None:
    """A ``round_to`` that leaves no group prunable is a mistake: say so before any work."""
    groups = [g for g in graph.groups if _eligible(g)]
    if round_to is None or not groups or any(g.size > round_to for g in groups):
        return
    raise ConfigError(f"round_to={round_to} is larger than every prunable layer (the largest "
                      f"has {max(g.size for g in groups)} units), so nothing could be "
                      "pruned; pass a smaller round_to, or round_to=None")


def _check(amount: float, by: str, score: str, batches: int, steps: int,
           max_fraction: float, round_to: int | str | None) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not 0 < amount < 1:
        raise ConfigError(f"amount must be a share in (0, 1), got {amount!r}")
    if by not in PRUNE_COSTS:
        raise ConfigError(f"unknown cost by={by!r}; valid: {', '.join(PRUNE_COSTS)}")
    if score not in PRUNE_SCORES:
        raise ConfigError(f"unknown score {score!r}; valid: {', '.join(PRUNE_SCORES)}")
    for name, value in (("batches", batches), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if not 0 < max_fraction <= 1:
        raise ConfigError(f"max_fraction must be in (0, 1], got {max_fraction!r}")
    if round_to is not None and round_to != "auto" and (
            isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to must be a positive int, 'auto' or None, got {round_to!r}")


def _round(model: nn.Module, probe: list[Batch], example: tuple[torch.Tensor, ...],
           batch: tuple[torch.Tensor, ...], need: float, current: float, by: str, score: str,
           loss_fn: LossFn, max_fraction: float, round_to: int | None, rounded: set[str],
           allocation: str, ideal: dict[str, float],
           optimizer: torch.optim.Optimizer | None) -> tuple[list[EditRecord], int]:
    """One round: remove the cheapest-information units worth about ``need`` of ``by``."""
    graph = trace(model, example)
    groups = [g for g in graph.groups if _eligible(g)]
    if not groups:
        return [], 0
    if by == "latency":
        costs, estimated = _latency_costs(model, graph, groups, batch)
    else:
        positions = weight_positions(model, example)
        costs = {g.id: unit_cost(model, g, by, positions) for g in groups}
        estimated = _estimated_total(model, by, positions)
    scores = (_information(model, groups, probe, loss_fn) if score == "information"
              else _magnitude(model, groups))
    # the estimate of what a unit saves is scaled so that the estimates add up to the total;
    # units in attention heads are ranked, and removed, by whole heads
    scale = current / max(estimated, 1e-12)
    head_score = {g.id: per_atom(scores[g.id], g.atom) for g in groups}
    head_cost = {g.id: per_atom(costs[g.id], g.atom) for g in groups}
    ranked = sorted((float(head_score[g.id][a]) / max(float(head_cost[g.id][a]), 1e-30),
                     g.id, a)
                    for g in groups for a in range(g.size // g.atom))
    caps = {g.id: min(g.size // g.atom - 1, int(max_fraction * g.size // g.atom))
            for g in groups}
    order: dict[int, list[int]] = {g.id: [] for g in groups}  # each group's, cheapest first
    for _, gid, unit in ranked:
        order[gid].append(unit)
    chosen: dict[int, list[int]] = {g.id: [] for g in groups}
    by_id = {g.id: g for g in groups}
    if allocation == "uniform":
        chosen = _uniform(groups, order, head_cost, scale, need, max_fraction, caps,
                          round_to if round_to is not None else 1, rounded, ideal)
    saved = 0.0
    for _, gid, unit in ranked if allocation == "global" else ():
        if saved >= need:
            break
        if len(chosen[gid]) < caps[gid]:
            chosen[gid].append(unit)
            saved += float(head_cost[gid][unit]) * scale
    if round_to is not None and allocation == "global":
        chosen.update(_rounded({k: v for k, v in chosen.items()
                                if rounded & set(by_id[k].producers) and by_id[k].atom == 1},
                               {g.id: g.size for g in groups}, order, round_to))
    chosen = {gid: atom_units(by_id[gid], atoms) for gid, atoms in chosen.items()}
    remove = {by_id[gid].producers[0]: units for gid, units in chosen.items() if units}
    if not remove:
        return [], 0
    try:
        records = narrow_many(model, remove, example_inputs=example, optimizer=optimizer)
    except NeuroExaptError as e:  # one group refused (attention heads): the others one by one
        logger.info("prune_to: one transaction for the round failed (%s); narrowing the "
                    "groups one by one", e)
        records = []
        for layer, units in remove.items():
            try:
                records += narrow_many(model, {layer: units}, example_inputs=example,
                                       optimizer=optimizer)
            except NeuroExaptError as why:
                logger.info("prune_to: '%s' skipped: %s", layer, why)
                continue
    done = {r.target for r in records}
    return records, sum(len(u) for layer, u in remove.items() if layer in done)


def _uniform(groups: list[Group], order: dict[int, list[int]],
             cost: dict[int, torch.Tensor], scale: float, need: float, max_fraction: float,
             caps: dict[int, int], step: int, rounded: set[str], ideal: dict[str, float]
             ) -> dict[int, list[int]]:
    """The units of a uniform round: every group's ideal size (kept across rounds, so that
    rounding to multiples of ``step`` never stalls a small group) shrinks by one share, the
    one whose units save about ``need``; each group then keeps its ideal size rounded, and
    loses its cheapest-information units."""
    total = sum(float(cost[g.id].sum()) for g in groups) * scale
    share = min(max_fraction, need / max(total, 1e-30))
    for _ in range(12):  # a share too small to move any rounded size is doubled
        chosen: dict[int, list[int]] = {g.id: [] for g in groups}
        for g in groups:
            atoms = g.size // g.atom
            key = g.producers[0]
            target = ideal.get(key, float(atoms)) * (1.0 - share)
            unit = step if key in rounded else 1
            keep = max(unit, round(target / unit) * unit) if unit > 1 else max(1, round(target))
            k = min(caps[g.id], max(0, atoms - keep))
            chosen[g.id] = order[g.id][:k]
        if any(chosen.values()) or share >= max_fraction:
            break
        share = min(max_fraction, 2 * share)
    for g in groups:  # the new ideal sizes, for the next round
        key = g.producers[0]
        ideal[key] = ideal.get(key, float(g.size // g.atom)) * (1.0 - share)
    return chosen


def _rounded(chosen: dict[int, list[int]], sizes: dict[int, int], order: dict[int, list[int]],
             step: int) -> dict[int, list[int]]:
    """``chosen`` with each group's new size moved to the nearest multiple of ``step`` (at
    least ``step``; keeping the group as it is counts as a choice too), taking or giving back
    units in ``order`` (least valuable first). When every group rounds to no change, the group
    with the most chosen units is cut to the next multiple below, so a round always removes
    something while any group can shrink."""
    out: dict[int, list[int]] = {}
    for gid, units in chosen.items():
        size = sizes[gid]
        left = size - len(units)
        below = max(step, (left // step) * step)
        options = [size] + [m for m in (below, below + step) if m < size]
        new = min(options, key=lambda m: (abs(m - left), -m))
        out[gid] = order[gid][: size - new]
    if chosen and not any(out.values()):
        gid = max(chosen, key=lambda g: (len(chosen[g]), -g))
        size = sizes[gid]
        new = ((size - 1) // step) * step
        if chosen[gid] and new >= step:
            out[gid] = order[gid][: size - new]
    return out


def _latency_costs(model: nn.Module, graph: ModelGraph, groups: list[Group],
                   batch: tuple[torch.Tensor, ...]) -> tuple[dict[int, torch.Tensor], float]:
    """Measured seconds each unit's removal saves (see the module docstring), and their sum
    over every unit of every group (the estimate of the whole model's latency)."""
    _, times = measure_latency(model, batch, modules=list(graph.calls))
    per_unit: dict[int, float] = {}
    for node in graph.graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or name not in times:
            continue
        seconds = times[name] / len(graph.calls[name])
        out = _layout_of(graph.layouts.get(node))
        source = node.args[0] if node.args else None
        inp = _layout_of(graph.layouts.get(source)) if source is not None else None
        sides = [x for x in (out, inp) if x is not None]
        if out is not None and inp is not None and out.gids == inp.gids:
            sides = [out]  # an element-wise module, a pooling: one set of units
        for lay in sides:
            features = sum(seg.features for seg in lay.segments)
            for seg in lay.segments:
                if seg.gid is not None and features:
                    per_unit[seg.gid] = per_unit.get(seg.gid, 0.0) + \
                        seconds * seg.block / features
    costs = {g.id: torch.full((g.size,), per_unit.get(g.id, 0.0), dtype=torch.float64)
             for g in groups}
    total = sum(per_unit.get(g.id, 0.0) * g.size for g in graph.groups)
    return costs, total


def _layout_of(value: object) -> Layout | None:
    if isinstance(value, tuple):
        value = value[0] if value else None
    return value if isinstance(value, Layout) else None


def _eligible(group: Group) -> bool:
    return (group.resizable and not group.output and group.size > 1 and group.segments == 1
            and bool(group.producers))


def _tensor(model: nn.Module, member: Member) -> torch.Tensor | None:
    owner = model.get_submodule(member.module) if member.module else model
    value = getattr(owner, member.tensor, None) if member.tensor else None
    return value if isinstance(value, torch.Tensor) else None


def weight_positions(model: nn.Module, example: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Per sample, how many times each Conv/Linear weight is applied (output positions)."""
    found: dict[str, float] = {}
    handles = []
    batch = example[0].shape[0] if example[0].dim() else 1

    def hook(name: str, module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and module.weight.shape[0] > 0:
            found[name] = out.numel() / (batch * module.weight.shape[0])

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=name: hook(n, m, a, o)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def unit_cost(model: nn.Module, group: Group, by: str,
               positions: dict[str, float]) -> torch.Tensor:
    """What removing each unit saves: parameter entries, or MACs per sample."""
    cost = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        t = _tensor(model, m)
        if not isinstance(t, nn.Parameter):
            continue
        entries = m.block * t.numel() / max(1, t.shape[m.dim])
        if by == "parameters":
            cost += entries
        elif m.tensor == "weight" and m.module in positions:
            cost += entries * positions[m.module]
    return cost


def _estimated_total(model: nn.Module, by: str, positions: dict[str, float]) -> float:
    """The total that :func:`unit_cost` estimates from (to scale it to the measured one)."""
    if by == "parameters":
        return float(count_parameters(model))
    return sum(model.get_submodule(n).weight.numel() * p for n, p in positions.items())


def _information(model: nn.Module, groups: list[Group], probe: list[Batch],
                 loss_fn: LossFn) -> dict[int, torch.Tensor]:
    """RMS over batches of the first-order loss change (nats) of removing each unit."""
    members = {}
    for g in groups:
        readers = [m for m in g.members if m.role == "in"
                   and isinstance(_tensor(model, m), nn.Parameter)]
        members[g.id] = readers or [m for m in g.members if m.role in ("out", "pass")
                                    and isinstance(_tensor(model, m), nn.Parameter)]
    squares = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    params = list(model.parameters())
    saved = [p.grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for x, y in probe:
            for p in params:
                p.grad = None
            loss = loss_fn(model_output(model(*_inputs(x))), y)
            if not torch.isfinite(loss):
                raise AnalysisError("the loss is NaN or infinite while scoring units; check "
                                    "the model and the data")
            loss.backward()
            for g in groups:
                change = torch.zeros(g.size, dtype=torch.float64)
                for m in members[g.id]:
                    t = _tensor(model, m)
                    if t is None or t.grad is None:
                        continue
                    prod = (t.detach() * t.grad).double()
                    change += unit_entries(prod, m, g.size).sum(1).cpu()
                squares[g.id] += change.square()
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
        model.train(was_training)
    return {gid: (s / len(probe)).sqrt() for gid, s in squares.items()}


def _magnitude(model: nn.Module, groups: list[Group]) -> dict[int, torch.Tensor]:
    """Each unit's group magnitude relative to its group's mean (see the module docstring)."""
    out = {}
    for g in groups:
        norm = unit_norms(model, g, readers=True).sqrt()
        out[g.id] = norm / norm.mean().clamp_min(1e-30)
    return out


def _inputs(x: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, tuple | list) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(x)
    raise ConfigError(f"batch inputs must be a tensor or a tuple of tensors, got "
                      f"{type(x).__name__}")

