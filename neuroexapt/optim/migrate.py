"""Carry an optimizer's parameters and state across a model edit.

:func:`migrate` reads the :class:`~neuroexapt.optim.parammap.ParamMap` an edit returns and
updates an optimizer in place: replaced parameters take the old ones' places in their param
groups, and their state (momentum, Adam moments) is re-indexed like the parameter itself.
:func:`snapshot` and :func:`restore` put an optimizer back exactly when an edit fails.

Example:
    >>> param_map = edit(model)        # any edit in neuroexapt.ops returns a ParamMap
    >>> migrate(optimizer, param_map)  # the optimizer now trains the new parameters
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import SurgeryError
from neuroexapt.optim.parammap import DimMap, ParamChange, ParamMap

__all__ = ["SECOND_MOMENT_KEYS", "OptimizerSnapshot", "migrate", "restore", "snapshot"]

logger = logging.getLogger(__name__)

#: State keys holding running averages of squared gradients: scaled by ``scale**2``.
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})
#: State keys holding magnitudes (Adamax's infinity norm): scaled by ``|scale|``.
_ABS_KEYS = frozenset({"exp_inf"})
_SUPPORTED = "SGD, Adam, AdamW, RMSprop or Adagrad"
_INDEX_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})

_State = dict[str, Any]
_Plan = list[tuple[nn.Parameter, nn.Parameter, _State | None]]


def migrate(optimizer: torch.optim.Optimizer, param_map: ParamMap) -> None:
    """Update ``optimizer`` in place so that it trains the parameters of an edited model.

    Everything is validated before anything is mutated: when this raises, the optimizer is
    exactly as before. Param-group dicts and their ``params`` lists keep their identity, so
    LR schedulers holding ``optimizer.param_groups`` keep working.

    Args:
        optimizer: the optimizer to update.
        param_map: what the edit did to the parameters.

    Raises:
        SurgeryError: a state tensor has a shape that cannot be re-indexed, a ``DimMap`` does
            not turn the old parameter's shape into the new one's, or a parameter would appear
            twice in the optimizer.
    """
    groups = [list(group["params"]) for group in optimizer.param_groups]
    home = _home_groups(groups)
    plan = _plan_changes(optimizer, groups, param_map.changed)
    home.update(_home_groups(groups))
    removed = list(param_map.removed)
    gone = {id(p) for p in removed}
    groups = [[p for p in params if id(p) not in gone] for params in groups]
    added = _plan_added(groups, home, param_map.added)
    _check_unique(groups)
    _commit(optimizer, groups, plan, removed)
    counts = (len(plan), added, len(removed))
    logger.debug("migrated %s: %d changed, %d added, %d removed", type(optimizer).__name__, *counts)


def _home_groups(groups: list[list[nn.Parameter]]) -> dict[int, int]:
    """Map ``id(param)`` to the index of the group holding it."""
    return {id(p): gi for gi, params in enumerate(groups) for p in params}


def _plan_changes(
    optimizer: torch.optim.Optimizer, groups: list[list[nn.Parameter]], changes: list[ParamChange]
) -> _Plan:
    """Swap new for old in ``groups`` (copies) and compute each new state; mutate nothing else."""
    where = {id(p): (gi, pos) for gi, params in enumerate(groups) for pos, p in enumerate(params)}
    plan: _Plan = []
    for change in changes:
        loc = where.pop(id(change.old), None)
        if loc is None and any(change.old is old for old, _, _ in plan):
            raise SurgeryError(
                f"parameter of shape {tuple(change.old.shape)} is changed twice "
                "in one ParamMap; merge its DimMaps into one ParamChange"
            )
        if loc is None:
            logger.debug(
                "parameter of shape %s is not in the optimizer; skipped", tuple(change.old.shape)
            )
            continue
        _check_dims(change)
        state = optimizer.state.get(change.old)
        new_state = None if state is None else _map_state(optimizer, change, state)
        groups[loc[0]][loc[1]] = change.new
        plan.append((change.old, change.new, new_state))
    return plan


def _plan_added(
    groups: list[list[nn.Parameter]],
    home: dict[int, int],
    added: list[tuple[nn.Parameter, nn.Parameter | None]],
) -> int:
    """Append each new param to its reference's group in ``groups`` (copies); return the count."""
    present = set(_home_groups(groups))
    count = 0
    for param, ref in added:
        if id(param) in present:
            continue
        if not groups:
            raise SurgeryError(
                "cannot add a parameter to an optimizer that has no param group; "
                "call optimizer.add_param_group first"
            )
        if not isinstance(param, torch.Tensor) or not param.is_leaf:
            raise SurgeryError(
                f"cannot add {type(param).__name__} to the optimizer: only leaf "
                "tensors (nn.Parameter) can be optimized"
            )
        gi = home.get(id(ref), 0) if ref is not None else 0
        groups[gi].append(param)
        present.add(id(param))
        count += 1
    return count


