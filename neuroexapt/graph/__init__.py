"""Tracing models into groups of coupled dimensions (built on torch.fx)."""

from neuroexapt.graph.builtin import register_builtin_handlers
from neuroexapt.graph.cache import graph_cache, invalidate
from neuroexapt.graph.groups import Group, Member
from neuroexapt.graph.handlers import (
    ElementwiseHandler,
    ModuleHandler,
    PerUnitHandler,
    ProducerHandler,
    get_handler,
    list_handlers,
    mark_leaf,
    register_handler,
)
from neuroexapt.graph.layout import Layout, Segment
from neuroexapt.graph.plan import TensorUpdate, UnitPlan
from neuroexapt.graph.trace import ModelGraph, resolve_layer, trace

register_builtin_handlers()

__all__ = [
    "ElementwiseHandler",
    "Group",
    "Layout",
    "Member",
    "ModelGraph",
    "ModuleHandler",
    "PerUnitHandler",
    "ProducerHandler",
    "Segment",
    "TensorUpdate",
    "UnitPlan",
    "get_handler",
    "graph_cache",
    "invalidate",
    "list_handlers",
    "mark_leaf",
    "register_handler",
    "resolve_layer",
    "trace",
]
