"""The edit history kept on every edited model.

Each applied edit appends an :class:`EditRecord` of plain data (names, integers, lists) to the
model. A checkpoint stores the history so that a fresh model can replay it before loading the
weights; loading never executes stored code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import CheckpointError, ConfigError
from neuroexapt.graph.cache import invalidate
from neuroexapt.graph.trace import in_model_dtype
from neuroexapt.graph.wrappers import accepts_wrapped
from neuroexapt.optim.parammap import ParamMap

__all__ = ["EditRecord", "InputSpec", "get_history", "inputs_for"]

_HISTORY_ATTR = "_neuroexapt_history"
_INPUTS_ATTR = "_neuroexapt_inputs"
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                               torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                               torch.bool)}

InputSpec = list[tuple[list[int], str]]


@dataclass(frozen=True)
class EditRecord:
    """One applied edit, in plain data.

    Attributes:
        op: the edit's name (``"widen"``, ``"narrow"``, ``"deepen"``, ``"add_skip"``,
            ``"remove_block"``).
        target: the layer or block edited, by its canonical module name.
        args: resolved arguments that replay the edit exactly (chosen units, new names).
        inputs: shapes and dtypes of the example inputs used to trace the model.
        params_before: number of parameters before the edit.
        params_after: number of parameters after the edit.
        param_map: how parameters changed (for :func:`neuroexapt.optim.migrate`); only on the
            record returned by the edit, never stored in the history.
    """

    op: str
    target: str
    args: dict[str, Any]
    inputs: InputSpec
    params_before: int
    params_after: int
    param_map: ParamMap | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return {
            "op": self.op, "target": self.target, "args": self.args,
            "inputs": [[list(s), d] for s, d in self.inputs],
            "params_before": self.params_before, "params_after": self.params_after,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRecord:
        """Inverse of :meth:`to_dict`; rejects malformed records."""
        try:
            json.dumps(data["args"])
            return cls(
                op=str(data["op"]), target=str(data["target"]), args=dict(data["args"]),
                inputs=[(list(map(int, s)), str(d)) for s, d in data["inputs"]],
                params_before=int(data["params_before"]),
                params_after=int(data["params_after"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"malformed edit record {data!r}: {e}") from e


@accepts_wrapped
def get_history(model: nn.Module) -> list[EditRecord]:
    """The edits applied to ``model`` so far, oldest first (a copy)."""
    return list(getattr(model, _HISTORY_ATTR, []))


def append_history(model: nn.Module, record: EditRecord) -> None:
    """Append a record (without its parameter map) to the model's history.

    The model changed: its cached graphs (:func:`neuroexapt.graph.graph_cache`) are dropped.
    """
    history = list(getattr(model, _HISTORY_ATTR, []))
    stored = EditRecord(record.op, record.target, record.args, record.inputs,
                        record.params_before, record.params_after)
    history.append(stored)
    object.__setattr__(model, _HISTORY_ATTR, history)
    object.__setattr__(model, _INPUTS_ATTR, record.inputs)
    invalidate(model)


def set_history(model: nn.Module, history: list[EditRecord]) -> None:
    """Replace the model's history (used when restoring after a failed edit)."""
    object.__setattr__(model, _HISTORY_ATTR, list(history))
    invalidate(model)


def remember_inputs(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Keep the shapes of ``inputs`` as the model's example inputs for later edits."""
    object.__setattr__(model, _INPUTS_ATTR, spec_of(inputs))


def spec_of(inputs: tuple[Any, ...]) -> InputSpec:
    """Shapes and dtypes of example inputs."""
    spec = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"example_inputs must be tensors, got {type(x).__name__}")
        spec.append((list(x.shape), str(x.dtype)))
    return spec


def inputs_for(model: nn.Module, example_inputs: Any, op: str) -> tuple[torch.Tensor, ...]:
    """The example inputs to trace with: the given ones, else those of the last edit."""
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(
            example_inputs
        )
        spec_of(inputs)
        return in_model_dtype(model, inputs)
    spec = getattr(model, _INPUTS_ATTR, None)
    if spec is None:
        raise ConfigError(
            f"{op} needs example_inputs= (a batch the model accepts, e.g. "
            "torch.randn(2, 3, 32, 32)) the first time a model is edited"
        )
    return make_inputs(spec, next(iter(model.parameters()), torch.empty(0)).device)


def make_inputs(spec: InputSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Deterministic tensors matching ``spec`` (random normal floats, zero integers)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape, dtype_name in spec:
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"unknown input dtype {dtype_name!r} in edit history")
        dtype = _DTYPES[dtype_name]
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype))
        else:
            out.append(torch.zeros(shape, dtype=dtype, device=device))
    return tuple(out)