def _check_unique(groups: list[list[nn.Parameter]]) -> None:
    """Raise if a parameter would appear twice in the optimizer after the edit."""
    seen: set[int] = set()
    for params in groups:
        for p in params:
            if id(p) in seen:
                raise SurgeryError(
                    f"parameter of shape {tuple(p.shape)} would appear twice in the optimizer "
                    "after the edit; a ParamChange's new parameter must not already be trained "
                    "by the optimizer"
                )
            seen.add(id(p))


def _commit(
    optimizer: torch.optim.Optimizer,
    groups: list[list[nn.Parameter]],
    plan: _Plan,
    removed: list[nn.Parameter],
) -> None:
    """Write the planned param lists and states into ``optimizer``; cannot fail."""
    for old, new, _ in plan:
        optimizer.state.pop(old, None)
        optimizer.state.pop(new, None)
    for p in removed:
        optimizer.state.pop(p, None)
    for _, new, state in plan:
        if state is not None:
            optimizer.state[new] = state
    for group, params in zip(optimizer.param_groups, groups, strict=True):
        group["params"][:] = params


def _check_dims(change: ParamChange) -> None:
    """Raise unless ``change.dims`` turns ``change.old``'s shape into ``change.new``'s."""
    shape = list(change.old.shape)
    for dm in change.dims:
        if not -len(shape) <= dm.dim < len(shape):
            raise SurgeryError(
                f"DimMap dim {dm.dim} is out of range for a parameter of "
                f"shape {tuple(change.old.shape)}"
            )
        size = shape[dm.dim]
        index = dm.index
        if index.dim() != 1 or index.dtype not in _INDEX_DTYPES:
            raise SurgeryError(
                f"DimMap index must be a 1-D integer tensor, got shape "
                f"{tuple(index.shape)} and dtype {index.dtype}"
            )
        if index.numel() and not bool(((index >= -1) & (index < size)).all()):
            raise SurgeryError(
                f"DimMap index along dim {dm.dim} must lie in [-1, {size}), got {index.tolist()}"
            )
        if dm.scale is not None and tuple(dm.scale.shape) != (index.numel(),):
            raise SurgeryError(
                f"DimMap scale must have shape ({index.numel()},) like its "
                f"index, got {tuple(dm.scale.shape)}"
            )
        shape[dm.dim] = index.numel()
    if tuple(shape) != tuple(change.new.shape):
        raise SurgeryError(
            f"DimMaps turn shape {tuple(change.old.shape)} into {tuple(shape)}, "
            f"but the new parameter has shape {tuple(change.new.shape)}"
        )


def _map_state(optimizer: torch.optim.Optimizer, change: ParamChange, state: _State) -> _State:
    """Return a new state dict for ``change.new``; the old state tensors are left untouched."""
    return {key: _map_value(optimizer, change, key, value) for key, value in state.items()}


