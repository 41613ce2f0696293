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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from neuroexapt.errors import CheckpointError, NeuroExaptError
from neuroexapt.graph.wrappers import accepts_wrapped, unwrap
from neuroexapt.ops.history import EditRecord, get_history, make_inputs, set_history
from neuroexapt.optim.named import load_named_state, named_state

logger = logging.getLogger(__name__)

__all__ = ["Checkpoint", "load", "replay", "restore", "save"]

_FORMAT = "neuroexapt-checkpoint"
_VERSION = 1


class Checkpoint:
    """What :func:`load` returns: the rebuilt model, its optimizer (or None), policy state.

    It unpacks as ``model, optimizer = load(...)``; ``policy_state`` is the state a policy
    gave :func:`save` (``DNMFramework.state_dict()``), or None, for its ``load_state_dict``.
    """

    __slots__ = ("model", "optimizer", "policy_state")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 policy_state: dict[str, Any] | None = None) -> None:
        self.model, self.optimizer, self.policy_state = model, optimizer, policy_state

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.optimizer))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Any:
        return (self.model, self.optimizer)[index]

    def __repr__(self) -> str:
        return (f"Checkpoint(model={type(self.model).__name__}, optimizer="
                f"{type(self.optimizer).__name__ if self.optimizer else None}, policy_state="
                f"{'set' if self.policy_state is not None else None})")


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...


@accepts_wrapped
def save(model: nn.Module, path: str | os.PathLike[str],
         optimizer: torch.optim.Optimizer | None = None, *,
         policy: _Stateful | None = None) -> None:
    """Write ``model`` (history and weights) and optionally its optimizer to ``path`` atomically.

    ``policy`` (a :class:`~neuroexapt.core.DNMFramework`, or anything with ``state_dict()`` of
    plain data and tensors) is stored too, so that a resumed run neither repeats nor forgets
    its changes: ``load(...).policy_state`` gives it back.
    """
    payload: dict[str, Any] = {
        "format": _FORMAT, "version": _VERSION,
        "history": [r.to_dict() for r in get_history(model)],
        "state_dict": model.state_dict(),
    }
    if policy is not None:
        payload["policy"] = policy.state_dict()
    if optimizer is not None:
        try:
            payload["optimizer"] = named_state(model, optimizer)
        except NeuroExaptError as e:
            raise CheckpointError(f"cannot save the optimizer: {e}") from e
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


@accepts_wrapped
def replay(model: nn.Module, history: list[EditRecord], *,
           optimizer: torch.optim.Optimizer | None = None) -> None:
    """Apply the edits of ``history`` to a fresh ``model`` (weights are loaded afterwards);
    ``optimizer``'s state follows the edits."""
    from neuroexapt.ops import add_skip, deepen, narrow, remove_block, widen
    from neuroexapt.relax.specs import build_module, replace_module

    device = next(iter(model.parameters()), torch.empty(0)).device
    before = get_history(model)
    for i, r in enumerate(history):
        x, a = make_inputs(r.inputs, device), r.args
        try:
            if r.op == "widen":
                widen(model, a["layer"], a["by"], example_inputs=x, strategy=a["strategy"],
                      units=a["units"], allow_approximate=True, optimizer=optimizer)
            elif r.op == "narrow":
                narrow(model, a["layer"], keep=a["keep"], example_inputs=x, optimizer=optimizer)
            elif r.op == "deepen":
                deepen(model, a["layer"], example_inputs=x, optimizer=optimizer)
            elif r.op == "add_skip":
                add_skip(model, a["src"], a["dst"], example_inputs=x, optimizer=optimizer)
            elif r.op == "remove_block":
                remove_block(model, a["block"], example_inputs=x, optimizer=optimizer)
            elif r.op == "choose":  # an operation or depth choice discretised (relax)
                replace_module(model, a["layer"], build_module(a["module"]).to(device))
            else:
                raise CheckpointError(f"unknown edit '{r.op}' in history")
        except (NeuroExaptError, KeyError) as e:
            raise CheckpointError(
                f"replaying edit {i} ({r.op} '{r.target}') on a fresh "
                f"{type(model).__name__} failed: {e}. model_factory must build the same "
                "architecture the checkpoint started from"
            ) from e
    if len(get_history(model)) == len(before) + len(history):
        # the records as saved: what a policy added to an edit's record (a growth's init) too
        set_history(model, before + list(history))


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
        a :class:`Checkpoint`: it unpacks as ``model, optimizer``; its ``policy_state`` is the
        state saved with ``save(..., policy=...)`` (None without), for the policy's
        ``load_state_dict``.
    """
    data = _read(path)
    model = model_factory()
    replay(model, [EditRecord.from_dict(r) for r in data["history"]])
    _load_weights(model, data, path)
    optimizer = None
    if optimizer_factory is not None:
        optimizer = optimizer_factory(model)
        _load_optimizer(model, optimizer, data, path)
    return Checkpoint(model, optimizer, _policy(data))


def restore(path: str | os.PathLike[str], model: nn.Module,
            optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
    """Resume in place: ``model`` (unedited, as built at the start of the run) and its
    ``optimizer`` become what ``path`` holds; returns the saved policy state (or None).

    The edits are replayed on ``model`` with ``optimizer`` following them, then the weights
    and the optimizer's state are loaded, so the objects a training loop holds stay valid.

    Raises:
        CheckpointError: an unreadable or foreign file, a model already edited, edits or
            weights that do not fit the model.
    """
    model = unwrap(model)  # the model is the second argument: accepts_wrapped would miss it
    data = _read(path)
    if get_history(model):
        raise CheckpointError(f"restore('{path}', model): the model already holds "
                              f"{len(get_history(model))} edits; pass the model as built at "
                              "the start of the run")
    replay(model, [EditRecord.from_dict(r) for r in data["history"]], optimizer=optimizer)
    _load_weights(model, data, path)
    if optimizer is not None:
        _load_optimizer(model, optimizer, data, path)
    return _policy(data)


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises various errors for unreadable or unsafe files
        raise CheckpointError(f"cannot read checkpoint '{path}': {e}") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise CheckpointError(f"'{path}' is not a NeuroExapt checkpoint")
    return data


def _load_weights(model: nn.Module, data: dict[str, Any], path: Any) -> None:
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"weights in '{path}' do not fit the rebuilt model: {e}") from e


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, data: dict[str, Any],
                    path: Any) -> None:
    if "optimizer" in data:
        try:
            load_named_state(model, optimizer, data["optimizer"])
        except NeuroExaptError as e:
            raise CheckpointError(f"optimizer state in '{path}' does not fit: {e}") from e


def _policy(data: dict[str, Any]) -> dict[str, Any] | None:
    policy = data.get("policy")
    return policy if isinstance(policy, dict) else None
