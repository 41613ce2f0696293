"""Where a tensor's feature dimension comes from.

Every traced tensor that carries resizable units has a :class:`Layout`: the dimension that holds
the units, and the sequence of :class:`Segment` that make it up. A Conv output has one segment
on dim 1; ``torch.cat([a, b], 1)`` has the segments of ``a`` then those of ``b``; a flatten of
``[B, C, H, W]`` multiplies each segment's ``block`` by ``H*W``. Segments with no group
(``gid is None``) are fixed-size features, such as a model input concatenated to a feature map.

Attention splits the units into heads: ``q.view(b, s, -1, 64)`` turns a group of ``H*64``
units on the last dim into ``H`` entries on ``dim`` (``atom=64`` units each, a head) and the
position inside the head on ``inner``. The units then change only by whole heads.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Layout", "Segment"]


@dataclass(frozen=True)
class Segment:
    """A run of ``units * block`` consecutive features of one group (or of none)."""

    gid: int | None
    units: int
    block: int = 1

    @property
    def features(self) -> int:
        """Number of entries along the feature dimension."""
        return self.units * self.block


@dataclass(frozen=True)
class Layout:
    """The feature dimension ``dim`` of a tensor with ``ndim`` dims, made of ``segments``.

    With ``atom > 1`` (attention heads) the layout has one segment of block 1, each entry
    along ``dim`` holds ``atom`` consecutive units, and ``inner`` is the dim indexing a unit
    inside its head (None once a contraction summed over it, as in ``q @ k.T``).
    """

    dim: int
    ndim: int
    segments: tuple[Segment, ...]
    atom: int = 1
    inner: int | None = None

    @property
    def heads(self) -> bool:
        """True when the units are split into heads (``atom > 1``)."""
        return self.atom > 1

    @property
    def gids(self) -> list[int]:
        """Ids of the groups present in the layout."""
        return [s.gid for s in self.segments if s.gid is not None]

    def offsets(self) -> list[int]:
        """Feature offset of each segment."""
        out, pos = [], 0
        for seg in self.segments:
            out.append(pos)
            pos += seg.features
        return out

    def with_dim(self, dim: int, ndim: int) -> Layout:
        """The same segments on another dimension (``inner`` keeps its distance to ``dim``)."""
        inner = None if self.inner is None else self.inner + dim - self.dim
        return Layout(dim, ndim, self.segments, self.atom, inner)

    def moved(self, order: list[int]) -> Layout:
        """The layout after a permutation: new dim ``i`` is old dim ``order[i]``."""
        inner = None if self.inner is None else order.index(self.inner)
        return Layout(order.index(self.dim), self.ndim, self.segments, self.atom, inner)

    def with_segments(self, segments: tuple[Segment, ...]) -> Layout:
        """The same dims with other segments."""
        return Layout(self.dim, self.ndim, segments, self.atom, self.inner)

    def scaled(self, factor: int) -> Layout:
        """Every unit now spans ``factor`` times more features (flatten, depthwise multiplier)."""
        segs = tuple(Segment(s.gid, s.units, s.block * factor) for s in self.segments)
        return self.with_segments(segs)

    @property
    def single(self) -> Segment | None:
        """The only segment when there is exactly one with a group and no fixed features."""
        if len(self.segments) == 1 and self.segments[0].gid is not None:
            return self.segments[0]
        return None
