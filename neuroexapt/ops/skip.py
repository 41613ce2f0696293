"""``add_skip``: a new connection from one layer's output into another layer's input."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from neuroexapt.errors import ConfigError, SurgeryError
from neuroexapt.graph import resolve_layer, trace
from neuroexapt.graph.context import BuildContext
from neuroexapt.graph.trace import ModelGraph
from neuroexapt.graph.wrappers import accepts_wrapped
from neuroexapt.ops.edit import run_edit
from neuroexapt.ops.history import EditRecord, inputs_for
from neuroexapt.ops.modules import SkipProjection, SkipSource, SkipTarget
from neuroexapt.optim.parammap import ParamMap

__all__ = ["add_skip"]

_LAST_DIM = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding)


def _feature_dim(graph: ModelGraph, node: fx.Node, module: nn.Module, ndim: int) -> int:
    value = graph.layouts.get(node)
    if isinstance(value, tuple):
        value = value[0] if value else None
    dim = getattr(value, "dim", None)
    if dim is not None:
        return int(dim)
    return ndim - 1 if isinstance(module, _LAST_DIM) or ndim == 2 else 1


def _wrap(model: nn.Module, name: str, cls: type[nn.Module]) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, cls) and attr == "inner":
        return parent  # already wrapped by an earlier skip
    current = parent.get_submodule(attr)
    wrapper = cls(current).train(current.training)
    setattr(parent, attr, wrapper)
    return wrapper


def _projection(graph: ModelGraph, src: str, dst: str) -> SkipProjection:
    src_node, dst_node = graph.node_of(src), graph.node_of(dst)
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    if order[src_node] >= order[dst_node]:
        raise SurgeryError(f"'{src}' does not run before '{dst}' in forward; swap them")
    if not dst_node.args or not isinstance(dst_node.args[0], fx.Node):
        raise SurgeryError(f"'{dst}' takes no tensor as its first input")
    s_shape = BuildContext.shape_of(src_node)
    d_shape = BuildContext.shape_of(dst_node.args[0])
    if s_shape is None or d_shape is None:
        raise SurgeryError(f"'{src}' output or '{dst}' input is not a single tensor")
    src_mod, dst_mod = graph.model.get_submodule(src), graph.model.get_submodule(dst)
    sd = _feature_dim(graph, src_node, src_mod, len(s_shape))
    dd = _feature_dim(graph, dst_node.args[0], dst_mod, len(d_shape))
    s_rest = [s for i, s in enumerate(s_shape) if i not in (0, sd)]
    d_rest = tuple(s for i, s in enumerate(d_shape) if i not in (0, dd))
    if d_rest and len(s_rest) != len(d_rest):
        raise SurgeryError(
            f"cannot match '{src}' output {tuple(s_shape)} to '{dst}' input {tuple(d_shape)}: "
            "their non-feature dimensions differ in number"
        )
    if d_rest and any(d > s for s, d in zip(s_rest, d_rest, strict=True)):
        raise SurgeryError(
            f"'{dst}' input {tuple(d_shape)} is larger than '{src}' output {tuple(s_shape)} "
            "outside the features; a skip only pools down"
        )
    weight = next(iter(src_mod.parameters()), None)
    kw: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype} if weight is not None \
        else {}
    return SkipProjection(s_shape[sd], d_shape[dd], sd, dd, d_rest, len(s_rest), **kw)


@accepts_wrapped
def add_skip(
    model: nn.Module,
    src: str,
    dst: str,
    *,
    example_inputs: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    verify: bool = False,
) -> EditRecord:
    """Add the output of ``src`` into the input of ``dst`` through a zero-initialised map.

    The projection (:class:`~neuroexapt.ops.modules.SkipProjection`) average-pools the
    source to the target's size and maps its features linearly (a 1x1 convolution); its weight
    starts at zero so the model's function is unchanged. ``src`` becomes a ``SkipSource`` and
    ``dst`` a ``SkipTarget`` (their original modules are ``.inner``).

    Args:
        model: the model, edited in place.
        src: module whose output feeds the connection (runs before ``dst``).
        dst: module whose first input receives it.
        example_inputs: a batch the model accepts (needed the first time a model is edited).
        optimizer: receives the projection's parameters (in the group of ``dst``'s weight).
        verify: compare outputs before and after.

    Returns:
        The :class:`EditRecord`.
    """
    src_name, dst_name = resolve_layer(model, src), resolve_layer(model, dst)
    if src_name == dst_name:
        raise ConfigError(f"add_skip needs two different layers, got '{src}' twice")
    inputs = inputs_for(model, example_inputs, "add_skip")

    def body() -> tuple[ParamMap, dict[str, Any]]:
        graph = trace(model, inputs)
        projection = _projection(graph, src_name, dst_name)
        reference = next(iter(model.get_submodule(dst_name).parameters()), None)
        source = _wrap(model, src_name, SkipSource)
        target = _wrap(model, dst_name, SkipTarget)
        assert isinstance(source, SkipSource) and isinstance(target, SkipTarget)
        target.add_source(source, projection.train(target.training))
        added = [(p, reference) for p in projection.parameters()]
        return ParamMap(added=added), {"src": src_name, "dst": dst_name}

    return run_edit(model, optimizer, inputs, "add_skip", f"{src_name}->{dst_name}", verify,
                    body)
