"""``widen`` and ``narrow``: change the number of units of a group of coupled dimensions."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from neuroexapt.errors import ConfigError, SurgeryError
from neuroexapt.graph import Group, UnitPlan, resolve_layer, trace
from neuroexapt.graph.groups import Member
from neuroexapt.graph.wrappers import accepts_wrapped
from neuroexapt.ops.apply import apply_plan
from neuroexapt.ops.edit import count_parameters, require_resizable, run_edit
from neuroexapt.ops.history import EditRecord, append_history, inputs_for, spec_of
from neuroexapt.ops.transaction import (
    check_outputs_shape,
    edited_outputs,
    reference_outputs,
    transaction,
)
from neuroexapt.optim import migrate

logger = logging.getLogger(__name__)

__all__ = ["atom_norms", "atom_units", "narrow", "narrow_many", "per_atom", "unit_entries",
           "unit_norms", "widen"]

Strategy = Literal["split", "zero"]


def unit_entries(t: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """``t`` -> ``[size, rest]``: the entries of each of the group's units along the member's
    dim (its ``offset`` and ``block`` applied)."""
    part = t.narrow(member.dim, member.offset, size * member.block).movedim(member.dim, 0)
    return part.reshape(size, -1)


def unit_norms(model: nn.Module, group: Group, *, readers: bool = False) -> torch.Tensor:
    """Squared norm of each unit's incoming weights, summed over the group's producers.

    ``readers=True``: the group magnitude instead, every weight entry that computes the unit
    or reads it (``"in"`` members, every consumer), biases left out.
    """
    roles = ("out", "in") if readers else ("out",)
    total = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        if m.role not in roles or not m.tensor or (readers and m.tensor.endswith("bias")):
            continue
        owner = model.get_submodule(m.module) if m.module else model
        t = getattr(owner, m.tensor)
        if readers and not isinstance(t, nn.Parameter):
            continue
        total += unit_entries(t.detach().double(), m, group.size).pow(2).sum(1).cpu()
    return total


def _as_index_list(value: object, what: str) -> list[int]:
    """``value`` as a list of ints, or a ConfigError naming ``what``."""
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | range):
        raise ConfigError(f"{what} must be a sequence of unit indices, got {value!r}")
    items = list(value)
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ConfigError(f"{what} must be unit indices (ints), got {bad[0]!r}")
    return items


def _segment_of(group: Group, unit: int) -> int:
    return unit // (group.size // group.segments)


def _check_units(group: Group, units: Sequence[int], what: str) -> list[int]:
    out = []
    for u in units:
        if isinstance(u, bool) or (not isinstance(u, int | torch.SymInt) and not (
            isinstance(u, torch.Tensor) and u.numel() == 1
        )):
            raise ConfigError(f"{what} must be unit indices (ints), got {u!r}")
        u = int(u)
        if not 0 <= u < group.size:
            raise ConfigError(f"{what} has unit {u}, outside 0..{group.size - 1}")
        out.append(u)
    return out


def per_atom(values: torch.Tensor, atom: int) -> torch.Tensor:
    """Per-unit ``values`` summed over each run of ``atom`` units (an attention head)."""
    return values.reshape(-1, atom).sum(1) if atom > 1 else values


def atom_norms(model: nn.Module, group: Group) -> torch.Tensor:
    """:func:`unit_norms` summed over each run of ``group.atom`` units (a head)."""
    return per_atom(unit_norms(model, group), group.atom)


def atom_units(group: Group, atoms: Sequence[int]) -> list[int]:
    """The units of the given atoms (heads), in order."""
    return [a * group.atom + t for a in atoms for t in range(group.atom)]


def _default_units(model: nn.Module, group: Group, by: int) -> list[int]:
    """The ``by`` largest-norm units (whole heads when the units form heads), equally many
    per segment; every unit once per round when the units are normalised together (LayerNorm
    needs equal duplication)."""
    if group.normalizers and by % group.size == 0:
        return list(range(group.size)) * (by // group.size)
    norms = atom_norms(model, group)
    per = group.size // group.segments // group.atom
    chosen: list[int] = []
    for s in range(group.segments):
        seg = norms[s * per : (s + 1) * per]
        k = by // group.segments // group.atom
        order = seg.argsort(descending=True, stable=True).tolist()
        chosen += atom_units(group, [s * per + order[i % per] for i in range(k)])
    return chosen


def _check_atoms(group: Group, units: list[int], what: str) -> None:
    """Refuse units that split a head: each head's units all listed, equally often."""
    if group.atom == 1:
        return
    counts = Counter(units)
    for a in {u // group.atom for u in units}:
        if len({counts.get(u, 0) for u in atom_units(group, [a])}) > 1:
            raise SurgeryError(
                f"{what}: the group's {group.size} units form attention heads of "
                f"{group.atom} units; choose whole heads (units {a * group.atom}.."
                f"{(a + 1) * group.atom - 1} for head {a}), or by= a multiple of {group.atom}"
            )


def _check_segments(group: Group, units: list[int], what: str) -> None:
    if group.segments == 1:
        return
    counts = Counter(_segment_of(group, u) for u in units)
    if len(set(counts.get(s, 0) for s in range(group.segments))) > 1:
        raise SurgeryError(
            f"{what}: the group's {group.size} units form {group.segments} equal segments "
            f"(GroupNorm groups / grouped convolution); choose equally many units in each"
        )


def _names(names: list[str]) -> str:
    """Module names quoted; descriptions of operations (already quoted inside) as they are."""
    return ", ".join(n if "'" in n else repr(n) for n in dict.fromkeys(names))


def _check_normalized(
    group: Group, units: list[int], strategy: Strategy, allow_approximate: bool
) -> None:
    """Refuse a widening that the operations combining the units would notice."""
    if allow_approximate:
        return
    if group.sums:
        raise SurgeryError(
            f"{', '.join(group.sums)} sums over these {group.size} units, so any new unit "
            "changes the output: remove units (narrow) instead, or pass "
            "allow_approximate=True and let training adapt"
        )
    if group.extrema and strategy == "zero":
        raise SurgeryError(
            f"{', '.join(group.extrema)} takes the extremum over these {group.size} units, "
            "which fresh units (strategy='zero') can change: use strategy='split' (copies "
            "keep it), or pass allow_approximate=True"
        )
    if not group.normalizers:
        return
    if strategy == "zero":
        raise SurgeryError(
            f"{_names(group.normalizers)} normalise over these "
            f"{group.size} units, so "
            "fresh units (strategy='zero') change their statistics and the function: use "
            f"strategy='split' with by= a multiple of {group.size}, or pass "
            "allow_approximate=True"
        )
    counts = Counter(units)
    uniform = len(counts) == group.size and len(set(counts.values())) == 1
    if not uniform:
        raise SurgeryError(
            f"{_names(group.normalizers)} normalise over these "
            f"{group.size} units, so widening preserves the function only when every unit "
            f"is split equally: use by= a multiple of {group.size} with units=None, or pass "
            "allow_approximate=True"
        )


def split_plan(group: Group, units: list[int], strategy: Strategy, noise: float) -> UnitPlan:
    """New units: each segment's old units, then that segment's copies."""
    per = group.size // group.segments
    index: list[int] = []
    fresh: list[bool] = []
    seen: Counter[int] = Counter()
    occurrence = []  # the copies of a head stay whole: ordered by head, then copy
    for u in units:
        occurrence.append((u // group.atom, seen[u], u))
        seen[u] += 1
    for s in range(group.segments):
        index += list(range(s * per, (s + 1) * per))
        fresh += [False] * per
        extra = [u for _, _, u in sorted(occurrence) if _segment_of(group, u) == s]
        index += extra
        fresh += [strategy == "zero"] * len(extra)
    counts = Counter(units)
    scale = [1.0 / (1 + counts[u]) for u in index] if strategy == "split" else [1.0] * len(index)
    return UnitPlan(torch.tensor(index, dtype=torch.long),
                    torch.tensor(scale, dtype=torch.float64),
                    torch.tensor(fresh, dtype=torch.bool), noise)


@accepts_wrapped
def widen(
    model: nn.Module,
    layer: str,
    by: int = 1,
    *,
    example_inputs: Any = None,
    strategy: Strategy = "split",
    units: Sequence[int] | None = None,
    noise: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    verify: bool = False,
    allow_approximate: bool = False,
) -> EditRecord:
    """Add ``by`` units to the group produced by ``layer``.

    Args:
        model: the model, edited in place.
        layer: module name (as in ``model.named_modules()``) whose output units grow.
        by: number of units to add.
        example_inputs: a batch the model accepts (needed the first time a model is edited).
        strategy: ``"split"`` duplicates units and divides their outgoing weights among the
            copies (Net2Net); ``"zero"`` adds units with fresh incoming and zero outgoing weights.
        units: which units to duplicate (repeats allowed); default the largest-norm ones.
        noise: relative noise added to the copies' incoming weights (0 keeps the function).
        optimizer: optimizer whose state follows the edit.
        verify: compare outputs before and after; raise ``FunctionPreservationError`` if they
            differ beyond float rounding.
        allow_approximate: accept a widening that LayerNorm/GroupNorm statistics over the
            group make only approximately function-preserving.

    Returns:
        The :class:`EditRecord`, also appended to the model's history.
    """
    if isinstance(by, bool) or not isinstance(by, int) or by < 1:
        raise ConfigError(f"by must be a positive int, got {by!r}")
    if strategy not in ("split", "zero"):
        raise ConfigError(f"strategy must be 'split' or 'zero', got {strategy!r}")
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not (
        math.isfinite(noise) and noise >= 0
    ):
        raise ConfigError(f"noise must be a float >= 0 (finite), got {noise!r}")
    if units is not None:
        units = _as_index_list(units, "units")
    name = resolve_layer(model, layer)
    inputs = inputs_for(model, example_inputs, "widen")

    def body() -> tuple[Any, dict[str, Any]]:
        group = trace(model, inputs).group_of(name)
        require_resizable(group, layer)
        if by % group.segments:
            raise SurgeryError(
                f"'{layer}' has units in {group.segments} equal segments; widen by a multiple "
                f"of {group.segments}"
            )
        if by % (group.segments * group.atom):
            raise SurgeryError(
                f"'{layer}' has units in attention heads of {group.atom}; widen by a multiple "
                f"of {group.segments * group.atom} (whole heads)"
            )
        chosen = _check_units(group, list(units), "units") if units is not None else \
            _default_units(model, group, by)
        if len(chosen) != by:
            raise ConfigError(f"units lists {len(chosen)} units but by={by}")
        _check_segments(group, chosen, f"widen '{layer}'")
        _check_atoms(group, chosen, f"widen '{layer}'")
        _check_normalized(group, chosen, strategy, allow_approximate)
        plan = split_plan(group, chosen, strategy, float(noise))
        args = {"layer": name, "units": chosen, "strategy": strategy, "by": by,
                "noise": float(noise)}
        return apply_plan(model, group, plan), args

    return run_edit(model, optimizer, inputs, "widen", name, verify, body)


@accepts_wrapped
def narrow(
    model: nn.Module,
    layer: str,
    *,
    remove: Sequence[int] | int | None = None,
    keep: Sequence[int] | None = None,
    example_inputs: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> EditRecord:
    """Physically remove units from the group produced by ``layer``.

    Every coupled tensor shrinks (weights, biases, normalisation statistics, the next layers'
    inputs); nothing is masked. This changes the function: it is pruning.

    Args:
        model: the model, edited in place.
        layer: module name whose output units shrink.
        remove: unit indices to remove, or a count of lowest-norm units to remove.
        keep: unit indices to keep (instead of ``remove``).
        example_inputs: a batch the model accepts (needed the first time a model is edited).
        optimizer: optimizer whose state follows the edit.

    Returns:
        The :class:`EditRecord`.
    """
    if (remove is None) == (keep is None):
        raise ConfigError("narrow needs exactly one of remove= or keep=")
    if keep is not None:
        keep = _as_index_list(keep, "keep")
    elif not isinstance(remove, int) or isinstance(remove, bool):
        remove = _as_index_list(remove, "remove")
    name = resolve_layer(model, layer)
    inputs = inputs_for(model, example_inputs, "narrow")

    def body() -> tuple[Any, dict[str, Any]]:
        group = trace(model, inputs).group_of(name)
        require_resizable(group, layer)
        kept = _check_kept(group, _kept_units(model, group, remove, keep), layer)
        plan = UnitPlan.keep(torch.tensor(kept, dtype=torch.long))
        return apply_plan(model, group, plan), {"layer": name, "keep": kept}

    return run_edit(model, optimizer, inputs, "narrow", name, False, body)


def _check_kept(group: Group, kept: list[int], layer: str) -> list[int]:
    """``kept`` (sorted unit indices), after checking that narrowing to them is an edit."""
    if not kept:
        raise SurgeryError(f"narrow would remove all {group.size} units of '{layer}'")
    if len(kept) == group.size:
        raise ConfigError(f"narrow of '{layer}' removes no unit")
    removed = [u for u in range(group.size) if u not in set(kept)]
    _check_segments(group, removed, f"narrow '{layer}'")
    _check_atoms(group, removed, f"narrow '{layer}'")
    return kept


def _kept_units(
    model: nn.Module, group: Group, remove: Sequence[int] | int | None,
    keep: Sequence[int] | None,
) -> list[int]:
    if keep is not None:
        return sorted(set(_check_units(group, list(keep), "keep")))
    if isinstance(remove, int) and not isinstance(remove, bool):
        if not 0 < remove < group.size:
            raise ConfigError(f"remove={remove} must be between 1 and {group.size - 1}")
        if remove % group.atom:
            raise SurgeryError(
                f"the group's {group.size} units form attention heads of {group.atom} units: "
                f"remove a multiple of {group.atom} (whole heads)"
            )
        remove //= group.atom  # counted in heads from here (atom 1: in units)
        per_seg = remove // group.segments if remove % group.segments == 0 else None
        norms = atom_norms(model, group)
        if per_seg is None:
            drop = norms.argsort(stable=True)[:remove].tolist()
        else:
            size = group.size // group.segments // group.atom
            drop = []
            for s in range(group.segments):
                order = norms[s * size : (s + 1) * size].argsort(stable=True)[:per_seg]
                drop += (order + s * size).tolist()
        return sorted(set(range(group.size)) - set(atom_units(group, drop)))
    assert remove is not None
    gone = set(_check_units(group, list(remove), "remove"))
    return [u for u in range(group.size) if u not in gone]


@accepts_wrapped
def narrow_many(
    model: nn.Module,
    remove: Mapping[str, Sequence[int]],
    *,
    example_inputs: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[EditRecord]:
    """Remove units from several groups at once, with one trace: one pruning round.

    ``remove`` maps a layer name to the unit indices to remove from the group it produces.
    Every group is resized as by :func:`narrow` (and recorded as one ``narrow`` each, so a
    checkpoint replays them), but the model is traced once for all of them: a member that
    follows another group's entries along the same tensor dimension (after a concatenation)
    is moved back by the entries removed before it. Groups that a module handler resizes
    (``custom`` members, such as attention) are re-traced before their turn. All or nothing:
    if any group fails, the model, the optimizer and the history are restored, and the model's
    output shapes are checked on ``example_inputs`` at the end.

    Returns:
        The :class:`EditRecord` of each group, in the order given.

    Raises:
        ConfigError: an empty mapping, two layers of the same group, or bad unit indices.
        SurgeryError: a group that may not shrink, or that would lose every unit.
    """
    if not isinstance(remove, Mapping) or not remove:
        raise ConfigError("narrow_many needs a non-empty {layer: [units to remove]} mapping")
    wanted = {resolve_layer(model, layer): _as_index_list(units, f"remove['{layer}']")
              for layer, units in remove.items()}
    inputs = inputs_for(model, example_inputs, "narrow_many")
    records: list[EditRecord] = []
    with transaction(model, optimizer):
        reference = reference_outputs(model, inputs)
        graph = trace(model, inputs)
        groups: dict[int, str] = {}
        for name in wanted:
            group = graph.group_of(name)
            require_resizable(group, name)
            if group.id in groups:
                raise ConfigError(f"'{name}' and '{groups[group.id]}' produce the same units; "
                                  "name each group once")
            groups[group.id] = name
        # entries removed so far along each (module, tensor, dim): (offset, count) pairs
        removed: dict[tuple[str, str, int], list[tuple[int, int]]] = {}
        for name, units in wanted.items():
            original = graph.group_of(name)
            if any(m.role == "custom" for m in original.members):
                # its handler reads the model as it is now: trace again, and count offsets
                # in the new graph from here on
                graph, removed = trace(model, inputs), {}
                original = graph.group_of(name)
            group = _moved_back(original, removed)
            gone = set(_check_units(group, units, f"narrow '{name}'"))
            kept = _check_kept(group, [u for u in range(group.size) if u not in gone], name)
            before = count_parameters(model)
            param_map = apply_plan(model, group, UnitPlan.keep(torch.tensor(kept)))
            if optimizer is not None:
                migrate(optimizer, param_map)
            for m in original.members:  # offsets as the traced graph has them
                if m.tensor and m.role != "custom":
                    removed.setdefault((m.module, m.tensor, m.dim), []).append(
                        (m.offset, len(gone) * m.block))
            record = EditRecord("narrow", name, {"layer": name, "keep": kept}, spec_of(inputs),
                                before, count_parameters(model), param_map)
            append_history(model, record)
            records.append(record)
        check_outputs_shape(reference, edited_outputs(model, inputs, "narrow_many"),
                            "narrow_many")
    logger.info("narrow_many: %d groups, parameters %d -> %d", len(records),
                records[0].params_before, records[-1].params_after)
    return records


def _moved_back(group: Group, removed: Mapping[tuple[str, str, int], list[tuple[int, int]]]
                ) -> Group:
    """``group`` with each member's offset reduced by the entries removed before it.

    Offsets, the member's and those in ``removed``, are all the traced graph's (before any
    removal), so the order in which groups were resized does not matter.
    """
    members = []
    for m in group.members:
        shift = sum(count for offset, count in removed.get((m.module, m.tensor, m.dim), [])
                    if offset < m.offset)
        members.append(dataclasses.replace(m, offset=m.offset - shift) if shift else m)
    return dataclasses.replace(group, members=members)
