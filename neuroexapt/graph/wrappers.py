"""Models inside wrappers: ``torch.compile``, ``nn.DataParallel``, ``DistributedDataParallel``.

Edits, tracing and pruning work on the module the wrapper holds, under its own layer names:
``widen(torch.compile(model), "features.0", ...)`` edits ``model`` itself, and the names
``"_orig_mod.features.0"`` and ``"module.features.0"`` that the wrappers'
``named_modules()`` show are accepted too.

* ``torch.compile``: the compiled module guards on its parameters, so its next call after an
  edit recompiles by itself; after many edits, compile the model again
  (``torch.compile(model)``) to stay under dynamo's recompile limit. The policies that watch
  a model through hooks (DNM's recorder, the Trainer's gates) refuse ``fullgraph=True``
  (:func:`refuse_fullgraph`), which cannot trace them.
* ``nn.DataParallel`` copies the module to its devices at every forward: edits just work.
* ``DistributedDataParallel`` keeps gradient buckets of the parameters it was built with; an
  edit under it would leave new parameters unsynchronised, so it is refused with the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn

from neuroexapt.errors import ConfigError

__all__ = ["accepts_wrapped", "refuse_fullgraph", "unwrap", "wrapper_prefixes"]

F = TypeVar("F", bound=Callable[..., Any])


def _compiled_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return OptimizedModule


def _chain(model: Any) -> Iterator[Any]:
    """``model``, then each module inside its wrappers, outermost first."""
    compiled = _compiled_type()
    while True:
        yield model
        if compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return


def unwrap(model: Any) -> Any:
    """The module inside ``torch.compile`` and ``nn.DataParallel`` wrappers (nested too).

    Raises:
        ConfigError: ``model`` is a ``DistributedDataParallel`` (edit ``model.module`` on every
            rank, then wrap it again).
    """
    for inner in _chain(model):
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            raise ConfigError(
                "the model is wrapped in DistributedDataParallel, whose gradient buckets hold "
                "the parameters it was built with: edit model.module (the same edit on every "
                "rank), then wrap it again (model = DistributedDataParallel(model.module, ...))"
            )
    return inner


def refuse_fullgraph(model: Any, who: str) -> None:
    """Raise if ``model`` (or a module inside its wrappers) is ``torch.compile``d with
    ``fullgraph=True``: ``who`` measures or gates the model through Python hooks, which such a
    compile cannot trace (the first training step would stop with dynamo's ``Unsupported``).

    Raises:
        ConfigError: naming the fix.
    """
    compiled = _compiled_type()
    if compiled is not None and any(isinstance(m, compiled) and getattr(
            getattr(m, "dynamo_ctx", None), "fullgraph", False) for m in _chain(model)):
        raise ConfigError(
            f"{who} measures the model through Python hooks, which "
            "torch.compile(..., fullgraph=True) cannot trace (the first training step "
            "would stop in dynamo): compile with fullgraph=False (the hooks then run "
            "between compiled graphs), or train the model uncompiled and compile the "
            "final one")


def wrapper_prefixes(name: str) -> list[str]:
    """``name`` with the wrappers' leading ``_orig_mod.``/``module.`` removed one by one."""
    out = []
    while True:
        for prefix in ("_orig_mod.", "module."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                out.append(name)
                break
        else:
            return out


def accepts_wrapped(fn: F) -> F:
    """Decorate a function whose first argument is a model so that it sees :func:`unwrap`'s
    result."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(unwrap(model), *args, **kwargs)

    return wrapper  # type: ignore[return-value]
