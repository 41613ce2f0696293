"""Handlers for the layers of libraries people bring models from.

They are registered the first time a model is traced after the library was imported, so
NeuroExapt never imports it itself:

* transformers' ``Conv1D`` (GPT-2 and relatives): a Linear whose weight is stored transposed,
  ``[in, out]``.
"""

from __future__ import annotations

import sys

from neuroexapt.graph import handlers
from neuroexapt.graph.handlers import ProducerHandler, register_handler

__all__ = ["register_third_party"]


def register_third_party() -> None:
    """Register the handlers of every supported library that is imported, unless its layer
    already has one (the user's own, or ours from an earlier call)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # a transformers without it: nothing to register
        return
    if Conv1D not in handlers._REGISTRY:
        register_handler(Conv1D, ProducerHandler([("weight", 0)], [("weight", 1), ("bias", 0)],
                                                 "nx", "nf", -1))
