"""Tracing a model with torch.fx into its groups of coupled dimensions."""

from __future__ import annotations

import difflib
import inspect
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from neuroexapt.errors import LayerNotFoundError, TraceError, UnsupportedModuleError
from neuroexapt.graph.cache import cache_key, lookup, store
from neuroexapt.graph.concrete import concrete_trace, strip_root
from neuroexapt.graph.context import BuildContext, NodeLayout
from neuroexapt.graph.groups import Group, Member
from neuroexapt.graph.handlers import get_handler, is_registered_leaf
from neuroexapt.graph.layout import Layout, Segment
from neuroexapt.graph.rules import apply_rule
from neuroexapt.graph.thirdparty import register_third_party
from neuroexapt.graph.transformer import plain_forward
from neuroexapt.graph.wrappers import accepts_wrapped, wrapper_prefixes

logger = logging.getLogger(__name__)

__all__ = ["ModelGraph", "in_model_dtype", "resolve_layer", "trace"]

# set on a model while it holds relaxed choices (neuroexapt.relax): edits refuse it
RELAXED_ATTR = "_neuroexapt_relax_hook"

_HOW_TO_REGISTER = (
    "register a handler with neuroexapt.register_handler(<LayerType>, "
    "neuroexapt.graph.PerUnitHandler(...) | ProducerHandler(...) | ElementwiseHandler())"
)


