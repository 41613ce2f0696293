"""One trace per decision: reuse a model's graph while nothing that shapes it changed.

Tracing (torch.fx, then a shape-propagating forward pass) costs far more than reading the
result, and a decision often traces the same model several times: a policy traces to choose,
then the edit traces again to apply. Inside :func:`graph_cache`, :func:`~neuroexapt.trace`
returns the graph it already built for the model when its key is unchanged:

* the structure: for every module of ``model.named_modules()``, its name, type, identity,
  train/eval flag, and the name, shape and dtype of its own parameters and buffers;
* the example inputs' nesting, shapes, dtypes and devices (and the values of non-tensors);
* the ``leaf_modules`` argument and the version of the handler and leaf registries.

Every recorded edit (:func:`neuroexapt.ops.history.append_history`), every failed edit's
restore and every :meth:`neuroexapt.policy.Snapshot.restore` drops the cached graphs
(:func:`invalidate`). What the key cannot see, a Python attribute that changes ``forward``
(``self.use_skip = False``), is the caller's to announce with :func:`invalidate`; outside
any scope nothing is cached, so such a change is always seen.

The graphs returned inside a scope are shared: treat a :class:`~neuroexapt.graph.ModelGraph`,
its groups and its fx graph as read-only.

Example:
    >>> with neuroexapt.graph_cache(model):
    ...     g = neuroexapt.trace(model, x)   # traces
    ...     g = neuroexapt.trace(model, x)   # the same graph, no trace
    ...     neuroexapt.narrow(model, "features.0", remove=2, example_inputs=x)  # one trace
    ...     g = neuroexapt.trace(model, x)   # traces again: the model changed
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError
from neuroexapt.graph.handlers import registry_version

logger = logging.getLogger(__name__)

__all__ = ["graph_cache", "invalidate"]

_MAX_ENTRIES = 8  # graphs kept per scope (distinct inputs or leaf_modules of one structure)
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
Key = tuple[Any, ...]  # (structure, inputs, leaf_modules, registry version)


@dataclass
class _Scope:
    """The open :func:`graph_cache` scopes of one model and the graphs they keep."""

    model: nn.Module
    depth: int = 0
    entries: dict[Key, Any] = field(default_factory=dict)  # key -> ModelGraph


_LOCK = threading.RLock()
_SCOPES: dict[int, _Scope] = {}  # id(model) -> its scope; entries live only while it is open


@contextmanager
def graph_cache(model: nn.Module) -> Iterator[None]:
    """Reuse ``model``'s traced graph until its structure, the inputs or an edit change it.

    Scopes nest; the cached graphs are dropped when the outermost scope of ``model`` exits.
    Traces of other models are not cached. A scope is process-wide (every thread's traces of
    ``model`` use it), so an edit in any thread invalidates it.

    Args:
        model: the model whose traces are cached.

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"graph_cache expects an nn.Module, got {type(model).__name__}")
    with _LOCK:
        scope = _SCOPES.setdefault(id(model), _Scope(model))
        scope.depth += 1
    try:
        yield
    finally:
        with _LOCK:
            scope.depth -= 1
            if scope.depth == 0:
                scope.entries.clear()
                del _SCOPES[id(model)]


def invalidate(model: nn.Module) -> None:
    """Drop the cached graphs of ``model`` and of every model that contains it.

    Edits and restores call it; call it yourself after changing what ``forward`` does
    without changing the modules (a Python flag) inside a :func:`graph_cache` scope.
    """
    with _LOCK:
        for scope in _SCOPES.values():
            if scope.entries and any(m is model for m in scope.model.modules()):
                scope.entries.clear()


def cache_key(
    model: nn.Module, inputs: tuple[Any, ...], leaf_modules: Sequence[type[nn.Module] | str]
) -> Key | None:
    """The key of a trace of ``model`` inside a scope; None outside (or when uncacheable)."""
    if id(model) not in _SCOPES:
        return None
    spec = _inputs_key(inputs)
    if spec is None:
        return None
    return (_structure(model), spec, tuple(leaf_modules), registry_version())


def lookup(model: nn.Module, key: Key) -> Any | None:
    """The graph cached for ``key``, or None."""
    with _LOCK:
        scope = _SCOPES.get(id(model))
        return scope.entries.get(key) if scope is not None and scope.model is model else None


def store(model: nn.Module, key: Key, graph: Any) -> None:
    """Keep ``graph`` for ``key`` while the scope is open; drop those of other structures."""
    with _LOCK:
        scope = _SCOPES.get(id(model))
        if scope is None or scope.model is not model:
            return
        for old in [k for k in scope.entries if k[0] != key[0]]:
            del scope.entries[old]
        while len(scope.entries) >= _MAX_ENTRIES:
            del scope.entries[next(iter(scope.entries))]
        scope.entries[key] = graph


def _structure(model: nn.Module) -> tuple[Any, ...]:
    """Name, type, identity, mode and direct tensor specs of every module."""
    return tuple(
        (name, type(m), id(m), m.training, _tensors(m._parameters), _tensors(m._buffers))
        for name, m in model.named_modules()
    )


def _tensors(tensors: dict[str, torch.Tensor | None]) -> tuple[Any, ...]:
    return tuple((k, None) if t is None else (k, tuple(t.shape), t.dtype)
                 for k, t in tensors.items())


def _inputs_key(value: Any) -> Hashable | None:
    """Nesting, shapes, dtypes and devices of tensors, values of scalars; None if unknown."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, _SCALARS):
        return ("value", type(value), value)
    if isinstance(value, tuple | list):
        items = [_inputs_key(v) for v in value]
        return None if any(i is None for i in items) else (type(value), tuple(items))
    if isinstance(value, dict):
        pairs = [(k, _inputs_key(v)) for k, v in value.items()]
        ok = all(isinstance(k, _SCALARS) and i is not None for k, i in pairs)
        return (dict, tuple(pairs)) if ok else None
    return None