def _map_value(optimizer: torch.optim.Optimizer, change: ParamChange, key: str, value: Any) -> Any:
    """Re-index one state entry: param-shaped tensors are mapped, scalars cloned."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.shape == change.old.shape:
        return _apply_dims(value, change.dims, key)
    if value.dim() == 0:
        return value.clone()
    raise SurgeryError(
        f"{type(optimizer).__name__} state {key!r} has shape {tuple(value.shape)} but its "
        f"parameter has shape {tuple(change.old.shape)}; it cannot be re-indexed across the "
        f"edit. Migrate this optimizer's state manually, or use {_SUPPORTED}."
    )


def _apply_dims(value: torch.Tensor, dims: tuple[DimMap, ...], key: str) -> torch.Tensor:
    """Apply each :class:`DimMap` in order to a new copy of ``value``."""
    out = value if dims else value.clone()  # each DimMap builds a new tensor
    for dm in dims:
        out = _apply_dim(out, dm, key)
    return out


def _apply_dim(value: torch.Tensor, dm: DimMap, key: str) -> torch.Tensor:
    """Gather ``value`` along ``dm.dim`` (zero at ``-1``) and multiply by the key's scale."""
    index = dm.index.to(device=value.device, dtype=torch.long)
    kept = (index >= 0).nonzero().squeeze(1)
    shape = list(value.shape)
    shape[dm.dim] = index.numel()
    out = value.new_zeros(shape)
    out.index_copy_(dm.dim, kept, value.index_select(dm.dim, index[kept]))
    if dm.scale is None:
        return out
    view = [1] * out.dim()
    view[dm.dim] = -1
    return out * _scale_for(key, dm.scale.to(device=out.device, dtype=out.dtype)).view(view)


def _scale_for(key: str, scale: torch.Tensor) -> torch.Tensor:
    """The multiplier of state ``key`` for a parameter scaled by ``scale``."""
    if key in SECOND_MOMENT_KEYS:
        return scale * scale
    if key in _ABS_KEYS:
        return scale.abs()
    return scale


@dataclass(frozen=True)
class OptimizerSnapshot:
    """What :func:`restore` needs to put an optimizer back exactly.

    Holds references, not copies, of the parameters and state tensors: :func:`migrate` never
    mutates a state tensor in place, so a snapshot taken just before an edit stays valid
    until the next ``optimizer.step()``.

    Example:
        >>> snap = snapshot(optimizer)
        >>> try:
        ...     migrate(optimizer, edit(model))
        ... except SurgeryError:
        ...     restore(optimizer, snap)
    """

    groups: tuple[dict[str, Any], ...]  # the param-group dict objects themselves
    entries: tuple[dict[str, Any], ...]  # each group's entries; params as a list copy
    state: dict[torch.Tensor, _State]  # optimizer.state, each per-param dict copied


def snapshot(optimizer: torch.optim.Optimizer) -> OptimizerSnapshot:
    """Capture ``optimizer``'s param groups and state so :func:`restore` can put them back.

    Args:
        optimizer: the optimizer to capture.

    Returns:
        The snapshot; cheap (shallow copies only).
    """
    return OptimizerSnapshot(
        groups=tuple(optimizer.param_groups),
        entries=tuple(_copy_entries(group) for group in optimizer.param_groups),
        state={p: dict(s) for p, s in optimizer.state.items()},
    )


def restore(optimizer: torch.optim.Optimizer, snap: OptimizerSnapshot) -> None:
    """Put ``optimizer`` back as it was when ``snap`` was taken; ``snap`` stays reusable.

    Param-group dicts keep their identity (their contents are replaced), so LR schedulers
    keep working.

    Args:
        optimizer: the optimizer ``snap`` was taken from.
        snap: the snapshot to restore.
    """
    for group, entries in zip(snap.groups, snap.entries, strict=True):
        group.clear()
        group.update(_copy_entries(entries))
    optimizer.param_groups[:] = list(snap.groups)
    optimizer.state.clear()
    optimizer.state.update({p: dict(s) for p, s in snap.state.items()})


def _copy_entries(group: dict[str, Any]) -> dict[str, Any]:
    """Copy a param group: ``params`` as a new list, tensor values (a tensor lr) cloned."""
    out: dict[str, Any] = {}
    for key, value in group.items():
        if key == "params":
            out[key] = list(value)
        elif isinstance(value, torch.Tensor):
            out[key] = value.clone()
        else:
            out[key] = value
    return out
