"""Assertion helpers: same function before and after an edit, and exact no-change checks.

Example:
    >>> y = model(x)                      # before the edit
    >>> edit(model)                       # a function-preserving edit, in place
    >>> assert_same_function(y, model, (x,))
    >>> snap = snapshot_model(model)
    >>> # ... an edit that must fail ...
    >>> assert_model_unchanged(model, snap)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import torch
from torch import nn

__all__ = [
    "ModelSnapshot",
    "OptimizerSnapshot",
    "assert_model_unchanged",
    "assert_optimizer_unchanged",
    "assert_same_function",
    "output_scale",
    "snapshot_model",
    "snapshot_optimizer",
]

# Relative tolerance per dtype: max abs error <= tolerance * output_scale.
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-10}
_MAX_PROBLEMS = 10  # problems listed in one failure message

Outputs = Any  # a tensor, or a (nested) tuple / list / dict of tensors
Inputs = torch.Tensor | Sequence[torch.Tensor]


def _leaves(outputs: Outputs) -> list[torch.Tensor]:
    """Flatten a tensor or nested tuple/list/dict of tensors into a list, in order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for key in sorted(outputs) for t in _leaves(outputs[key])]
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in _leaves(item)]
    raise TypeError(f"outputs must be tensors or tuples/lists/dicts of them, got {type(outputs)}")


def output_scale(y: Outputs) -> float:
    """Largest absolute value over all output tensors, floored at 1.0."""
    scale = 1.0
    for t in _leaves(y):
        if t.numel():
            scale = max(scale, float(t.detach().abs().max()))
    return scale


def _evaluate(subject: Callable[..., Outputs] | Outputs, inputs: Inputs) -> Outputs:
    """Return ``subject`` if it already holds outputs, else call it on ``inputs`` without grad."""
    if isinstance(subject, (torch.Tensor, tuple, list, dict)):
        return subject
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    with torch.no_grad():
        return subject(*args)


