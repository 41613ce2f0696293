"""Plain descriptions of built-in modules, so a checkpoint can rebuild a chosen candidate.

:func:`neuroexapt.relax.discretize` records the chosen module of an operation choice in the
edit history (``choose``); :func:`neuroexapt.load` rebuilds it from that description with
no stored code executed. Built-in ``torch.nn`` layers that are described by their
constructor arguments are supported (convolutions, Linear, norms, activations, pooling,
Identity, Dropout, and ``nn.Sequential`` of them); other modules are described as ``None``,
and loading such a checkpoint is a :class:`~neuroexapt.errors.CheckpointError`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from neuroexapt.errors import CheckpointError

__all__ = ["build_module", "module_spec", "replace_module"]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model``'s submodule ``name`` is."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _allowed(cls: type) -> bool:
    return cls.__module__.startswith("torch.nn.modules") and issubclass(cls, nn.Module) \
        and cls not in (nn.Module, nn.ModuleList, nn.ModuleDict)


def module_spec(module: nn.Module) -> dict[str, Any] | None:
    """``{"type": name, "args": {...}}`` for a built-in module (nested for Sequential), or
    None when the module cannot be described."""
    cls = parametrize.type_before_parametrizations(module)
    if not _allowed(cls):
        return None
    if isinstance(module, nn.Sequential):
        parts = [module_spec(m) for m in module]
        if any(p is None for p in parts):
            return None
        return {"type": "Sequential", "children": parts}
    args: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or param.kind in (param.VAR_POSITIONAL,
                                                                  param.VAR_KEYWORD):
            continue
        if name == "bias":
            value: Any = getattr(module, "bias", None) is not None
        elif hasattr(module, name):
            value = getattr(module, name)
        elif param.default is not param.empty:
            continue
        else:
            return None
        if not isinstance(value, int | float | bool | str | tuple | type(None)):
            return None
        args[name] = list(value) if isinstance(value, tuple) else value
    return {"type": cls.__name__, "args": args}


def build_module(spec: dict[str, Any] | None) -> nn.Module:
    """The module described by :func:`module_spec`."""
    if spec is None:
        raise CheckpointError("the chosen module of a 'choose' edit is not a built-in torch.nn "
                              "layer and was not recorded; rebuild it with relax() and "
                              "discretize() on the fresh model before loading the weights")
    name = spec.get("type")
    if name == "Sequential":
        return nn.Sequential(*[build_module(c) for c in spec.get("children", [])])
    cls = getattr(nn, str(name), None)
    if not isinstance(cls, type) or not _allowed(cls):
        raise CheckpointError(f"unknown module type {name!r} in a 'choose' edit")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("args", {}).items()}
    return cls(**args)
