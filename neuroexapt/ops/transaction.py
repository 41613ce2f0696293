"""Atomic edits: everything is restored exactly when an edit raises.

Edits never modify a tensor in place; they replace tensors, modules and attributes. Restoring
each module's attribute dictionaries (parameters, buffers, submodules, plain attributes) and
the optimizer's param lists and state therefore puts everything back bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import FunctionPreservationError, NeuroExaptError, SurgeryError, TraceError
from neuroexapt.graph.cache import invalidate
from neuroexapt.graph.trace import frozen_mode
from neuroexapt.optim import restore, snapshot

logger = logging.getLogger(__name__)

__all__ = [
    "check_outputs_shape",
    "check_same_function",
    "edited_outputs",
    "model_outputs",
    "reference_outputs",
    "transaction",
]

_DICTS = ("_parameters", "_buffers", "_modules")


@contextmanager
def transaction(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Restore ``model`` and ``optimizer`` exactly if the body raises (and drop its cached
    graphs: the body may have traced the half-edited model)."""
    saved = []
    for module in model.modules():
        inner = {k: dict(getattr(module, k)) for k in _DICTS}
        saved.append((module, dict(module.__dict__), inner))
    opt_snap = snapshot(optimizer) if optimizer is not None else None
    try:
        yield
    except BaseException:
        for module, attrs, inner in saved:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for key, content in inner.items():
                target = getattr(module, key)
                target.clear()
                target.update(content)
        invalidate(model)
        if optimizer is not None and opt_snap is not None:
            restore(optimizer, opt_snap)
        logger.debug("edit failed; model and optimizer restored")
        raise


def model_outputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    """The model's outputs in eval mode, flattened into a list of tensors."""
    with frozen_mode(model):
        out = model(*inputs)
    flat: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            flat.append(x.detach().clone())
        elif isinstance(x, tuple | list):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(out)
    return flat


def reference_outputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    """The model's outputs before an edit; a :class:`TraceError` when it does not run."""
    try:
        return model_outputs(model, inputs)
    except NeuroExaptError:
        raise
    except Exception as e:
        raise TraceError(
            f"running {type(model).__name__} on example_inputs failed before any change: "
            f"{type(e).__name__}: {e}. Pass example_inputs= the model accepts"
        ) from e


def edited_outputs(model: nn.Module, inputs: tuple[Any, ...], what: str) -> list[torch.Tensor]:
    """The model's outputs after an edit; a :class:`SurgeryError` when it no longer runs.

    Every edit runs the edited model once before it commits, so that a change the graph
    analysis got wrong (a layer it could not see reads the units) never leaves a model that
    cannot run: the caller's transaction restores it.
    """
    try:
        return model_outputs(model, inputs)
    except NeuroExaptError:
        raise
    except Exception as e:
        raise SurgeryError(
            f"{what} left a model that no longer runs on its example inputs "
            f"({type(e).__name__}: {e}); nothing was changed. Some operation the tracer "
            "could not follow reads these units: mark the layer frozen, or report the model"
        ) from e


def check_outputs_shape(
    before: list[torch.Tensor], after: list[torch.Tensor], what: str
) -> None:
    """Raise when an edit changed the number or the shapes of the model's outputs."""
    shapes = [tuple(t.shape) for t in before]
    new = [tuple(t.shape) for t in after]
    if shapes != new:
        raise SurgeryError(f"{what} changed the model's output shapes from {shapes} to {new}; "
                           "nothing was changed")


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a function-preserving edit for ``dtype``."""
    return 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2


def check_same_function(
    before: list[torch.Tensor], after: list[torch.Tensor], what: str
) -> float:
    """Max relative error between two output lists; raises beyond tolerance.

    The error of an output is ``max |after - before| / max |before|`` (absolute only for an
    output that is exactly zero), so the tolerance is relative at every output scale.
    """
    if len(before) != len(after):
        raise FunctionPreservationError(f"{what} changed the number of outputs")
    worst = 0.0
    for b, a in zip(before, after, strict=True):
        if b.shape != a.shape:
            raise FunctionPreservationError(
                f"{what} changed an output shape from {tuple(b.shape)} to {tuple(a.shape)}"
            )
        if not b.is_floating_point():
            if not torch.equal(a, b):
                raise FunctionPreservationError(f"{what} changed an integer output")
            continue
        if not b.numel():
            continue
        scale = float(b.abs().max()) or 1.0
        err = float((a.double() - b.double()).abs().max()) / scale
        if not err <= tolerance(b.dtype):  # also catches NaN
            raise FunctionPreservationError(
                f"{what} changed the model's outputs: max error {err:.3g} x output scale "
                f"{scale:.3g} exceeds the tolerance {tolerance(b.dtype):g} for {b.dtype}"
            )
        worst = max(worst, err)
    return worst
