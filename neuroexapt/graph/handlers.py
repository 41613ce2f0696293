"""Per-layer handlers: how each module type passes, reads or produces units.

A handler answers two questions for one layer type: while tracing, which groups its tensors
belong to (:meth:`ModuleHandler.propagate`); after an edit, how to update the module's size
attributes from its new tensors (:meth:`ModuleHandler.sync`). Three declarative handlers cover
most custom layers:

* :class:`ElementwiseHandler`: no per-unit tensors, output units = input units (activations).
* :class:`PerUnitHandler`: per-unit tensors, output units = input units (BatchNorm, LayerNorm).
* :class:`ProducerHandler`: reads the input units and produces new ones (Linear, Conv).

Example:
    A custom layer ``Scale`` with a per-channel ``gain`` of shape ``[C]`` on NCHW inputs::

        neuroexapt.register_handler(Scale, PerUnitHandler([("gain", 0)], size_attr="channels",
                                                          feature_dim=1))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from neuroexapt.errors import ConfigError
from neuroexapt.graph.context import BuildContext, NodeLayout
from neuroexapt.graph.groups import Member
from neuroexapt.graph.layout import Layout

logger = logging.getLogger(__name__)

__all__ = [
    "ElementwiseHandler",
    "ModuleHandler",
    "PerUnitHandler",
    "ProducerHandler",
    "get_handler",
    "list_handlers",
    "mark_leaf",
    "register_handler",
    "registry_version",
]


class ModuleHandler:
    """Base class of layer handlers; subclasses override :meth:`propagate` and :meth:`sync`.

    ``keeps_heads``: the layer acts on each element alone (dropout, activations), so units
    split into attention heads pass through it; other layers never see such layouts (their
    groups are frozen before :meth:`propagate` runs).
    """

    keeps_heads: bool = False

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        """Record the module's members in ``ctx`` and return the layout of its output."""
        raise NotImplementedError

    def sync(self, module: nn.Module, sizes: dict[Member, int]) -> None:
        """Update size attributes after resizing; ``sizes`` gives each member's new length."""

    def check_input(
        self, ctx: BuildContext, lay: Layout | None, feature_dim: int, name: str
    ) -> Layout | None:
        """``lay`` when its unit dimension is ``feature_dim``; else freeze it and return None."""
        if lay is None:
            return None
        if lay.dim != feature_dim % lay.ndim:
            ctx.freeze([lay], f"'{name}' reads dim {feature_dim}, units are on dim {lay.dim}")
            return None
        return lay


class ElementwiseHandler(ModuleHandler):
    """A parameter-free layer that keeps units where they are (activations, pooling, dropout).

    Args:
        feature_dim: the dimension the layer treats as channels (pooling: 1), or None when the
            layer acts on every element independently.
    """

    def __init__(self, feature_dim: int | None = None) -> None:
        self.feature_dim = feature_dim
        self.keeps_heads = feature_dim is None

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        lay = ctx.layout_of(node.args[0]) if node.args else None
        if self.feature_dim is None:
            return lay
        return self.check_input(ctx, lay, self.feature_dim, name)


class PerUnitHandler(ModuleHandler):
    """A layer with one entry per unit in some tensors, whose output keeps the input's units.

    Args:
        tensors: (attribute, dim) of every per-unit tensor; missing or None ones are skipped.
        size_attr: attribute holding the number of units (set after a resize), or None.
        feature_dim: dimension of the input that holds the units (BatchNorm 1, LayerNorm -1).
        segments_attr: attribute giving a number of equal segments to keep (GroupNorm groups).
        normalizes: True when the layer computes statistics across the units.
        tuple_size: store the size as a 1-tuple (LayerNorm's ``normalized_shape``).
    """

    def __init__(
        self,
        tensors: Sequence[tuple[str, int]],
        size_attr: str | None,
        feature_dim: int,
        *,
        segments_attr: str | None = None,
        normalizes: bool = False,
        tuple_size: bool = False,
    ) -> None:
        self.tensors = tuple(tensors)
        self.size_attr = size_attr
        self.feature_dim = feature_dim
        self.segments_attr = segments_attr
        self.normalizes = normalizes
        self.tuple_size = tuple_size

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        lay = self.check_input(ctx, ctx.layout_of(node.args[0]), self.feature_dim, name)
        if lay is None:
            return None
        if self.normalizes and lay.single is None:
            ctx.freeze([lay], f"'{name}' normalises over several groups at once", name)
            return None
        for attr, dim in self.tensors:
            if getattr(module, attr, None) is not None:
                ctx.consume(lay, name, attr, dim, "pass")
        ctx.consume(lay, name, "", 0, "pass")  # size attribute, even without tensors
        segments = getattr(module, self.segments_attr) if self.segments_attr else 1
        if segments > 1 or self.normalizes:
            for gid in lay.gids:
                ctx.groups.constrain(gid, segments, name if self.normalizes else None)
        return lay

    def current_size(self, module: nn.Module) -> int:
        """Number of features the module currently expects."""
        value = getattr(module, self.size_attr) if self.size_attr else 0
        return int(value[0] if isinstance(value, tuple | list) else value)

    def sync(self, module: nn.Module, sizes: dict[Member, int]) -> None:
        if self.size_attr is None or not sizes:
            return
        size = next(iter(sizes.values()))
        setattr(module, self.size_attr, (size,) if self.tuple_size else size)


