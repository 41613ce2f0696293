"""``remove_block``: replace a residual block by its shortcut (pruning a whole block)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from neuroexapt.errors import SurgeryError, TraceError
from neuroexapt.graph import resolve_layer
from neuroexapt.graph.handlers import ElementwiseHandler, get_handler
from neuroexapt.graph.trace import _Tracer
from neuroexapt.graph.wrappers import accepts_wrapped
from neuroexapt.ops.edit import run_edit
from neuroexapt.ops.history import EditRecord, inputs_for
from neuroexapt.ops.modules import SkipSource, SkipTarget
from neuroexapt.optim.parammap import ParamMap

__all__ = ["remove_block"]

_ADDS = {operator.add, operator.iadd, torch.add}
_UNARY_FUNCS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
                torch.nn.functional.gelu, torch.nn.functional.silu, torch.sigmoid, torch.tanh}


def _is_elementwise(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        handler = get_handler(root.get_submodule(str(node.target)))
        return type(handler) is ElementwiseHandler and handler.feature_dim is None
    if node.op == "call_function":
        return node.target in _UNARY_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_", "contiguous")


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _final_add(block: nn.Module, graph: fx.Graph, name: str) -> fx.Node:
    out = next(n for n in graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, fx.Node) and not _is_add(node):
        if not _is_elementwise(block, node) or not node.args:
            raise SurgeryError(
                f"'{name}' ends in '{node.name}', not in a residual addition; remove_block "
                "works on blocks computing act(f(x) + shortcut(x))"
            )
        node = node.args[0]
    if not isinstance(node, fx.Node):
        raise SurgeryError(f"'{name}' has no residual addition at its end")
    return node


def _ancestry_params(block: nn.Module, node: fx.Node) -> tuple[int, bool]:
    """(parameters on the path, whether the block's input is reached) for ``node``."""
    seen, stack, params, reaches = set(), [node], 0, False
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            reaches = True
        elif n.op == "call_module":
            params += sum(p.numel() for p in block.get_submodule(str(n.target)).parameters())
        stack.extend(n.all_input_nodes)
    return params, reaches


def _shortcut_module(block: nn.Module, name: str) -> fx.GraphModule:
    wired = [n for n, m in block.named_modules() if isinstance(m, SkipSource | SkipTarget)]
    if wired:
        raise SurgeryError(
            f"'{name}' contains '{name}.{wired[0]}', an end of a skip connection added by "
            "add_skip; remove_block cannot cut such a connection"
        )
    try:
        graph = _Tracer(()).trace(block)
    except Exception as e:
        raise TraceError(f"torch.fx cannot trace block '{name}': {e}") from e
    add = _final_add(block, graph, name)
    branches = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(branches) != 2:
        raise SurgeryError(f"the residual addition of '{name}' has fewer than two tensor inputs")
    (p0, r0), (p1, r1) = (_ancestry_params(block, b) for b in branches)
    if not (r0 and r1) or p0 == p1:
        raise SurgeryError(
            f"'{name}' has no usable shortcut: its addition must combine a branch with fewer "
            "parameters (identity or projection) and the residual branch, both from the input"
        )
    shortcut = branches[0] if p0 < p1 else branches[1]
    add.replace_all_uses_with(shortcut)
    graph.erase_node(add)
    for node in graph.nodes:  # string annotations (PEP 563) would break pickling
        node.type = None
    module = fx.GraphModule(block, graph)
    originals = dict(block.named_modules())
    for sub_name, sub in module.named_modules():  # fx makes its containers in train mode
        if sub_name in originals:
            sub.training = originals[sub_name].training
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.recompile()
    module.delete_all_unused_submodules()
    return module


@accepts_wrapped
def remove_block(
    model: nn.Module,
    block: str,
    *,
    example_inputs: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> EditRecord:
    """Replace the residual block ``block`` by its shortcut; this changes the function.

    The block must compute ``act(f(x) + s(x))`` where ``s`` (the shortcut: identity or a
    projection) has fewer parameters than ``f``. It becomes a ``torch.fx.GraphModule`` that
    computes ``act(s(x))`` with the shortcut's own modules; the residual branch's parameters
    leave the model and the optimizer.

    Args:
        model: the model, edited in place.
        block: module name of the residual block.
        example_inputs: a batch the model accepts (needed the first time a model is edited).
        optimizer: optimizer whose removed parameters are dropped.

    Returns:
        The :class:`EditRecord`.
    """
    name = resolve_layer(model, block)
    if not name:
        raise SurgeryError("remove_block needs a block inside the model, not the model itself")
    inputs = inputs_for(model, example_inputs, "remove_block")

    def body() -> tuple[ParamMap, dict[str, Any]]:
        module = model.get_submodule(name)
        replacement = _shortcut_module(module, name)
        kept = {id(p) for p in replacement.parameters()}
        removed = [p for p in module.parameters() if id(p) not in kept]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, replacement)  # run_edit runs the result before it commits
        return ParamMap(removed=removed), {"block": name}

    return run_edit(model, optimizer, inputs, "remove_block", name, False, body)
