"""Groups of coupled dimensions.

A *group* is a set of tensor dimensions that must change size together: when a layer gains or
loses an output unit, every tensor that reads or normalises that unit gains or loses the same
entry. Each tensor dimension in the group is a :class:`Member` with a *role*:

* ``"out"``: the tensor that computes the units (a Conv/Linear weight's rows, its bias).
  A Net2Net split copies these entries.
* ``"in"``: a tensor that reads the units (the next layer's weight columns). A split divides
  these entries among the copies of a unit.
* ``"pass"``: a per-unit tensor of a layer the units pass through (BatchNorm statistics, a
  depthwise kernel, an added bias). A split copies these entries.

Example:
    In ``Conv(3, 8) -> BN(8) -> ReLU -> Conv(8, 16)`` the group of ``conv1`` has 8 units and the
    members ``conv1.weight[dim 0, out]``, ``conv1.bias[dim 0, out]``, ``bn.weight``,
    ``bn.bias``, ``bn.running_mean``, ``bn.running_var`` (``pass``) and ``conv2.weight[dim 1, in]``.
    After a flatten of 8x4x4 features into a Linear layer, the Linear member has ``block=16``:
    unit ``c`` owns the 16 consecutive input features ``16*c ... 16*c+15``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Group", "GroupBuilder", "Member", "Role"]

Role = Literal["out", "in", "pass", "custom"]


@dataclass(frozen=True)
class Member:
    """One tensor dimension that belongs to a group.

    Attributes:
        module: fully-qualified name of the module owning the tensor ("" for the root model).
        tensor: attribute name of the tensor on that module (``"weight"``, ``"running_var"``).
        dim: the dimension of the tensor indexed by the group's units.
        role: ``"out"``, ``"in"``, ``"pass"`` or ``"custom"`` (a module handler resizes it).
        offset: index of the first entry of this group along ``dim`` (after a concatenation).
        block: consecutive entries per unit along ``dim`` (after a flatten: H*W).
    """

    module: str
    tensor: str
    dim: int
    role: Role
    offset: int = 0
    block: int = 1

    @property
    def path(self) -> str:
        """``module.tensor`` as in ``state_dict`` keys."""
        return f"{self.module}.{self.tensor}" if self.module else self.tensor


@dataclass
class Group:
    """A set of coupled dimensions with ``size`` units.

    Attributes:
        id: index of the group in its graph.
        size: number of units.
        members: every tensor dimension that changes with the units.
        producers: names of the modules whose outputs are the units.
        segments: the units form this many equal segments that must keep equal sizes (GroupNorm
            groups, grouped convolutions); 1 when unconstrained.
        atom: the units change only in whole runs of this many consecutive units, aligned
            (attention heads: ``view(b, s, -1, head_dim)``); 1 when unconstrained.
        normalizers: modules that compute statistics over the units of each segment
            (LayerNorm, GroupNorm); widening such a group preserves the function only when every
            unit is duplicated equally.
        extrema: reductions that take the maximum or minimum over the units (``amax``,
            ``max(dim=...)``): copies of units keep them, fresh units may not.
        sums: reductions that add the units together (``sum``, ``logsumexp``, ``norm``): any
            new unit changes them, so only removing units is exact.
        frozen: reasons why the group cannot be resized (model output, unsupported operation).
        frozen_modules: modules without a handler that the units reach (for error messages).
    """

    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    segments: int = 1
    atom: int = 1
    normalizers: list[str] = field(default_factory=list)
    extrema: list[str] = field(default_factory=list)
    sums: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    frozen_modules: list[str] = field(default_factory=list)
    output: bool = False  # the units are (or are tied to) the model's output

    @property
    def mixed(self) -> bool:
        """True when some operation combines the units with one another (a normalisation or
        a reduction over them), so that a new unit can change the others' effect."""
        return bool(self.normalizers or self.extrema or self.sums)

    @property
    def resizable(self) -> bool:
        """True when no reason forbids resizing the group."""
        return not self.frozen

    def members_of(self, module: str) -> list[Member]:
        """Members owned by ``module``."""
        return [m for m in self.members if m.module == module]

    def __repr__(self) -> str:
        state = "resizable" if self.resizable else f"frozen: {'; '.join(self.frozen)}"
        return (
            f"Group(id={self.id}, size={self.size}, producers={self.producers}, "
            f"members={len(self.members)}, {state})"
        )


def _shifted(member: Member, unit_offset: int) -> Member:
    """``member`` moved ``unit_offset`` units further along its dimension."""
    return Member(member.module, member.tensor, member.dim, member.role,
                  member.offset + unit_offset * member.block, member.block)