class ProducerHandler(ModuleHandler):
    """A layer that reads units on one dimension and produces new units (Linear, Conv).

    Args:
        in_tensors: (attribute, dim) of tensors that read the input units.
        out_tensors: (attribute, dim) of tensors that compute the output units.
        in_attr: attribute holding the number of input units (None: no input units).
        out_attr: attribute holding the number of output units.
        feature_dim: dimension of input and output that holds the units (Linear -1, Conv 1).
    """

    def __init__(
        self,
        in_tensors: Sequence[tuple[str, int]],
        out_tensors: Sequence[tuple[str, int]],
        in_attr: str | None,
        out_attr: str,
        feature_dim: int,
    ) -> None:
        self.in_tensors = tuple(in_tensors)
        self.out_tensors = tuple(out_tensors)
        self.in_attr = in_attr
        self.out_attr = out_attr
        self.feature_dim = feature_dim

    def propagate(
        self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str
    ) -> NodeLayout:
        if self.in_tensors:
            lay = self.check_input(ctx, ctx.layout_of(node.args[0]), self.feature_dim, name)
            if lay is not None:
                for attr, dim in self.in_tensors:
                    ctx.consume(lay, name, attr, dim, "in")
        return self.output(ctx, node, module, name)

    def output(self, ctx: BuildContext, node: fx.Node, module: nn.Module, name: str) -> Layout:
        """Create the group of the module's output units."""
        shape = ctx.shape_of(node)
        if shape is None:
            raise ConfigError(f"'{name}' did not produce a tensor; its handler does not fit it")
        members = [
            (attr, dim, "out") for attr, dim in self.out_tensors
            if getattr(module, attr, None) is not None
        ]
        dim = self.feature_dim % len(shape)
        return ctx.produce(name, shape[dim], dim, len(shape), members)

    def sync(self, module: nn.Module, sizes: dict[Member, int]) -> None:
        for member, size in sizes.items():
            if member.role == "out":
                setattr(module, self.out_attr, size)
            elif member.role == "in" and self.in_attr is not None:
                setattr(module, self.in_attr, size)


_REGISTRY: dict[type[nn.Module], ModuleHandler] = {}
_LEAVES: set[type[nn.Module]] = set()
_version = 0  # bumped on every change of the registries: cached traces depend on them


def registry_version() -> int:
    """A number that changes whenever a handler is registered or a type is marked as a leaf."""
    return _version


def _bump() -> None:
    global _version
    _version += 1


def register_handler(module_type: type[nn.Module], handler: ModuleHandler) -> None:
    """Register ``handler`` for ``module_type`` (and its subclasses without their own handler).

    The module type is also traced as a leaf: torch.fx does not look inside it.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise ConfigError(f"register_handler expects an nn.Module subclass, got {module_type!r}")
    if not isinstance(handler, ModuleHandler):
        raise ConfigError(
            f"register_handler expects a ModuleHandler instance, got {type(handler).__name__}; "
            "use ElementwiseHandler, PerUnitHandler, ProducerHandler or a subclass"
        )
    _REGISTRY[module_type] = handler
    _bump()
    logger.debug("registered handler %s for %s", type(handler).__name__, module_type.__name__)


def get_handler(module: nn.Module) -> ModuleHandler | None:
    """The handler for ``module``'s type or its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def list_handlers() -> list[str]:
    """Names of the module types that have a handler."""
    return sorted(cls.__name__ for cls in _REGISTRY)


def mark_leaf(module_type: type[nn.Module]) -> None:
    """Trace ``module_type`` as an opaque leaf (torch.fx does not look inside it).

    Use it for layers whose ``forward`` torch.fx cannot trace. Without a handler, the groups
    that reach such a layer cannot be resized, but the rest of the model can.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise ConfigError(f"mark_leaf expects an nn.Module subclass, got {module_type!r}")
    _LEAVES.add(module_type)
    _bump()


_COMPUTE = ("forward", "_conv_forward")  # the methods whose override changes what a layer does


def is_registered_leaf(module: nn.Module) -> bool:
    """True when ``module``'s type, or a base class whose computation it inherits unchanged,
    was registered or marked as a leaf.

    A subclass that only changes ``__init__`` (``class MyConv(nn.Conv2d): pass``,
    transformers' ``EfficientNetDepthwiseConv2d``) computes what its base computes, so the
    base's handler describes it; one that overrides ``forward`` is traced into instead.
    """
    cls = type(module)
    if cls in _REGISTRY or cls in _LEAVES:
        return True
    for base in cls.__mro__[1:]:
        if base in _REGISTRY or base in _LEAVES:
            return all(getattr(cls, name, None) is getattr(base, name, None)
                       for name in _COMPUTE)
    return False


def node_module(root: nn.Module, node: fx.Node) -> Any:
    """The submodule a ``call_module`` node calls."""
    return root.get_submodule(str(node.target))