class _Tracer(fx.Tracer):
    """fx tracer that keeps registered and user-marked layer types as leaves."""

    def __init__(self, leaf_modules: Sequence[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {t for t in leaf_modules if isinstance(t, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if is_registered_leaf(m):
            return True
        if plain_forward(m) is not None:
            return False  # PyTorch's transformer layers: traced through (graph/transformer.py)
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        plain = plain_forward(m)  # None for all but PyTorch's transformer layers
        if plain is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = plain
        return super().call_module(m, forward, args, kwargs)


class ModelGraph:
    """A traced model with the layout of every tensor and its groups of coupled dimensions.

    Read-only: inside :func:`~neuroexapt.graph.graph_cache` one graph is shared by every
    caller that traces the unchanged model.

    Example:
        >>> g = neuroexapt.trace(model, (torch.randn(2, 3, 32, 32),))
        >>> g.group_of("features.0")  # the channels produced by the first conv
        Group(id=0, size=32, producers=['features.0'], members=7, resizable)
    """

    def __init__(
        self, model: nn.Module, graph: fx.Graph, groups: list[Group],
        layouts: dict[fx.Node, NodeLayout], unsupported: dict[str, str],
    ) -> None:
        self.model = model
        self.graph = graph
        self.groups = groups
        self.layouts = layouts
        self.unsupported = unsupported
        calls: dict[str, list[fx.Node]] = defaultdict(list)
        for node in graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)].append(node)
        self.calls = dict(calls)  # a plain dict: reading an unknown layer adds no entry

    def node_of(self, layer: str) -> fx.Node:
        """The single ``call_module`` node of ``layer``; refuses layers called 0 or 2+ times."""
        nodes = self.calls.get(layer, [])
        if not nodes:
            resolve_layer(self.model, layer)  # a clear LayerNotFoundError for unknown names
        if len(nodes) != 1:
            what = "never called in forward" if not nodes else f"called {len(nodes)} times"
            raise TraceError(
                f"layer '{layer}' is {what}; an edit needs a layer called exactly once "
                "(leaf modules only; containers are traced through)"
            )
        return nodes[0]

    def output_layout(self, layer: str) -> Layout:
        """The layout of ``layer``'s output (the first element for tuple outputs)."""
        value = self.layouts.get(self.node_of(layer))
        if isinstance(value, tuple):
            value = value[0] if value else None
        if not isinstance(value, Layout):
            reason = self.unsupported.get(layer)
            if reason:
                raise UnsupportedModuleError(f"{reason}; {_HOW_TO_REGISTER}")
            raise TraceError(f"layer '{layer}' outputs no resizable units")
        return value

    def group_of(self, layer: str) -> Group:
        """The group of units output by ``layer``."""
        lay = self.output_layout(layer)
        seg = lay.single
        if seg is None:
            raise TraceError(
                f"the output of '{layer}' spans several groups (a concatenation, or a residual "
                "addition with one); edit the layers that produce those groups instead"
            )
        assert seg.gid is not None
        return self.groups[seg.gid]

    def produces_output(self, layer: str) -> bool:
        """Whether the units of ``layer`` are (tied to) the model's output."""
        try:
            return self.group_of(layer).output
        except (TraceError, UnsupportedModuleError):
            return False

    def describe(self) -> str:
        """A human-readable table of the groups."""
        lines = [f"{'id':>3}  {'size':>5}  {'state':<10}  producers / reason"]
        for g in self.groups:
            state = "resizable" if g.resizable else "frozen"
            detail = ", ".join(g.producers) if g.resizable else "; ".join(g.frozen)
            lines.append(f"{g.id:>3}  {g.size:>5}  {state:<10}  {detail}")
        return "\n".join(lines)


def resolve_layer(model: nn.Module, name: str) -> str:
    """Check that ``name`` is a module of ``model`` and see through NeuroExapt's wrappers."""
    if not isinstance(name, str):
        raise LayerNotFoundError(f"layer names are strings like 'layer1.0.conv1', got {name!r}")
    modules = dict(model.named_modules())
    if name not in modules:
        name = next((n for n in wrapper_prefixes(name) if n in modules), name)
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise LayerNotFoundError(
            f"model {type(model).__name__} has no layer '{name}'{hint} "
            "(names are those of model.named_modules())"
        )
    module = modules[name]
    inner = getattr(module, "_neuroexapt_inner", None)
    while inner is not None:
        name = f"{name}.{inner}" if name else inner
        module = modules[name]
        inner = getattr(module, "_neuroexapt_inner", None)
    return name


def in_model_dtype(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``inputs`` with floating tensors cast to the model's floating dtype.

    A float64 or half model is often given float32 example inputs (``torch.randn``); when all
    of the model's floating parameters and buffers share one dtype, floating inputs are cast
    to it. Models of mixed precision get their inputs unchanged.
    """
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if len(dtypes) != 1:
        return inputs
    (dtype,) = dtypes
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                 and x.dtype != dtype else x for x in inputs)


@contextmanager
def frozen_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` in eval mode without gradients, restoring every module's mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@accepts_wrapped
def trace(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> ModelGraph:
    """Trace ``model`` and find its groups of coupled dimensions.

    Args:
        model: any ``nn.Module`` that torch.fx can trace.
        example_inputs: positional inputs for one forward pass (a tensor or a tuple).
        leaf_modules: module types or names to keep as opaque leaves for this trace (for
            every edit, use ``neuroexapt.mark_leaf(Type)``); they need a handler
            (``neuroexapt.register_handler``) for the groups they touch to be resizable.

    Returns:
        The :class:`ModelGraph`; inside :func:`~neuroexapt.graph.graph_cache`, the one already
        built when the model, the inputs' shapes and ``leaf_modules`` are unchanged.

    Raises:
        TraceError: torch.fx cannot trace the model, or it fails on ``example_inputs``.
    """
    register_third_party()
    if getattr(model, RELAXED_ATTR, None) is not None:
        raise TraceError(f"{type(model).__name__} has relaxed choices (neuroexapt.relax): "
                         "discretize it first (neuroexapt.relax.discretize(model)), then edit")
    inputs = in_model_dtype(model, (example_inputs,) if isinstance(
        example_inputs, torch.Tensor) else tuple(example_inputs))
    leaf_modules = tuple(leaf_modules)  # read twice below: by the key and by the tracer
    key = cache_key(model, inputs, leaf_modules)
    graph = lookup(model, key) if key is not None else None
    if graph is None:
        graph = _trace(model, inputs, leaf_modules)
        if key is not None:
            store(model, key, graph)
    return graph


def _trace(
    model: nn.Module, inputs: tuple[Any, ...], leaf_modules: Sequence[type[nn.Module] | str]
) -> ModelGraph:
    """Trace with torch.fx, propagate shapes and build the groups (no cache).

    Symbolic tracing first; a model it cannot follow (control flow on tensors, a forward
    behind ``*args, **kwargs``) is traced again with the example inputs' concrete values
    (:mod:`neuroexapt.graph.concrete`).
    """
    tracer = _Tracer(leaf_modules)
    concrete = False
    try:
        graph = tracer.trace(model, concrete_args=_defaults_after(model, len(inputs)))
        gm = fx.GraphModule(tracer.root, graph)
    except Exception as symbolic:  # fx raises many types: report them all the same way
        try:
            with frozen_mode(model):
                gm = concrete_trace(model, inputs, _Tracer, leaf_modules)
        except Exception as e:
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__}: {type(symbolic).__name__}: "
                f"{symbolic}; tracing it on example_inputs failed too: {type(e).__name__}: "
                f"{e}. Move the code it cannot follow into a submodule and mark its type "
                "with neuroexapt.mark_leaf(Type) or pass it in leaf_modules= to trace (then, "
                f"to resize through it, {_HOW_TO_REGISTER})"
            ) from e
        concrete = True
        logger.debug("traced %s with concrete values (symbolic tracing failed: %s)",
                     type(model).__name__, symbolic)
    with frozen_mode(model):
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as e:
            raise TraceError(
                f"running the traced {type(model).__name__} on example_inputs failed: "
                f"{type(e).__name__}: {e}. Pass inputs the model accepts"
            ) from e
    if concrete:
        strip_root(gm.graph)
    return _build(model, gm.graph)


def _defaults_after(model: nn.Module, given: int) -> dict[str, Any] | None:
    """The defaults of the forward's parameters after the ``given`` example inputs: traced
    as those constants (``labels=None`` takes the branch the example inputs take)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = {p.name: p.default for p in positional[given:] if p.default is not p.empty}
    return rest or None


def _build(model: nn.Module, graph: fx.Graph) -> ModelGraph:
    ctx = BuildContext()
    unsupported: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            ctx.layouts[node] = _call_module(ctx, model, node, unsupported)
        elif node.op in ("call_function", "call_method"):
            ctx.layouts[node] = apply_rule(ctx, node)
        elif node.op == "output":
            for lay in ctx.layouts_in(node.args):
                for gid in lay.gids:
                    ctx.groups.mark_output(gid)
    _couple_shared_tensors(ctx, model)
    refined = dict(ctx.groups.refined)
    groups, mapping = ctx.groups.finish()
    layouts = {n: _renumber(_expand(v, refined), mapping) for n, v in ctx.layouts.items()}
    logger.debug("traced %s: %d groups", type(model).__name__, len(groups))
    return ModelGraph(model, graph, groups, layouts, unsupported)


def _call_module(
    ctx: BuildContext, model: nn.Module, node: fx.Node, unsupported: dict[str, str]
) -> NodeLayout:
    name = str(node.target)
    module = model.get_submodule(name)
    handler = get_handler(module)
    if handler is None:
        reason = f"no handler for {type(module).__name__} '{name}'"
        unsupported[name] = reason
        ctx.freeze(ctx.layouts_in((node.args, node.kwargs)), reason, name)
        return None
    # units split into attention heads reach only layers that keep them: others freeze them
    # and see no units there
    hidden: dict[fx.Node, NodeLayout] = {}
    if not handler.keeps_heads:
        for n in node.all_input_nodes:
            lay = ctx.layout_of(n)
            if lay is not None and lay.heads:
                ctx.freeze([lay], f"attention heads reach '{name}' ({type(module).__name__})",
                           name)
                hidden[n] = ctx.layouts.pop(n)
    try:
        return handler.propagate(ctx, node, module, name)
    except (TraceError, UnsupportedModuleError):
        raise
    except Exception as e:
        raise TraceError(
            f"handler {type(handler).__name__} failed on '{name}' ({type(module).__name__}): "
            f"{type(e).__name__}: {e}"
        ) from e
    finally:
        ctx.layouts.update(hidden)


def _couple_shared_tensors(ctx: BuildContext, model: nn.Module) -> None:
    """Groups that resize the same slice of one tensor are one group.

    The tensor is found by identity, so this covers a module called twice and tied weights
    (an output layer sharing its weight with the embedding, a weight shared across blocks):
    an edit then resizes the shared tensor once, and every module holding it gets the new one.
    """
    owners: dict[tuple[int, int, int], tuple[int, str]] = {}
    for gid in range(len(ctx.groups._groups)):
        if ctx.groups.find(gid) != gid:
            continue
        for m in list(ctx.groups.get(gid).members):
            tensor = _tensor_of(model, m)
            if tensor is None:
                continue
            key = (id(tensor), m.dim, m.offset)
            if key in owners:
                first, path = owners[key]
                why = (f"shared tensor '{m.path}'" if path == m.path
                       else f"tied weights '{path}' and '{m.path}'")
                ctx.groups.union(first, gid, why)
            else:
                owners[key] = (gid, m.path)


def _tensor_of(model: nn.Module, m: Member) -> torch.Tensor | None:
    """The tensor a member resizes, or None (attribute-only and custom members)."""
    if not m.tensor or m.role == "custom":
        return None
    try:
        owner = model.get_submodule(m.module) if m.module else model
        head, _, attr = m.tensor.rpartition(".")
        value = getattr(owner.get_submodule(head) if head else owner, attr, None)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _expand(value: NodeLayout, refined: dict[int, list[tuple[int | None, int]]]) -> NodeLayout:
    """Replace segments of groups split by a concatenation with their pieces."""
    if isinstance(value, tuple):
        return tuple(_expand(v, refined) for v in value)
    if not isinstance(value, Layout) or not any(s.gid in refined for s in value.segments):
        return value
    segs: list[Segment] = []
    for s in value.segments:
        if s.gid in refined:
            pieces = [Segment(g, units, s.block) for g, units in refined[s.gid]]
            segs.extend(_expand(Layout(value.dim, value.ndim, tuple(pieces)), refined).segments)
        else:
            segs.append(s)
    return value.with_segments(tuple(segs))


def _renumber(value: NodeLayout, mapping: dict[int, int]) -> NodeLayout:
    if isinstance(value, tuple):
        return tuple(_renumber(v, mapping) for v in value)
    if isinstance(value, Layout):
        segs = tuple(
            Segment(mapping[s.gid] if s.gid is not None else None, s.units, s.block)
            for s in value.segments
        )
        return value.with_segments(segs)
    return value
