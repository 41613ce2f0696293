"""NeuroExapt: neural networks that change their own architecture while they train.

The core API edits a live PyTorch model in place, keeping its function and its optimizer's
state: :func:`widen`, :func:`narrow`, :func:`deepen`, :func:`add_skip`, :func:`remove_block`,
built on :func:`trace`, which finds the groups of tensor dimensions that must change together
(:func:`graph_cache` reuses one trace while the model does not change).
"""

import logging

from neuroexapt import errors, metrics, optim
from neuroexapt.graph import (
    ElementwiseHandler,
    ModelGraph,
    PerUnitHandler,
    ProducerHandler,
    graph_cache,
    list_handlers,
    mark_leaf,
    register_handler,
    trace,
)
from neuroexapt.metrics import analyze
from neuroexapt.metrics.cost import count_macs, measure_latency
from neuroexapt.ops import (
    Checkpoint,
    EditRecord,
    add_skip,
    deepen,
    get_history,
    load,
    narrow,
    remove_block,
    restore,
    save,
    widen,
)
from neuroexapt.policy.pruning import PruneResult, prune_to
from neuroexapt.train.facade import NeuroExapt
from neuroexapt.train.trainer import Trainer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "EditRecord",
    "ElementwiseHandler",
    "ModelGraph",
    "NeuroExapt",
    "PerUnitHandler",
    "ProducerHandler",
    "PruneResult",
    "Trainer",
    "__version__",
    "add_skip",
    "analyze",
    "count_macs",
    "deepen",
    "errors",
    "get_history",
    "graph_cache",
    "list_handlers",
    "load",
    "mark_leaf",
    "measure_latency",
    "metrics",
    "narrow",
    "optim",
    "prune_to",
    "register_handler",
    "remove_block",
    "restore",
    "save",
    "trace",
    "widen",
]
