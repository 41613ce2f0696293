"""Layout rules for ``call_function`` and ``call_method`` nodes.

Each rule maps the layouts of a node's inputs to the layout of its output. Anything not known
to keep units apart (a matmul, a slice across channels, a reshape with a hard-coded size)
freezes the groups it touches, so an edit can never silently break the model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from neuroexapt.graph.context import BuildContext, NodeLayout
from neuroexapt.graph.heads import matmul_rule, sdpa_rule
from neuroexapt.graph.layout import Layout, Segment
from neuroexapt.graph.nodes import arg as _arg
from neuroexapt.graph.nodes import first as _first
from neuroexapt.graph.nodes import unknown as _unknown

__all__ = ["apply_rule", "flatten_layout"]

Rule = Callable[[BuildContext, fx.Node], NodeLayout]

_UNARY = {
    torch.rsqrt, torch.log, torch.reciprocal, torch.relu, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.neg, torch.sqrt,
    torch.square, torch.clamp, torch.clip, torch.nn.functional.relu, F.relu6, F.gelu, F.silu,
    F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish,
    F.softplus, F.sigmoid, F.tanh, F.dropout, F.alpha_dropout, F.logsigmoid, operator.neg,
    torch.erf, torch.sin, torch.cos,
}
_UNARY_METHODS = {"rsqrt", "reciprocal", "log", "exp_", "sqrt_",
    "relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "square", "clamp", "clip",
    "contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as", "detach",
    "requires_grad_", "relu_", "sigmoid_", "tanh_", "clamp_", "erf", "sin", "cos",
}
_CHANNEL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.dropout1d, F.dropout2d,
    F.dropout3d, F.pad, F.lp_pool2d,
}
_BINARY = {
    operator.pow, torch.pow,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"pow", "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min,
           torch.logsumexp, torch.norm, torch.prod, torch.std, torch.var}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "max", "min", "logsumexp", "norm", "prod",
                   "std", "var"}
# what a reduction across the units does with copies of units (see Group): a mean keeps its
# value when every unit is copied equally, an extremum whatever the copies; the rest change
_REDUCE_KIND = {"mean": "mean", "amax": "extremum", "amin": "extremum", "max": "extremum",
                "min": "extremum"}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "type", "get_device", "item"}


def _binary(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    operands = [a for a in node.args[:2]] + [v for k, v in node.kwargs.items() if k == "other"]
    layouts = [ctx.layout_of(a) for a in operands]
    present = [lay for lay in layouts if lay is not None]
    if not present:
        return None
    out_shape = ctx.shape_of(node)
    for arg, lay in zip(operands, layouts, strict=True):
        if lay is not None or not isinstance(arg, fx.Node):
            continue
        shape = ctx.shape_of(arg)
        if shape is None:
            continue
        if not _attach_constant(ctx, arg, shape, present[0]):
            name = getattr(node.target, "__name__", str(node.target))
            return _unknown(ctx, node, f"'{name}' with a tensor that mixes the units")
    merged = ctx.merge(present, f"node '{node.name}'") if len(present) > 1 else present[0]
    if merged is None:
        return _unknown(ctx, node, "element-wise op on misaligned groups", opaque=False)
    if out_shape is not None and len(out_shape) != merged.ndim:
        return merged.with_dim(merged.dim + len(out_shape) - merged.ndim, len(out_shape))
    return merged


def _attach_constant(
    ctx: BuildContext, arg: fx.Node, shape: tuple[int, ...], lay: Layout
) -> bool:
    """Make a tensor combined element-wise with units a member, or check it broadcasts."""
    dim = lay.dim - (lay.ndim - len(shape))
    if dim < 0 or shape[dim] == 1:
        return True
    if arg.op != "get_attr" or lay.single is None or lay.heads:
        return False
    owner, _, attr = str(arg.target).rpartition(".")
    ctx.consume(lay.with_dim(dim, len(shape)), owner, attr, dim, "pass")
    return True


def flatten_layout(
    ctx: BuildContext, node: fx.Node, source: Any, start: int, end: int
) -> NodeLayout:
    """Layout after flattening dims ``start..end`` of ``source``."""
    lay, shape = ctx.layout_of(source), ctx.shape_of(source)
    if lay is None or shape is None:
        return None
    start, end = start % len(shape), end % len(shape)
    ndim = len(shape) - (end - start)
    if lay.heads:
        return _flatten_heads(ctx, node, lay, shape, start, end)
    if lay.dim < start:
        return lay.with_dim(lay.dim, ndim)
    if lay.dim > end:
        return lay.with_dim(lay.dim - (end - start), ndim)
    if lay.dim != start:
        return _unknown(ctx, node, "flatten that interleaves the units with other dims")
    return lay.scaled(math.prod(shape[start + 1 : end + 1])).with_dim(start, ndim)


def _flatten_heads(ctx: BuildContext, node: fx.Node, lay: Layout, shape: tuple[int, ...],
                   start: int, end: int) -> NodeLayout:
    """Flatten of a tensor split into heads: back to plain units when heads and their
    positions are merged in order (``[b, s, h, d] -> [b, s, h*d]``)."""
    ndim = len(shape) - (end - start)
    dims = [d for d in (lay.dim, lay.inner) if d is not None]
    if all(d < start or d > end for d in dims):
        order = list(range(start)) + [start] * (end - start + 1) + list(
            range(start + 1, start + 1 + len(shape) - end - 1))
        inner = None if lay.inner is None else order[lay.inner]
        return Layout(order[lay.dim], ndim, lay.segments, lay.atom, inner)
    if lay.dim == start and lay.inner == start + 1 and shape[lay.inner] == lay.atom:
        block = math.prod(shape[start + 2 : end + 1])
        return Layout(start, ndim, lay.segments).scaled(block)
    return _unknown(ctx, node, "flatten that mixes attention heads with other dims")


def _flatten(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    return flatten_layout(ctx, node, node.args[0], _arg(node, 1, "start_dim", 0),
                          _arg(node, 2, "end_dim", -1))


def _view_sizes(node: fx.Node) -> tuple[Any, ...]:
    """The sizes a ``view``/``reshape`` node asks for, as written (ints or nodes)."""
    sizes = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("shape"),)
    if len(sizes) == 1 and isinstance(sizes[0], tuple | list):
        sizes = tuple(sizes[0])
    return tuple(sizes)


def _hard_coded(spec: Any) -> bool:
    return isinstance(spec, int) and spec != -1


def _view(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    lay, src, out = _first(ctx, node), ctx.shape_of(node.args[0]), ctx.shape_of(node)
    if lay is None or src is None or out is None:
        return lay
    if src == out:
        return lay
    d = lay.dim
    sizes = _view_sizes(node)
    spec = sizes[d] if d < len(sizes) else None
    if lay.heads:
        return _view_heads(ctx, node, lay, src, out, spec)
    split = _split_heads(ctx, node, lay, src, out, sizes)
    if isinstance(split, Layout):
        return split
    if split is not None:
        return _unknown(ctx, node, split, opaque=False)
    if _hard_coded(spec):
        return _unknown(
            ctx, node,
            f"reshape with the hard-coded size {spec} (use x.flatten({d}) or "
            f"x.view(x.size(0), -1) so it follows the units)",
        )
    for end in range(d, len(src)):
        if out[:d] == src[:d] and out[d] == math.prod(src[d : end + 1]) \
                and out[d + 1 :] == src[end + 1 :]:
            return lay.scaled(math.prod(src[d + 1 : end + 1])).with_dim(d, len(out))
    return _unknown(ctx, node, "reshape that splits or mixes the units")


def _split_heads(ctx: BuildContext, node: fx.Node, lay: Layout, src: tuple[int, ...],
                 out: tuple[int, ...], sizes: tuple[Any, ...]) -> Layout | str | None:
    """``x.view(b, s, -1, head_dim)``: the units split into heads of a written-out size, their
    number following the units. None when the reshape is not such a split, the reason when
    it is one that cannot follow a change of the units."""
    d, seg = lay.dim, lay.single
    if seg is None or seg.block != 1 or len(out) != len(src) + 1 or len(sizes) != len(out):
        return None
    if out[:d] != src[:d] or out[d + 2 :] != src[d + 1 :] or out[d] * out[d + 1] != src[d]:
        return None
    if not _hard_coded(sizes[d + 1]):
        return None  # the head size would follow the units: heads of changing size
    if _hard_coded(sizes[d]):
        return (f"reshape into {sizes[d]} heads written out (write -1 for the number of "
                "heads so it follows the units)")
    assert seg.gid is not None
    ctx.groups.atomize(seg.gid, out[d + 1], f"node '{node.name}'")
    return Layout(d, len(out), lay.segments, out[d + 1], d + 1)


def _view_heads(ctx: BuildContext, node: fx.Node, lay: Layout, src: tuple[int, ...],
                out: tuple[int, ...], spec: Any) -> NodeLayout:
    """A reshape of a tensor split into heads: only merging heads back is followed."""
    d = lay.dim
    if lay.inner == d + 1 and src[d + 1] == lay.atom and len(out) == len(src) - 1 \
            and out[:d] == src[:d] and out[d] == src[d] * src[d + 1] \
            and out[d + 1 :] == src[d + 2 :]:
        if _hard_coded(spec):
            return _unknown(ctx, node, f"merge of attention heads into the hard-coded size "
                                       f"{spec} (write -1 so it follows the heads)",
                            opaque=False)
        return Layout(d, len(out), lay.segments)
    return _unknown(ctx, node, "reshape that mixes attention heads with other dims")


def _cat(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    tensors = list(_arg(node, 0, "tensors"))
    out_shape = ctx.shape_of(node)
    if out_shape is None:
        return None
    dim = _arg(node, 1, "dim", 0) % len(out_shape)
    layouts = [ctx.layout_of(t) for t in tensors]
    if all(lay is None for lay in layouts):
        return None
    ref = next(lay for lay in layouts if lay is not None)
    if any(lay is not None and lay.heads and lay.dim == dim for lay in layouts):
        return _unknown(ctx, node, "concatenation of attention heads", opaque=False)
    if ref.dim != dim:
        present = [lay for lay in layouts if lay is not None]
        merged = ctx.merge(present, f"node '{node.name}'") if len(present) > 1 else ref
        for t, lay in zip(tensors, layouts, strict=True):
            # a learned token joined along another dim (ViT's class token): its entries
            # follow the units
            source = _parameter_source(t) if lay is None else None
            shape = ctx.shape_of(source) if source is not None else None
            if lay is None and (merged is None or shape is None
                                or not _attach_constant(ctx, source, shape, merged)):
                return _unknown(ctx, node, "concatenation along a non-unit dim", opaque=False)
        if merged is None:
            return _unknown(ctx, node, "concatenation along a non-unit dim", opaque=False)
        return merged
    segments: list[Segment] = []
    for t, lay in zip(tensors, layouts, strict=True):
        if lay is not None:
            if lay.dim != dim:
                return _unknown(ctx, node, "concatenation of misaligned units", opaque=False)
            segments.extend(lay.segments)
        else:
            shape = ctx.shape_of(t)
            if shape is None:
                return _unknown(ctx, node, "concatenation of an untraced tensor", opaque=False)
            segments.append(Segment(None, shape[dim]))
    return Layout(dim, len(out_shape), tuple(segments))


_BROADCASTS = {"expand", "expand_as", "repeat", "to", "type_as", "contiguous"}


def _parameter_source(arg: Any) -> fx.Node | None:
    """The ``get_attr`` node a tensor is broadcast from (``param.expand(b, -1, -1)``)."""
    while isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            return arg
        if arg.op == "call_method" and arg.target in _BROADCASTS:
            arg = arg.args[0]
        else:
            return None
    return None


def _reduce(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    lay = _first(ctx, node)
    if lay is None:
        return None
    name = getattr(node.target, "__name__", str(node.target))
    if name == "norm":  # norm(input, p, dim, keepdim)
        dims, keep = _arg(node, 2, "dim"), bool(_arg(node, 3, "keepdim", False))
    elif name in ("std", "var"):  # (input, dim, unbiased | correction=..., keepdim)
        dims, keep = _arg(node, 1, "dim"), bool(node.kwargs.get("keepdim", False))
    else:
        dims, keep = _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False))
    if name in ("max", "min") and isinstance(dims, fx.Node):
        return _binary(ctx, node)  # max(a, b) of two tensors is element-wise
    tuple_out = name in ("max", "min") and dims is not None  # (values, indices)
    if dims is None:  # every dim
        dims = list(range(lay.ndim))
    dims = [d % lay.ndim for d in (dims if isinstance(dims, tuple | list) else [dims])]
    if lay.dim in dims:
        for gid in lay.gids:
            ctx.groups.reduce(gid, _REDUCE_KIND.get(name, "sum"),
                              f"'{name}' at node '{node.name}'")
        return (None, None) if tuple_out else None
    out = _without_dims(lay, dims, keep)
    return (out, None) if tuple_out else out


def _without_dims(lay: Layout, dims: list[int], keep: bool) -> Layout:
    """``lay`` after reducing ``dims`` (not the units' dim); positions inside heads that are
    reduced are gone (``inner`` None)."""
    inner = None if lay.inner is None or lay.inner in dims else lay.inner
    if keep:
        return Layout(lay.dim, lay.ndim, lay.segments, lay.atom, inner)

    def shift(x: int) -> int:
        return x - sum(1 for d in dims if d < x)

    return Layout(shift(lay.dim), lay.ndim - len(dims), lay.segments, lay.atom,
                  None if inner is None else shift(inner))


def _transpose(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    lay = _first(ctx, node)
    if lay is None:
        return None
    a, b = (_arg(node, 1, "dim0") % lay.ndim, _arg(node, 2, "dim1") % lay.ndim)
    order = list(range(lay.ndim))
    order[a], order[b] = order[b], order[a]
    return lay.moved(order)


def _permute(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    lay = _first(ctx, node)
    if lay is None:
        return None
    dims = node.args[1:] if len(node.args) > 2 else node.args[1]
    order = [d % lay.ndim for d in (dims if isinstance(dims, tuple | list) else [dims])]
    return lay.moved(order)


def _movedim(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    lay = _first(ctx, node)
    src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
    if lay is None or not isinstance(src, int) or not isinstance(dst, int):
        return lay if lay is None else _unknown(ctx, node, "movedim of several dims")
    order = list(range(lay.ndim))
    order.insert(dst % lay.ndim, order.pop(src % lay.ndim))
    return lay.moved(order)


def _getitem(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    src, index = node.args
    value = ctx.layouts.get(src) if isinstance(src, fx.Node) else None
    if isinstance(value, tuple):
        return value[index] if isinstance(index, int) else None
    if not isinstance(value, Layout):
        return None
    idx = list(index) if isinstance(index, tuple) else [index]
    ellipses = [p for p, i in enumerate(idx) if i is Ellipsis]
    if any(i is None for i in idx) or len(ellipses) > 1:
        return _unknown(ctx, node, "indexing with None or several '...'")
    if ellipses:
        p = ellipses[0]
        idx[p : p + 1] = [slice(None)] * (value.ndim - len(idx) + 1)
    if len(idx) > value.ndim:
        return _unknown(ctx, node, "indexing with more indices than dims")
    for pos, i in enumerate(idx):
        if not isinstance(i, int | slice):
            return _unknown(ctx, node, "advanced indexing")
        if pos == value.dim and i != slice(None):
            return _unknown(ctx, node, "indexing that selects some of the units")
    gone = [pos for pos, i in enumerate(idx) if isinstance(i, int)]
    return _without_dims(value, gone, keep=False)


def _split(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    lay = _first(ctx, node)
    if lay is None:
        return None
    dim = _arg(node, 2, "dim", 0) % lay.ndim
    if dim == lay.dim:
        return _unknown(ctx, node, f"'{node.target}' along the units")
    meta = ctx.meta_of(node)
    count = len(meta) if isinstance(meta, tuple | list) else 0
    return tuple(lay for _ in range(count))


def _unary(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    return _first(ctx, node)


def _channelwise(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    lay = _first(ctx, node)
    if lay is not None and lay.dim != 1:
        return _unknown(ctx, node, f"'{node.target}' on units outside dim 1")
    return lay


def _softmax(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    lay = _first(ctx, node)
    dim = _arg(node, 1, "dim")
    if lay is not None and (dim is None or dim % lay.ndim == lay.dim):
        return _unknown(ctx, node, f"'{node.target}' across the units")
    return lay


def _get_attr_owner(arg: Any) -> tuple[str, str] | None:
    """(module, attribute) of a ``get_attr`` node's parameter, else None."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    owner, _, attr = str(arg.target).rpartition(".")
    return owner, attr


def _layer_norm(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    """``F.layer_norm(x, shape, weight, bias, eps)`` as a layer's own forward calls it
    (torchvision's ``LayerNorm2d``, transformers' channels-first LayerNorms)."""
    lay = _first(ctx, node)
    if lay is None:
        return None
    shape = _arg(node, 1, "normalized_shape")
    count = len(shape) if isinstance(shape, tuple | list) else 1
    if lay.dim < lay.ndim - count:
        return lay  # the units are not normalised over: they pass through
    if count != 1 or lay.dim != lay.ndim - 1 or lay.single is None:
        return _unknown(ctx, node, "'layer_norm' over the units and other dims")
    owners = {_get_attr_owner(_arg(node, i, key)) for i, key in ((2, "weight"), (3, "bias"))
              if _arg(node, i, key) is not None}
    if None in owners:
        return _unknown(ctx, node, "'layer_norm' with weights computed in forward")
    for owner, attr in sorted(o for o in owners if o is not None):
        ctx.consume(lay, owner, attr, 0, "pass")
    for owner in sorted({o for o, _ in owners if o is not None}):
        ctx.consume(lay, owner, "", 0, "pass")  # its size attribute (normalized_shape)
    for gid in lay.gids:
        ctx.groups.constrain(gid, 1, f"'layer_norm' at node '{node.name}'")
    return lay


_FUNCTION_RULES: dict[Any, Rule] = {}
_FUNCTION_RULES.update({f: _unary for f in _UNARY})
_FUNCTION_RULES.update({f: _channelwise for f in _CHANNEL_FUNCS})
_FUNCTION_RULES.update({f: _binary for f in _BINARY})
_FUNCTION_RULES.update({f: _reduce for f in _REDUCE})
_FUNCTION_RULES.update({
    torch.flatten: _flatten, torch.reshape: _view, torch.cat: _cat, torch.concat: _cat,
    torch.transpose: _transpose, torch.permute: _permute, torch.movedim: _movedim,
    operator.getitem: _getitem,
    torch.split: _split, torch.chunk: _split, torch.softmax: _softmax, F.softmax: _softmax,
    F.log_softmax: _softmax, F.layer_norm: _layer_norm,
    torch.matmul: matmul_rule, operator.matmul: matmul_rule,
    F.scaled_dot_product_attention: sdpa_rule,
})
_METHOD_RULES: dict[str, Rule] = {m: _unary for m in _UNARY_METHODS}
_METHOD_RULES.update({m: _binary for m in _BINARY_METHODS})
_METHOD_RULES.update({m: _reduce for m in _REDUCE_METHODS})
_METHOD_RULES.update({
    "flatten": _flatten, "view": _view, "reshape": _view, "transpose": _transpose,
    "permute": _permute, "movedim": _movedim, "split": _split, "chunk": _split, "softmax": _softmax,
    "log_softmax": _softmax, "matmul": matmul_rule,
})
# the rules that know tensors split into attention heads; any other op on them is refused
_HEAD_RULES = {_unary, _binary, _view, _flatten, _transpose, _permute, _movedim, _getitem,
               _cat, _split, _softmax, _reduce, matmul_rule, sdpa_rule}


# functions of other libraries, by (module, name): NeuroExapt never imports them
_THIRD_PARTY: dict[tuple[str | None, str | None], Rule] = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): _unary,  # drops whole samples
}


def apply_rule(ctx: BuildContext, node: fx.Node) -> NodeLayout:
    """Layout of a ``call_function`` / ``call_method`` node's output."""
    if node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
        return None
    if node.target is getattr:
        return None
    table = _FUNCTION_RULES if node.op == "call_function" else _METHOD_RULES
    rule = table.get(node.target)
    if rule is None and node.op == "call_function":
        rule = _THIRD_PARTY.get((getattr(node.target, "__module__", None),
                                 getattr(node.target, "__name__", None)))
    if rule is not None and rule not in _HEAD_RULES and any(
            lay.heads for lay in ctx.layouts_in((node.args, node.kwargs))):
        name = getattr(node.target, "__name__", str(node.target))
        return _unknown(ctx, node, f"'{name}' on attention heads")
    if rule is not None:
        return rule(ctx, node)
    if not ctx.layouts_in((node.args, node.kwargs)):
        return None
    name = getattr(node.target, "__name__", str(node.target))
    return _unknown(ctx, node, f"operation '{name}' with no layout rule")
