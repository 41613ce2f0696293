"""Apply a :class:`UnitPlan` to every tensor of a group, in place on the model."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from neuroexapt.errors import SurgeryError
from neuroexapt.graph.groups import Group, Member
from neuroexapt.graph.handlers import get_handler
from neuroexapt.graph.plan import TensorUpdate, UnitPlan, along, take_index
from neuroexapt.optim.parammap import DimMap, ParamChange, ParamMap

__all__ = ["apply_plan", "member_index"]


@dataclass
class _Pending:
    """A tensor being rewritten and the dimension maps applied to it so far."""

    value: torch.Tensor
    dims: list[DimMap] = field(default_factory=list)


_ROLE = {"out": "computes", "in": "reads", "pass": "passes", "custom": "resizes"}


def member_index(member: Member, size: int, old_units: int, plan: UnitPlan) -> torch.Tensor:
    """Full index along the member's dimension: new position -> old position (-1 fresh)."""
    b, o = member.block, member.offset
    units = torch.where(plan.fresh & (member.role != "pass"), -1, plan.index)
    middle = (units.view(-1, 1) * b + torch.arange(b)).flatten() + o
    middle = torch.where(units.repeat_interleave(b) < 0, -1, middle)
    return torch.cat([torch.arange(o), middle, torch.arange(o + old_units * b, size)])


def _member_scale(member: Member, size: int, old_units: int, plan: UnitPlan) -> torch.Tensor:
    b, o = member.block, member.offset
    return torch.cat([
        torch.ones(o, dtype=torch.float64),
        plan.scale.repeat_interleave(b),
        torch.ones(size - o - old_units * b, dtype=torch.float64),
    ])


def _transform(p: _Pending, m: Member, old_units: int, plan: UnitPlan) -> None:
    """Rewrite ``p.value`` along ``m.dim`` for ``plan``."""
    t, dim = p.value, m.dim
    size = t.shape[dim]
    if m.offset + old_units * m.block > size:
        raise SurgeryError(f"'{m.path}' has {size} entries on dim {dim}, fewer than the group")
    index = member_index(m, size, old_units, plan)
    new = take_index(t, dim, index)
    scale = None
    if m.role == "in":
        scale = _member_scale(m, size, old_units, plan)
        new = new * along(new, dim, scale)
    elif m.role == "out":
        new = _fill_out(t, new, dim, index, plan, m)
    p.value = new
    p.dims.append(DimMap(dim, index, scale))


