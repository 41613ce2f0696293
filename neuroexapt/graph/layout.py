"""Where a tensor's feature dimension comes from.

Every traced tensor that carries resizable units has a :class:`Layout`: the dimension that holds
the units, and the sequence of :class:`Segment` that make it up. A Conv output has one segment
on dim 1; ``torch.cat([a, b], 1)`` has the segments of ``a`` then those of ``b``; a flatten of
``[B, C, H, W]`` multiplies each segment's ``block`` by ``H*W``. Segments with no group
(``gid is None``) are fixed-size features, such as a model input concatenated to a feature map.
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
    """The feature dimension ``dim`` of a tensor with ``ndim`` dims, made of ``segments``."""

    dim: int
    ndim: int
    segments: tuple[Segment, ...]

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
        """The same segments on another dimension."""
        return Layout(dim, ndim, self.segments)

    def scaled(self, factor: int) -> Layout:
        """Every unit now spans ``factor`` times more features (flatten, depthwise multiplier)."""
        segs = tuple(Segment(s.gid, s.units, s.block * factor) for s in self.segments)
        return Layout(self.dim, self.ndim, segs)

    @property
    def single(self) -> Segment | None:
        """The only segment when there is exactly one with a group and no fixed features."""
        if len(self.segments) == 1 and self.segments[0].gid is not None:
            return self.segments[0]
        return None
