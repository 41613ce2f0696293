"""Accumulators as plain data: what a checkpoint can hold and ``torch.load(weights_only=True)``
reads back without running stored code.

:func:`to_plain` turns a statistic (a :class:`~neuroexapt.metrics.stats.RunningMoments`, a
:class:`~neuroexapt.metrics.stats.Reservoir`, a :class:`~neuroexapt.metrics.collector.LayerStats`,
a :class:`~neuroexapt.metrics.recorder.BypassGradient`, or containers of them) into nested
dicts, lists, numbers, strings and tensors; :func:`from_plain` builds it again. Only the
classes named here are rebuilt (by name, from this fixed list), so a checkpoint cannot make
the loader instantiate anything else.
"""

from __future__ import annotations

from typing import Any

import torch

from neuroexapt.errors import CheckpointError

__all__ = ["from_plain", "to_plain"]


def _classes() -> dict[str, type]:
    from neuroexapt.metrics.collector import LayerStats
    from neuroexapt.metrics.recorder import BypassGradient
    from neuroexapt.metrics.stats import NonFiniteCount, Reservoir, RunningMoments

    return {c.__name__: c for c in (LayerStats, BypassGradient, NonFiniteCount, Reservoir,
                                    RunningMoments)}


def to_plain(value: Any) -> Any:
    """``value`` as plain data (see the module docstring).

    Raises:
        CheckpointError: a value of a type that cannot be stored.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, torch.Generator):
        return {"~": "generator", "state": value.get_state()}
    if isinstance(value, torch.dtype):
        return {"~": "dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"~": "device", "name": str(value)}
    if isinstance(value, list | tuple):
        return {"~": type(value).__name__, "items": [to_plain(v) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CheckpointError(f"cannot store a dict with keys {list(value)[:3]!r}")
        return {"~": "dict", "items": {k: to_plain(v) for k, v in value.items()}}
    name = type(value).__name__
    if _classes().get(name) is type(value):
        return {"~": "object", "class": name,
                "state": {k: to_plain(v) for k, v in vars(value).items()}}
    raise CheckpointError(f"cannot store a {name} in a checkpoint")


def from_plain(data: Any, device: torch.device | None = None) -> Any:
    """The value :func:`to_plain` stored, its tensors on ``device`` (default: as loaded).

    Raises:
        CheckpointError: data that :func:`to_plain` did not write.
    """
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, torch.Tensor):
        return data.to(device) if device is not None else data
    if not isinstance(data, dict) or "~" not in data:
        raise CheckpointError(f"not stored statistics: {type(data).__name__}")
    kind = data["~"]
    if kind == "generator":
        gen = torch.Generator()
        gen.set_state(data["state"])
        return gen
    if kind == "dtype":
        dtype = getattr(torch, str(data["name"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unknown dtype {data['name']!r} in stored statistics")
        return dtype
    if kind == "device":
        return torch.device(data["name"])
    if kind in ("list", "tuple"):
        items = [from_plain(v, device) for v in data["items"]]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: from_plain(v, device) for k, v in data["items"].items()}
    if kind == "object":
        cls = _classes().get(data["class"])
        if cls is None:
            raise CheckpointError(f"unknown class {data['class']!r} in stored statistics")
        obj = cls.__new__(cls)
        obj.__dict__.update({k: from_plain(v, device) for k, v in data["state"].items()})
        return obj
    raise CheckpointError(f"unknown kind {kind!r} in stored statistics")
