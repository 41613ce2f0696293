"""Reading fx nodes for the layout rules: arguments, the layer a node runs in, refusals."""

from __future__ import annotations

from typing import Any

from torch import fx

from neuroexapt.graph.context import BuildContext, NodeLayout
from neuroexapt.graph.layout import Layout

__all__ = ["arg", "first", "unknown", "user_module"]


def arg(node: fx.Node, index: int, key: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, or its keyword ``key``, or ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def first(ctx: BuildContext, node: fx.Node) -> Layout | None:
    """The layout of the node's first argument (None if it carries no units)."""
    return ctx.layout_of(node.args[0]) if node.args else None


def user_module(node: fx.Node) -> tuple[str, str] | None:
    """(name, class name) of the innermost user-defined module that ``node`` runs in."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        module = getattr(cls, "__module__", str(cls))
        if not module.startswith(("torch.", "neuroexapt.")):
            return path, getattr(cls, "__name__", str(cls)).rpartition(".")[2]
    return None


def unknown(ctx: BuildContext, node: fx.Node, what: str, opaque: bool = True) -> NodeLayout:
    """Freeze the groups ``node`` reads; ``opaque`` ops inside a user layer name that layer."""
    ins = ctx.layouts_in((node.args, node.kwargs))
    owner = user_module(node) if opaque else None
    if owner is None:
        ctx.freeze(ins, f"{what} at node '{node.name}'")
    else:
        ctx.freeze(ins, f"{what} at node '{node.name}' inside '{owner[0]}' ({owner[1]}), a "
                        f"layer with no handler", owner[0])
    return None
