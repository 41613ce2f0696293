"""Checkpoints of edited models: replay the edit history on a fresh model, then load weights.

A checkpoint holds only plain data and tensors: the history as dictionaries, the state dict,
and optimizer state keyed by parameter name. It is read with ``torch.load(weights_only=True)``,
so opening a checkpoint from elsewhere never runs code from it. Writing goes to a temporary
file in the same folder that replaces the target only once complete.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from neuroexapt.errors import CheckpointError, NeuroExaptError
from neuroexapt.ops.history import EditRecord, get_history, make_inputs

logger = logging.getLogger(__name__)

__all__ = ["Checkpoint", "load", "replay", "save"]

_FORMAT = "neuroexapt-checkpoint"
_VERSION = 1


class Checkpoint(NamedTuple):
    """What :func:`load` returns: the rebuilt model and its optimizer (or None)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None


def _optimizer_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = {id(p): n for n, p in model.named_parameters()}
    state = optimizer.state_dict()
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(flat) if id(p) not in names]
    if missing:
        raise CheckpointError(
            f"the optimizer holds {len(missing)} parameters that are not in the model; save "
            "the optimizer that trains this model"
        )
    index_to_name = {i: names[id(p)] for i, p in enumerate(flat)}
    groups = [{**g, "params": [index_to_name[i] for i in g["params"]]}
              for g in state["param_groups"]]
    return {"param_groups": groups,
            "state": {index_to_name[i]: s for i, s in state["state"].items()}}


def save(model: nn.Module, path: str | os.PathLike[str],
         optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write ``model`` (history and weights) and optionally its optimizer to ``path`` atomically."""
    payload: dict[str, Any] = {
        "format": _FORMAT, "version": _VERSION,
        "history": [r.to_dict() for r in get_history(model)],
        "state_dict": model.state_dict(),
    }
    if optimizer is not None:
        payload["optimizer"] = _optimizer_by_name(model, optimizer)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("saved %s with %d edits to %s", type(model).__name__,
                len(payload["history"]), target)


def replay(model: nn.Module, history: list[EditRecord]) -> None:
    """Apply the edits of ``history`` to a fresh ``model`` (weights are loaded afterwards)."""
    from neuroexapt.ops import add_skip, deepen, narrow, remove_block, widen

    device = next(iter(model.parameters()), torch.empty(0)).device
    for i, r in enumerate(history):
        x, a = make_inputs(r.inputs, device), r.args
        try:
            if r.op == "widen":
                widen(model, a["layer"], a["by"], example_inputs=x, strategy=a["strategy"],
                      units=a["units"], allow_approximate=True)
            elif r.op == "narrow":
                narrow(model, a["layer"], keep=a["keep"], example_inputs=x)
            elif r.op == "deepen":
                deepen(model, a["layer"], example_inputs=x)
            elif r.op == "add_skip":
                add_skip(model, a["src"], a["dst"], example_inputs=x)
            elif r.op == "remove_block":
                remove_block(model, a["block"], example_inputs=x)
            else:
                raise CheckpointError(f"unknown edit '{r.op}' in history")
        except (NeuroExaptError, KeyError) as e:
            raise CheckpointError(
                f"replaying edit {i} ({r.op} '{r.target}') on a fresh "
                f"{type(model).__name__} failed: {e}. model_factory must build the same "
                "architecture the checkpoint started from"
            ) from e


def load(
    path: str | os.PathLike[str],
    model_factory: Callable[[], nn.Module],
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> Checkpoint:
    """Rebuild an edited model from ``path``.

    Args:
        path: a file written by :func:`save`.
        model_factory: builds the unedited model (same class and arguments as originally).
        optimizer_factory: builds the optimizer from the rebuilt model, e.g.
            ``lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)``; its state is
            then loaded from the checkpoint.

    Returns:
        ``Checkpoint(model, optimizer)``.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises various errors for unreadable or unsafe files
        raise CheckpointError(f"cannot read checkpoint '{path}': {e}") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise CheckpointError(f"'{path}' is not a NeuroExapt checkpoint")
    model = model_factory()
    replay(model, [EditRecord.from_dict(r) for r in data["history"]])
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"weights in '{path}' do not fit the rebuilt model: {e}") from e
    optimizer = None
    if optimizer_factory is not None:
        optimizer = optimizer_factory(model)
        if "optimizer" in data:
            _load_optimizer(model, optimizer, data["optimizer"])
    return Checkpoint(model, optimizer)


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                    saved: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(groups)} param groups, the new one "
            f"{len(optimizer.param_groups)}"
        )
    order: list[str] = []
    for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
        names = saved_group["params"]
        if {id(params[n]) for n in names if n in params} != {id(p) for p in group["params"]}:
            raise CheckpointError("optimizer_factory's param groups do not match the checkpoint")
        group["params"] = [params[n] for n in names]
        order.extend(names)
    index = {n: i for i, n in enumerate(order)}
    state_dict = {
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
        "state": {index[n]: s for n, s in saved["state"].items()},
    }
    optimizer.load_state_dict(state_dict)
