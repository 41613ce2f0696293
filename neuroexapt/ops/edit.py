"""The common path of every edit: trace, check, apply atomically, verify, migrate, record."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError, SurgeryError, UnsupportedModuleError
from neuroexapt.graph.groups import Group
from neuroexapt.ops.history import EditRecord, append_history, spec_of
from neuroexapt.ops.transaction import (
    check_outputs_shape,
    check_same_function,
    edited_outputs,
    reference_outputs,
    transaction,
)
from neuroexapt.optim import migrate
from neuroexapt.optim.parammap import ParamMap

logger = logging.getLogger(__name__)

__all__ = ["count_parameters", "require_resizable", "run_edit"]

Body = Callable[[], tuple[ParamMap, dict[str, Any]]]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def require_resizable(group: Group, layer: str) -> None:
    """Raise a clear error when ``group`` may not change size."""
    if group.resizable:
        return
    reasons = "; ".join(dict.fromkeys(group.frozen))
    if group.frozen_modules and any("no handler" in r for r in group.frozen):
        raise UnsupportedModuleError(
            f"cannot resize the units of '{layer}': {reasons}. Register a handler for that "
            "layer type with neuroexapt.register_handler(...)"
        )
    if group.output:
        raise SurgeryError(
            f"cannot resize the units of '{layer}': they are (or are tied to) the model's "
            f"output, whose size is fixed by the task ({reasons}); edit an inner layer instead"
        )
    raise SurgeryError(f"cannot resize the units of '{layer}': {reasons}")


def run_edit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    inputs: tuple[torch.Tensor, ...],
    op: str,
    target: str,
    verify: bool,
    body: Body,
) -> EditRecord:
    """Run ``body`` atomically and record it; see the module docstring.

    The edited model always runs once on ``inputs`` before the edit commits: a model that no
    longer runs, or whose output shapes changed, is a :class:`SurgeryError` with everything
    restored; with ``verify`` its outputs must also equal the original ones.
    """
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer= must be a torch.optim.Optimizer, got {optimizer!r}")
    before = count_parameters(model)
    with transaction(model, optimizer):
        reference = reference_outputs(model, inputs)
        param_map, args = body()
        outputs = edited_outputs(model, inputs, f"{op} '{target}'")
        if verify:
            check_same_function(reference, outputs, f"{op} '{target}'")
        else:
            check_outputs_shape(reference, outputs, f"{op} '{target}'")
        if optimizer is not None:
            migrate(optimizer, param_map)
        record = EditRecord(op, target, args, spec_of(inputs), before,
                            count_parameters(model), param_map)
        append_history(model, record)
    logger.info("%s '%s': parameters %d -> %d", op, target, before, record.params_after)
    return record