def assert_same_function(
    before: Callable[..., Outputs] | Outputs,
    after: Callable[..., Outputs] | Outputs,
    inputs: Inputs = (),
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Assert two models (or their precomputed outputs) agree on ``inputs``.

    Args:
        before: model or its outputs before the edit (the reference).
        after: model or its outputs after the edit.
        inputs: a tensor or a tuple of positional inputs; unused for precomputed outputs.
        dtype: dtype whose tolerance applies (float32: 1e-5, float64: 1e-10, relative to
            ``output_scale(before)``); defaults to the dtype of the first output.
    """
    ref, got = _leaves(_evaluate(before, inputs)), _leaves(_evaluate(after, inputs))
    if len(ref) != len(got):
        raise AssertionError(f"number of outputs differs: {len(ref)} before, {len(got)} after")
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a.shape != b.shape:
            raise AssertionError(
                f"output {i} shape differs: {tuple(a.shape)} before, {tuple(b.shape)} after"
            )
    dtype = dtype if dtype is not None else (ref[0].dtype if ref else torch.float32)
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype}; supported: {list(TOLERANCES)}")
    scale = output_scale(ref)
    tol = TOLERANCES[dtype] * scale
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        if not a.numel():
            continue
        diff = (a.detach().double() - b.detach().double()).abs()
        err = float(diff.nan_to_num(nan=float("inf")).max())
        if not err <= tol:
            where = tuple(
                int(k) for k in torch.unravel_index(diff.nan_to_num(float("inf")).argmax(), a.shape)
            )
            raise AssertionError(
                f"output {i} differs: max abs error {err:.3e} at index {where} exceeds "
                f"{TOLERANCES[dtype]:.0e} x output scale {scale:.3e} = {tol:.3e} ({dtype})"
            )


# ----------------------------------------------------------------------------- model snapshot


class ModelSnapshot(TypedDict):
    """What :func:`snapshot_model` records."""

    cls: type[nn.Module]  # model.__class__
    state: dict[str, torch.Tensor]  # deep copies of the state_dict tensors
    modules: list[tuple[str, type[nn.Module], tuple[tuple[str, tuple[int, ...]], ...]]]
    params: dict[str, nn.Parameter]  # the Parameter objects themselves (identity check)
    training: dict[str, bool]  # train/eval flag per module


def snapshot_model(model: nn.Module) -> ModelSnapshot:
    """Record everything :func:`assert_model_unchanged` compares, copying tensors."""
    modules = [
        (name, type(m), tuple((p, tuple(t.shape)) for p, t in m.named_parameters(recurse=False)))
        for name, m in model.named_modules()
    ]
    return ModelSnapshot(
        cls=model.__class__,
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        modules=modules,
        params=dict(model.named_parameters()),
        training={name: m.training for name, m in model.named_modules()},
    )


def _tensor_problem(name: str, expected: torch.Tensor, actual: torch.Tensor) -> str | None:
    """Describe how ``actual`` differs from ``expected`` exactly, or None if identical."""
    if expected.dtype != actual.dtype:
        return f"{name}: dtype {expected.dtype} -> {actual.dtype}"
    if expected.shape != actual.shape:
        return f"{name}: shape {tuple(expected.shape)} -> {tuple(actual.shape)}"
    if expected.device != actual.device:
        return f"{name}: device {expected.device} -> {actual.device}"
    if not torch.equal(expected, actual):
        if expected.is_floating_point() or expected.is_complex():
            diff = float((expected - actual).abs().nan_to_num(nan=float("inf")).max())
        else:
            diff = float((expected.long() - actual.long()).abs().max())
        return f"{name}: values changed (max abs difference {diff:.3e})"
    return None


def _raise_problems(what: str, problems: list[str]) -> None:
    """Raise one AssertionError listing up to _MAX_PROBLEMS problems."""
    if problems:
        shown = "\n  ".join(problems[:_MAX_PROBLEMS])
        more = (
            f"\n  ... and {len(problems) - _MAX_PROBLEMS} more"
            if len(problems) > _MAX_PROBLEMS
            else ""
        )
        raise AssertionError(f"{what} changed ({len(problems)} differences):\n  {shown}{more}")


def _diff_lists(label: str, expected: list[Any], actual: list[Any]) -> list[str]:
    """Describe the first differences between two lists of records."""
    problems = [
        f"{label}: {e!r} -> {a!r}" for e, a in zip(expected, actual, strict=False) if e != a
    ]
    if len(expected) != len(actual):
        extra = [a for a in actual if a not in expected]
        missing = [e for e in expected if e not in actual]
        problems.append(
            f"{label}: {len(expected)} -> {len(actual)} (added {extra}, removed {missing})"
        )
    return problems[:_MAX_PROBLEMS]


def assert_model_unchanged(model: nn.Module, snapshot: ModelSnapshot) -> None:
    """Assert ``model`` is exactly as when ``snapshot`` was taken (structure, tensors, identity)."""
    problems: list[str] = []
    if model.__class__ is not snapshot["cls"]:
        problems.append(f"class: {snapshot['cls'].__name__} -> {model.__class__.__name__}")
    modules = [
        (name, type(m), tuple((p, tuple(t.shape)) for p, t in m.named_parameters(recurse=False)))
        for name, m in model.named_modules()
    ]
    problems += _diff_lists("module", snapshot["modules"], modules)
    state = model.state_dict()
    for key in sorted(set(snapshot["state"]) ^ set(state)):
        problems.append(
            f"state_dict key {key!r} {'removed' if key in snapshot['state'] else 'added'}"
        )
    for key in snapshot["state"].keys() & state.keys():
        problem = _tensor_problem(key, snapshot["state"][key], state[key].detach())
        if problem:
            problems.append(problem)
    params = dict(model.named_parameters())
    for key, param in snapshot["params"].items():
        if key in params and params[key] is not param:
            problems.append(
                f"{key}: Parameter object replaced (optimizer would hold a stale tensor)"
            )
        elif key in params and params[key].requires_grad != param.requires_grad:
            problems.append(
                f"{key}: requires_grad {param.requires_grad} -> {params[key].requires_grad}"
            )
    training = {name: m.training for name, m in model.named_modules()}
    problems += [
        f"{name}: training {flag} -> {training[name]}"
        for name, flag in snapshot["training"].items()
        if name in training and training[name] != flag
    ]
    _raise_problems("model", problems)


# ----------------------------------------------------------------------------- optimizer snapshot


class OptimizerSnapshot(TypedDict):
    """What :func:`snapshot_optimizer` records."""

    cls: type[torch.optim.Optimizer]  # optimizer.__class__
    params: list[
        list[torch.Tensor]
    ]  # per group, the parameter objects (kept alive: ids stay unique)
    hyper: list[dict[str, Any]]  # per group, deep copies of every key except "params"
    state: dict[int, dict[str, Any]]  # id(param) -> deep copy of its state


def _copy_value(value: Any) -> Any:
    """Deep copy a state or hyper-parameter value, detaching tensors."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def snapshot_optimizer(opt: torch.optim.Optimizer) -> OptimizerSnapshot:
    """Record parameter identity per group, hyper-parameters and every state tensor."""
    return OptimizerSnapshot(
        cls=opt.__class__,
        params=[list(group["params"]) for group in opt.param_groups],
        hyper=[
            {k: _copy_value(v) for k, v in group.items() if k != "params"}
            for group in opt.param_groups
        ],
        state={id(p): {k: _copy_value(v) for k, v in s.items()} for p, s in opt.state.items()},
    )


def _value_problem(name: str, expected: Any, actual: Any) -> str | None:
    """Describe how a state or hyper-parameter value changed, or None if exactly equal."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)):
            return f"{name}: {expected!r} -> {actual!r}"
        return _tensor_problem(name, expected, actual.detach())
    return None if expected == actual else f"{name}: {expected!r} -> {actual!r}"


def _group_problems(
    i: int, params: list[torch.Tensor], hyper: dict[str, Any], group: dict
) -> list[str]:
    """Compare one param group against its snapshot."""
    problems = []
    ids, now = [id(p) for p in params], [id(p) for p in group["params"]]
    if ids != now:
        problems.append(f"group {i} params: ids {ids} -> {now}")
    for key in sorted(hyper.keys() | (group.keys() - {"params"})):
        if key not in group or key not in hyper:
            problems.append(
                f"group {i} hyper-parameter {key!r} {'removed' if key in hyper else 'added'}"
            )
            continue
        problem = _value_problem(f"group {i} {key}", hyper[key], group[key])
        if problem:
            problems.append(problem)
    return problems


def _state_problems(name: str, expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Compare one parameter's optimizer state against its snapshot."""
    problems = []
    for key in sorted(expected.keys() | actual.keys()):
        if key not in actual or key not in expected:
            problems.append(
                f"state of {name} key {key!r} {'removed' if key in expected else 'added'}"
            )
            continue
        problem = _value_problem(f"state of {name} {key!r}", expected[key], actual[key])
        if problem:
            problems.append(problem)
    return problems


def assert_optimizer_unchanged(opt: torch.optim.Optimizer, snap: OptimizerSnapshot) -> None:
    """Assert ``opt`` has the same groups, parameters, hyper-parameters and state as ``snap``."""
    problems: list[str] = []
    if opt.__class__ is not snap["cls"]:
        problems.append(f"class: {snap['cls'].__name__} -> {opt.__class__.__name__}")
    if len(opt.param_groups) != len(snap["params"]):
        problems.append(f"param_groups: {len(snap['params'])} -> {len(opt.param_groups)}")
    for i, (params, hyper, group) in enumerate(
        zip(snap["params"], snap["hyper"], opt.param_groups, strict=False)
    ):
        problems += _group_problems(i, params, hyper, group)
    labels = {
        id(p): f"param[{g}][{k}]" for g, ps in enumerate(snap["params"]) for k, p in enumerate(ps)
    }
    state = {id(p): s for p, s in opt.state.items()}
    for pid in sorted(snap["state"].keys() ^ state.keys()):
        name = labels.get(pid, f"param id {pid}")
        problems.append(f"state for {name} {'removed' if pid in snap['state'] else 'added'}")
    for pid in snap["state"].keys() & state.keys():
        problems += _state_problems(
            labels.get(pid, f"param id {pid}"), snap["state"][pid], state[pid]
        )
    _raise_problems("optimizer", problems)
