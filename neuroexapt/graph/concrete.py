"""Tracing with concrete values: models that torch.fx's symbolic tracing cannot follow.

Symbolic tracing fails on Python control flow that reads tensors (``if x.shape[1] != c``,
``int(x.shape[-1])``, iterating over a tensor), and on forwards behind ``*args, **kwargs``
wrappers (Hugging Face transformers 5 wraps every model's ``forward`` so). The
:class:`ConcreteTracer` runs the model on the example inputs while it records: every proxy
carries the value it has on those inputs, so conditions, ``int()``, ``len()``, iteration,
``x.dtype`` and ``torch.finfo`` resolve as they did on the real run, and results that are not
tensors (sizes, dtypes, flags) become plain Python values that leave no node. Sizes read from
shapes stay symbolic (:class:`SizeInt`): ``x.view(b, s, -1, d)`` keeps ``b`` and ``s`` tied to
the tensors they came from, so only sizes that are truly constant in the code look constant.

The graph is specialised to the example inputs' shapes and to the branches they take, like
``torch.jit.trace``; the library traces again for other shapes (its cache is keyed by them).
Modules built inside ``forward`` (``nn.ReLU()(x)``) are inlined. Outputs that are dicts
(``ModelOutput``) become the tuple of their values.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["ConcreteTracer", "concrete_trace", "strip_root"]

_ROOT = "model"  # the attribute of the root wrapper holding the model


def _has_tensor(value: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in tree_flatten(value)[0])


class SizeInt(int):
    """An int read from a tensor's shape: C code sees the int, the graph sees its node."""

    node: fx.Node

    @staticmethod
    def make(value: int, node: fx.Node) -> SizeInt:
        out = SizeInt(value)
        out.node = node
        return out

    def _op(self, op: Callable[[Any, Any], Any], other: Any, reverse: bool = False) -> Any:
        value = op(other, int(self)) if reverse else op(int(self), other)
        if not isinstance(other, int) or isinstance(other, bool) or not isinstance(value, int):
            return value
        b = other.node if isinstance(other, SizeInt) else int(other)
        args = (b, self.node) if reverse else (self.node, b)
        return SizeInt.make(value, self.node.graph.call_function(op, args))

    def __add__(self, o: Any) -> Any:
        return self._op(operator.add, o)

    def __radd__(self, o: Any) -> Any:
        return self._op(operator.add, o, True)

    def __sub__(self, o: Any) -> Any:
        return self._op(operator.sub, o)

    def __rsub__(self, o: Any) -> Any:
        return self._op(operator.sub, o, True)

    def __mul__(self, o: Any) -> Any:
        return self._op(operator.mul, o)

    def __rmul__(self, o: Any) -> Any:
        return self._op(operator.mul, o, True)

    def __floordiv__(self, o: Any) -> Any:
        return self._op(operator.floordiv, o)

    def __rfloordiv__(self, o: Any) -> Any:
        return self._op(operator.floordiv, o, True)

    def __neg__(self) -> Any:
        return SizeInt.make(-int(self), self.node.graph.call_function(operator.neg,
                                                                      (self.node,)))


def _shape_of(p: ConcreteProxy, dim: int | None = None) -> Any:
    shape = p.value.shape
    graph = p.node.graph
    if dim is not None:
        return SizeInt.make(shape[dim], graph.call_method("size", (p.node, dim)))
    node = graph.call_method("size", (p.node,))
    return tuple(SizeInt.make(v, graph.call_function(operator.getitem, (node, i)))
                 for i, v in enumerate(shape))