def _fill_out(
    old: torch.Tensor, new: torch.Tensor, dim: int, index: torch.Tensor, plan: UnitPlan, m: Member
) -> torch.Tensor:
    """Random incoming weights for fresh units; optional noise on split copies."""
    std = float(old.detach().float().std()) if old.numel() > 1 else 0.0
    fresh = (index < 0).nonzero().flatten()
    if fresh.numel() and old.dim() > 1:
        shape = list(new.shape)
        shape[dim] = fresh.numel()
        noise = torch.randn(shape, dtype=new.dtype, device=new.device) * (std or 0.01)
        new = new.index_copy(dim, fresh.to(new.device), noise)
    if plan.noise > 0 and old.dim() > 1:
        first = torch.zeros(plan.new_size, dtype=torch.bool)
        seen: set[int] = set()
        for j, u in enumerate(plan.index.tolist()):
            first[j] = u not in seen
            seen.add(u)
        copies = (~first & ~plan.fresh).repeat_interleave(m.block)
        mask = torch.zeros(index.numel(), dtype=torch.bool)
        mask[m.offset : m.offset + copies.numel()] = copies
        noise = torch.randn_like(new) * (std * plan.noise)
        new = new + noise * along(new, dim, mask.to(new.dtype))
    return new


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """Every (module, attribute, is_parameter) holding each tensor, by tensor id."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = defaultdict(list)
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners[id(p)].append((module, attr, True))
        for attr, b in module._buffers.items():
            if b is not None:
                owners[id(b)].append((module, attr, False))
    return owners


def _resolve(model: nn.Module, module: str, attr: str) -> tuple[nn.Module, str]:
    owner = model.get_submodule(module) if module else model
    head, _, last = attr.rpartition(".")
    return (owner.get_submodule(head) if head else owner), last


def _check_whole_atoms(group: Group, plan: UnitPlan) -> None:
    """Refuse a plan that splits an attention head (``group.atom`` units move together)."""
    a = group.atom
    if a == 1:
        return
    whole = plan.new_size % a == 0
    if whole:
        index = plan.index.view(-1, a)
        whole = bool((index[:, 0] % a == 0).all()) and bool(
            (index - index[:, :1] == torch.arange(a)).all())
        whole = whole and all(bool((t.view(-1, a) == t.view(-1, a)[:, :1]).all())
                              for t in (plan.scale, plan.fresh))
    if not whole:
        raise SurgeryError(
            f"the units of {group.producers} form attention heads of {a} units, and this "
            "edit would split a head; keep, copy or remove whole heads"
        )


def apply_plan(model: nn.Module, group: Group, plan: UnitPlan) -> ParamMap:
    """Resize every member of ``group`` according to ``plan``; returns the parameter map.

    Tensors are replaced by new ones (never modified in place), so a caller holding the old
    module dictionaries can restore the model exactly.
    """
    _check_whole_atoms(group, plan)
    pending: dict[int, _Pending] = {}
    originals: dict[int, torch.Tensor] = {}
    seen: dict[tuple[int, int, int], Member] = {}
    touched: dict[str, list[Member]] = defaultdict(list)
    customs: list[TensorUpdate] = []
    custom_owner: list[tuple[nn.Module, TensorUpdate]] = []
    members = sorted(group.members, key=lambda m: -m.offset)
    for m in members:
        touched[m.module].append(m)
        if m.role == "custom":
            module = model.get_submodule(m.module)
            handler = get_handler(module)
            for up in handler.resize_custom(module, m.module, plan):  # type: ignore[union-attr]
                customs.append(up)
                custom_owner.append((module, up))
            continue
        if not m.tensor:
            continue
        owner, attr = _resolve(model, m.module, m.tensor)
        tensor = getattr(owner, attr)
        key = (id(tensor), m.dim, m.offset)
        if key in seen:
            first = seen[key]
            if first.block != m.block or (first.role != m.role and not plan.selects):
                raise SurgeryError(
                    f"'{m.path}' is the same tensor as '{first.path}' (tied weights), which "
                    f"{_ROLE[first.role]} these units where '{m.path}' {_ROLE[m.role]} them: "
                    "new units cannot be both; remove units (narrow) instead, or untie the "
                    "weights (give each module its own copy) before widening"
                )
            continue
        seen[key] = m
        originals[id(tensor)] = tensor
        entry = pending.setdefault(id(tensor), _Pending(tensor.detach()))
        _transform(entry, m, group.size, plan)
    for module, up in custom_owner:
        owner, attr = _resolve(module, "", up.attr)
        tensor = getattr(owner, attr)
        originals[id(tensor)] = tensor
        pending[id(tensor)] = _Pending(up.value, list(up.dims))
    param_map = _assign(model, pending, originals)
    _sync(model, touched, group.size, plan.new_size, pending)
    return param_map


def _assign(
    model: nn.Module, pending: dict[int, _Pending], originals: dict[int, torch.Tensor]
) -> ParamMap:
    owners = _owners(model)
    param_map = ParamMap()
    for tid, entry in pending.items():
        old = originals[tid]
        if isinstance(old, nn.Parameter):
            new: torch.Tensor = nn.Parameter(entry.value.contiguous(),
                                             requires_grad=old.requires_grad)
            param_map.changed.append(ParamChange(old, new, tuple(entry.dims)))
        else:
            new = entry.value.contiguous()
        for module, attr, is_param in owners[tid]:
            if is_param:
                module._parameters[attr] = new  # type: ignore[assignment]
            else:
                module._buffers[attr] = new
    return param_map


def _sync_plain(module: nn.Module, old: int, new: int) -> None:
    """A layer without a handler whose forward passes its own ``normalized_shape`` to
    ``F.layer_norm`` (transformers' channels-first LayerNorms): keep it in step."""
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple | list) and len(shape) == 1 and shape[0] == old:
        module.normalized_shape = type(shape)([new])
    elif isinstance(shape, int) and shape == old:
        module.normalized_shape = new


def _sync(
    model: nn.Module, touched: dict[str, list[Member]], old: int, new: int,
    pending: dict[int, _Pending],
) -> None:
    for name, members in touched.items():
        if not name:
            continue
        module = model.get_submodule(name)
        handler = get_handler(module)
        if handler is None:
            _sync_plain(module, old, new)
            continue
        sizes: dict[Member, int] = {}
        attr_only = [m for m in members if not m.tensor or m.role == "custom"]
        for m in members:
            if m.tensor and m.role != "custom":
                sizes[m] = getattr(module, m.tensor).shape[m.dim]
        if attr_only:
            current = getattr(handler, "current_size", None)
            base = current(module) if current else old
            total = base + sum((new - old) * m.block for m in attr_only)
            sizes.update({m: total for m in attr_only})
        handler.sync(module, sizes)
