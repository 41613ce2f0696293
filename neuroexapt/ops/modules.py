"""Modules that edits insert into a model.

They are ordinary, traceable ``nn.Module`` containers: torch.fx traces through them,
``torch.save(model)`` pickles them, and ``state_dict`` lists their parameters. Each marks in
``_neuroexapt_inner`` the child that holds the original layer, so that layer names given by a
user (``"features.0"``) keep meaning the original layer after it is wrapped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Chain", "SkipProjection", "SkipSource", "SkipTarget"]


class _Delegating(nn.Module):
    """Attributes the wrapper lacks are read from the original layer, so model code that reads
    ``self.proj.weight.dtype`` or ``self.fc.in_features`` keeps working after an edit."""

    _neuroexapt_inner = ""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            inner = modules.get(type(self)._neuroexapt_inner)
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)


class Chain(_Delegating, nn.Sequential):
    """The original layer (child ``0``) followed by layers that ``deepen`` inserted."""

    _neuroexapt_inner = "0"


class SkipSource(_Delegating):
    """Runs ``inner`` and keeps its output for the :class:`SkipTarget` modules fed by it."""

    _neuroexapt_inner = "inner"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "output", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        object.__setattr__(self, "output", out)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # The last output is transient (an fx Proxy after tracing, a non-leaf tensor after a
        # training step): neither can be pickled or deep-copied, and neither is state.
        state = super().__getstate__()
        state["output"] = None
        return state


class SkipProjection(nn.Module):
    """Maps a source tensor onto a target's shape: pooling, then a zero-initialised linear map.

    The source's feature dimension ``src_dim`` is moved to dim 1, the other dimensions are
    average-pooled (or averaged away, or broadcast) to ``target_size``, and a linear map over
    the features (a 1x1 convolution) gives ``out_features`` on the target's feature dimension
    ``dst_dim``. ``src_spatial`` is the number of source dimensions besides batch and
    features. Its weight starts at zero, so adding it changes nothing until it learns.
    """

    def __init__(
        self, in_features: int, out_features: int, src_dim: int, dst_dim: int,
        target_size: tuple[int, ...], src_spatial: int, *, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.src_dim, self.dst_dim = src_dim, dst_dim
        self.target_size = tuple(target_size)
        self.src_spatial = src_spatial
        self.linear = nn.Linear(in_features, out_features, bias=False, device=device,
                                dtype=dtype)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(self.src_dim, 1)
        spatial = self.src_spatial  # a constant, so that torch.fx can trace this
        if not self.target_size and spatial:
            x = x.mean(dim=tuple(range(2, 2 + spatial)))
        elif spatial == len(self.target_size) and spatial in (1, 2, 3):
            pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
            x = pool[spatial - 1](x, self.target_size)
        x = self.linear(x.movedim(1, -1))
        return x.movedim(-1, self.dst_dim)


class SkipTarget(_Delegating):
    """Adds the projected outputs of its sources to its first input, then runs ``inner``."""

    _neuroexapt_inner = "inner"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.projections = nn.ModuleList()
        object.__setattr__(self, "sources", [])

    def add_source(self, source: SkipSource, projection: SkipProjection) -> None:
        """Feed ``source``'s output through ``projection`` into this layer's input."""
        self.sources.append(source)
        self.projections.append(projection)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        for source, projection in zip(self.sources, self.projections, strict=True):
            x = x + projection(source.output)
        return self.inner(x, *args, **kwargs)