class ConcreteProxy(fx.Proxy):
    """A proxy that also holds its value on the example inputs."""

    value: Any = None

    def __bool__(self) -> bool:
        return bool(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __index__(self) -> int:
        return int(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __contains__(self, item: Any) -> bool:
        return item in self.value

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.value, dict):
            return iter(self.value)
        return (self[i] for i in range(len(self.value)))

    def keys(self) -> Any:
        """The keys of a dict value."""
        return self.value.keys()

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") or k in ("value", "node", "tracer"):
            raise AttributeError(k)
        attr = getattr(self.value, k)
        if k == "shape" and isinstance(self.value, torch.Tensor):
            return _shape_of(self)
        if callable(attr):
            return _Method(self, k)
        if isinstance(attr, torch.Tensor):  # .T, .mT: a node
            return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        return attr  # dtype, device, ndim, is_cuda: concrete


class _Method:
    """A method of a traced value, recorded when called."""

    def __init__(self, root: ConcreteProxy, name: str) -> None:
        self.root, self.name = root, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.name == "size" and isinstance(self.root.value, torch.Tensor) and not kwargs:
            return _shape_of(self.root, *[int(a) for a in args])
        return self.root.tracer.create_proxy("call_method", self.name, (self.root, *args),
                                             kwargs)


def concrete_tracer(base: type[fx.Tracer]) -> type[fx.Tracer]:
    """``base`` (an fx.Tracer class) extended to carry concrete values."""

    class ConcreteTracer(base):  # type: ignore[valid-type, misc]
        """fx tracer whose proxies carry the example's values (see the module docstring)."""

        def __init__(self, *args: Any, inputs: Sequence[Any] = (), **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.inputs = list(inputs)
            self._placeholders = 0
            self._computing = 0

        def proxy(self, node: fx.Node) -> ConcreteProxy:
            return ConcreteProxy(node, self)

        @staticmethod
        def _values(a: Any) -> Any:
            return tree_map(lambda x: x.value if isinstance(x, ConcreteProxy) else x, a,
                            is_leaf=lambda x: isinstance(x, ConcreteProxy))

        def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, name: Any = None,
                         type_expr: Any = None, proxy_factory_fn: Any = None) -> Any:
            if kind == "output":
                return super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                            proxy_factory_fn)
            if kind == "placeholder":
                proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                             proxy_factory_fn)
                proxy.value = self.inputs[self._placeholders]
                self._placeholders += 1
                return proxy
            va, vk = self._values(args), self._values(kwargs)
            self._computing += 1
            try:
                if kind == "call_function":
                    value = target(*va, **vk)
                elif kind == "call_method":
                    value = getattr(va[0], target)(*va[1:], **vk)
                elif kind == "call_module":  # forward itself: the model's hooks stay quiet
                    value = self.root.get_submodule(str(target)).forward(*va, **vk)
                else:  # get_attr
                    value = self.root
                    for atom in str(target).split("."):
                        value = getattr(value, atom)
            finally:
                self._computing -= 1
            if kind in ("call_function", "call_method") and not _has_tensor(value):
                return value  # sizes, dtypes, flags, None: plain values, no node
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                         proxy_factory_fn)
            proxy.value = value
            return proxy

        def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any,
                        kwargs: Any) -> Any:
            if self._computing:  # computing a leaf's value: run it for real
                return forward(*args, **kwargs)
            try:
                self.path_of_module(m)
            except NameError:  # built inside forward (nn.ReLU()(x)): inline it
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

        def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Any) -> Any:
            if self._computing:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        def create_arg(self, a: Any) -> Any:
            if isinstance(a, SizeInt):
                return a.node
            if isinstance(a, torch.Size):
                return tuple(a)
            return super().create_arg(a)

    return ConcreteTracer


ConcreteTracer = concrete_tracer(fx.Tracer)


class _Root(nn.Module):
    """Calls the model on positional inputs and flattens dict outputs into tuples."""

    def __init__(self, model: nn.Module, extra: dict[str, Any]) -> None:
        super().__init__()
        setattr(self, _ROOT, model)
        self.extra = extra

    def run(self, *inputs: Any) -> Any:
        out = getattr(self, _ROOT)(*inputs, **self.extra)
        if isinstance(out, dict):  # ModelOutput and plain dicts
            return tuple(out.values())
        return out


def _root_for(model: nn.Module, count: int) -> nn.Module:
    """A root module whose ``forward`` takes exactly ``count`` positional inputs (fx reads the
    names of a forward's parameters; a ``*args`` forward gives it one)."""
    names = [f"input_{i}" for i in range(count)]
    namespace: dict[str, Any] = {}
    exec(  # a fixed template: only the number of parameters varies
        f"def forward(self, {', '.join(names)}):\n    return self.run({', '.join(names)})\n",
        namespace)
    extra: dict[str, Any] = {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params:  # transformers: a key/value cache is not an output to freeze
        extra["use_cache"] = False
    cls = type("ConcreteRoot", (_Root,), {"forward": namespace["forward"]})
    return cls(model, extra)


def _impure(node: fx.Node) -> bool:
    target = str(node.target)
    if node.op == "call_method" and target.endswith("_") and not target.endswith("__"):
        return True  # in-place methods
    return node.is_impure()


def strip_root(graph: fx.Graph) -> None:
    """Name modules and attributes as the model names them (drop the root's prefix); the
    GraphModule built on the root no longer runs afterwards."""
    prefix = _ROOT + "."
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and str(node.target).startswith(prefix):
            node.target = str(node.target)[len(prefix):]
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: ((p[len(prefix):] if p.startswith(prefix) else p), c)
                for k, (p, c) in stack.items() if p not in ("", _ROOT)}


def concrete_trace(model: nn.Module, inputs: tuple[Any, ...], tracer_class: type[fx.Tracer],
                   *tracer_args: Any) -> fx.GraphModule:
    """Trace ``model(*inputs)`` with concrete values into a GraphModule on a root that wraps
    the model (its targets start with ``model.``: see :func:`strip_root`)."""
    root = _root_for(model, len(inputs))
    tracer = concrete_tracer(tracer_class)(*tracer_args, inputs=inputs)
    with torch.no_grad():
        graph = tracer.trace(root)
    gm = fx.GraphModule(tracer.root, graph)
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    gm.recompile()
    return gm