class GroupBuilder:
    """Union-find over groups while a graph is being traced."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._groups: list[Group] = []
        # group id -> the (group id or None, units) pieces it was split into
        self.refined: dict[int, list[tuple[int | None, int]]] = {}

    def new(self, size: int, producer: str | None = None) -> int:
        """Create a group of ``size`` units and return its id."""
        gid = len(self._groups)
        self._parent.append(gid)
        self._groups.append(Group(id=gid, size=size, producers=[producer] if producer else []))
        return gid

    def find(self, gid: int) -> int:
        """Root id of ``gid``."""
        while self._parent[gid] != gid:
            self._parent[gid] = self._parent[self._parent[gid]]
            gid = self._parent[gid]
        return gid

    def get(self, gid: int) -> Group:
        """The (root) group of ``gid``."""
        return self._groups[self.find(gid)]

    def union(self, a: int, b: int, where: str) -> int:
        """Merge two groups that must change together; mismatched sizes freeze both."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra in self.refined or rb in self.refined:
            reason = f"a group split by a concatenation meets another group at {where}"
            for root in (ra, rb):
                for piece, _ in self._pieces(root) if root in self.refined else [(root, 0)]:
                    self.freeze(piece, reason)
            return ra
        ga, gb = self._groups[ra], self._groups[rb]
        if ga.size != gb.size:
            reason = f"groups of sizes {ga.size} and {gb.size} meet at {where}"
            ga.frozen.append(reason)
            gb.frozen.append(reason)
        self._parent[rb] = ra
        ga.members.extend(gb.members)
        ga.producers.extend(p for p in gb.producers if p not in ga.producers)
        ga.segments = math.lcm(ga.segments, gb.segments)
        ga.atom = math.lcm(ga.atom, gb.atom)
        ga.normalizers.extend(gb.normalizers)
        ga.extrema.extend(gb.extrema)
        ga.sums.extend(gb.sums)
        ga.frozen.extend(gb.frozen)
        ga.frozen_modules.extend(gb.frozen_modules)
        ga.output = ga.output or gb.output
        return ra

    def add_member(self, gid: int, member: Member) -> None:
        """Record that ``member`` changes with group ``gid`` (or with its pieces if split)."""
        root = self.find(gid)
        if root in self.refined:
            for piece, unit_offset in self._pieces(root):
                self.add_member(piece, _shifted(member, unit_offset))
            return
        group = self._groups[root]
        if member not in group.members:
            group.members.append(member)

    def _pieces(self, root: int) -> list[tuple[int, int]]:
        """(piece id, unit offset) of the pieces of a split group that have a group."""
        out, offset = [], 0
        for piece, units in self.refined[root]:
            if piece is not None:
                out.append((piece, offset))
            offset += units
        return out

    def refine(self, gid: int, pieces: list[tuple[int | None, int]], where: str) -> None:
        """Split group ``gid`` into consecutive ``pieces``, each tied to a group or fixed.

        Used where a single group meets a concatenation element-wise: its first units follow
        the concatenation's first part, and so on. Fixed pieces (None) are never resized.
        """
        root = self.find(gid)
        group = self._groups[root]
        self.refined[root] = list(pieces)
        for piece, offset in self._pieces(root):
            for member in group.members:
                self.add_member(piece, _shifted(member, offset))
            for reason in group.frozen:
                self.freeze(piece, reason)
            target = self.get(piece)
            target.producers.extend(p for p in group.producers if p not in target.producers)
            if group.atom > 1:
                self.freeze(piece, "attention heads span a concatenation")
            target.normalizers.extend(group.normalizers)
            target.extrema.extend(group.extrema)
            target.sums.extend(group.sums)
        group.members = []
        group.frozen.append(f"split into the parts of a concatenation at {where}")

    def freeze(self, gid: int, reason: str, module: str | None = None) -> None:
        """Forbid resizing group ``gid`` (or every piece of it, if it was split) for ``reason``."""
        root = self.find(gid)
        if root in self.refined and "split into the parts" not in reason:
            for piece, _ in self._pieces(root):
                self.freeze(piece, reason, module)
        group = self._groups[root]
        if reason not in group.frozen:
            group.frozen.append(reason)
        if module is not None and module not in group.frozen_modules:
            group.frozen_modules.append(module)

    def mark_output(self, gid: int) -> None:
        """The units of ``gid`` are the model's output: never resized."""
        self.freeze(gid, "it is the model's output")
        root = self.find(gid)
        targets = [p for p, _ in self._pieces(root)] if root in self.refined else [root]
        for target in targets:
            self.get(target).output = True

    def constrain(self, gid: int, segments: int, normalizer: str | None = None) -> None:
        """Require the units of ``gid`` to stay in ``segments`` equal segments."""
        root = self.find(gid)
        if root in self.refined:
            for piece, _ in self._pieces(root):
                self.freeze(piece, "a normalisation or grouped layer spans a concatenation")
            return
        group = self._groups[root]
        group.segments = math.lcm(group.segments, segments)
        if normalizer is not None:
            group.normalizers.append(normalizer)

    def atomize(self, gid: int, atom: int, where: str) -> None:
        """Require the units of ``gid`` to change only in whole aligned runs of ``atom``."""
        root = self.find(gid)
        if root in self.refined:
            for piece, _ in self._pieces(root):
                self.freeze(piece, f"attention heads at {where} span a concatenation")
            return
        group = self._groups[root]
        group.atom = math.lcm(group.atom, atom)

    def reduce(self, gid: int, kind: str, where: str) -> None:
        """Record a reduction over the units of ``gid``: ``kind`` is ``"mean"``, ``"extremum"``
        or ``"sum"`` (see :class:`Group`)."""
        root = self.find(gid)
        targets = [p for p, _ in self._pieces(root)] if root in self.refined else [root]
        for target in targets:
            group = self.get(target)
            {"mean": group.normalizers, "extremum": group.extrema, "sum": group.sums}[kind] \
                .append(where)

    def finish(self) -> tuple[list[Group], dict[int, int]]:
        """Renumbered root groups and the map from every id to its root's new id."""
        roots = sorted({self.find(g) for g in range(len(self._groups))})
        new_id = {root: i for i, root in enumerate(roots)}
        groups = []
        for root in roots:
            group = self._groups[root]
            group.id = new_id[root]
            if group.size % group.segments:
                group.frozen.append(
                    f"{group.size} units cannot form {group.segments} equal segments"
                )
            elif (group.size // group.segments) % group.atom:
                group.frozen.append(
                    f"{group.size} units cannot form whole heads of {group.atom} units"
                    + (f" in {group.segments} equal segments" if group.segments > 1 else "")
                )
            groups.append(group)
        mapping = {g: new_id[self.find(g)] for g in range(len(self._groups))}
        return groups, mapping
