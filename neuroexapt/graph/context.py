"""State shared by the layout rules while a model's graph is being walked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from neuroexapt.graph.groups import GroupBuilder, Member, Role
from neuroexapt.graph.layout import Layout, Segment

__all__ = ["BuildContext", "NodeLayout"]

NodeLayout = Layout | tuple[Any, ...] | None


class BuildContext:
    """Layouts of the nodes walked so far and the groups they define."""

    def __init__(self) -> None:
        self.groups = GroupBuilder()
        self.layouts: dict[fx.Node, NodeLayout] = {}

    # -- reading nodes -------------------------------------------------------------------------
    def layout_of(self, arg: Any) -> Layout | None:
        """The layout of ``arg`` when it is a traced tensor with units, else ``None``."""
        if isinstance(arg, fx.Node):
            value = self.layouts.get(arg)
            return value if isinstance(value, Layout) else None
        return None

    @staticmethod
    def meta_of(node: Any) -> Any:
        """The shape-propagation metadata of ``node`` (None for constants)."""
        return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None

    @classmethod
    def shape_of(cls, node: Any) -> tuple[int, ...] | None:
        """The shape of the tensor ``node`` produced, or None if it is not a tensor."""
        meta = cls.meta_of(node)
        shape = getattr(meta, "shape", None)
        return tuple(shape) if isinstance(shape, torch.Size) else None

    def layouts_in(self, value: Any) -> list[Layout]:
        """Every layout found in a (possibly nested) argument structure."""
        found: list[Layout] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node):
                lay = self.layouts.get(a)
                stack = [lay]
                while stack:
                    item = stack.pop()
                    if isinstance(item, Layout):
                        found.append(item)
                    elif isinstance(item, tuple):
                        stack.extend(item)
            return None

        fx.node.map_aggregate(value, visit)
        return found

    # -- recording groups ----------------------------------------------------------------------
    def freeze(self, layouts: Sequence[Layout], reason: str, module: str | None = None) -> None:
        """Forbid resizing every group found in ``layouts``."""
        for lay in layouts:
            for gid in lay.gids:
                self.groups.freeze(gid, reason, module)

    def consume(self, layout: Layout, module: str, tensor: str, dim: int, role: Role) -> None:
        """Record that ``module.tensor`` reads every segment of ``layout`` along ``dim``."""
        for seg, off in zip(layout.segments, layout.offsets(), strict=True):
            if seg.gid is not None:
                member = Member(module, tensor, dim, role, off, seg.block)
                self.groups.add_member(seg.gid, member)

    def produce(
        self,
        module: str,
        size: int,
        dim: int,
        ndim: int,
        members: Sequence[tuple[str, int, Role]],
    ) -> Layout:
        """Create a new group of ``size`` units output by ``module`` on ``dim``."""
        gid = self.groups.new(size, module)
        for tensor, tdim, role in members:
            self.groups.add_member(gid, Member(module, tensor, tdim, role))
        return Layout(dim, ndim, (Segment(gid, size),))

    def _refine(self, single: Layout, multi: Layout, where: str) -> bool:
        """Split ``single``'s group along ``multi``'s segments when they can align."""
        seg = single.single
        if seg is None or len(multi.segments) < 2 or single.ndim - single.dim != \
                multi.ndim - multi.dim:
            return False
        if any(s.block != seg.block for s in multi.segments) or \
                sum(s.units for s in multi.segments) != seg.units:
            return False
        assert seg.gid is not None
        self.groups.refine(seg.gid, [(s.gid, s.units) for s in multi.segments], where)
        return True

    def _merge_heads(self, layouts: Sequence[Layout], where: str) -> Layout | None:
        """Unify layouts split into heads: same head size, same dims counted from the end."""
        first = layouts[0]

        def key(lay: Layout) -> tuple[int, int, int | None, bool]:
            inner = None if lay.inner is None else lay.ndim - lay.inner
            return lay.atom, lay.ndim - lay.dim, inner, lay.single is not None

        if any(key(lay) != key(first) for lay in layouts) or first.single is None:
            return None
        for other in layouts[1:]:
            a, b = first.single, other.single
            assert a is not None and b is not None and a.gid is not None and b.gid is not None
            if a.units != b.units:
                return None
            self.groups.union(a.gid, b.gid, where)
        return max(layouts, key=lambda lay: lay.ndim)

    def merge(self, layouts: Sequence[Layout], where: str) -> Layout | None:
        """Unify layouts that meet element-wise (a residual add); None if they cannot align.

        A single group that meets a concatenation is split into parts that follow it. Layouts
        split into heads meet only layouts split the same way.
        """
        if any(lay.heads for lay in layouts):
            return self._merge_heads(layouts, where)
        if len(layouts) == 2:
            a, b = layouts
            if self._refine(a, b, where):
                return b if b.ndim >= a.ndim else b.with_dim(b.dim + a.ndim - b.ndim, a.ndim)
            if self._refine(b, a, where):
                return a if a.ndim >= b.ndim else a.with_dim(a.dim + b.ndim - a.ndim, b.ndim)
        first = layouts[0]
        for other in layouts[1:]:
            if first.ndim - first.dim != other.ndim - other.dim:
                return None
            if [s.features for s in first.segments] != [s.features for s in other.segments]:
                return None
            for a, b in zip(first.segments, other.segments, strict=True):
                if a.block != b.block or (a.gid is None) != (b.gid is None):
                    return None
        for other in layouts[1:]:
            for a, b in zip(first.segments, other.segments, strict=True):
                if a.gid is not None and b.gid is not None:
                    self.groups.union(a.gid, b.gid, where)
        return max(layouts, key=lambda lay: lay.ndim)
