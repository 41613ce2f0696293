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

from neuroexapt.errors import FunctionPreservationError
from neuroexapt.graph.cache import invalidate
from neuroexapt.graph.trace import frozen_mode
from neuroexapt.optim import restore, snapshot

logger = logging.getLogger(__name__)

__all__ = ["check_same_function", "model_outputs", "transaction"]

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


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a function-preserving edit for ``dtype``."""
    return 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2


def check_same_function(
    before: list[torch.Tensor], after: list[torch.Tensor], what: str
) -> float:
    """Max relative error between two output lists; raises beyond tolerance."""
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
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        err = float((a - b).abs().max()) / scale if b.numel() else 0.0
        if not err <= tolerance(b.dtype):  # also catches NaN
            raise FunctionPreservationError(
                f"{what} changed the model's outputs: max error {err:.3g} x output scale "
                f"{scale:.3g} exceeds the tolerance {tolerance(b.dtype):g} for {b.dtype}"
            )
        worst = max(worst, err)
    return worst
