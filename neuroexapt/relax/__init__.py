"""Discrete architectural choices by continuous relaxation, then a plain discretised model.

:func:`relax` turns layers into choices among operations, widths and depths, whose
architecture parameters (:func:`arch_parameters`) are trained apart from the weights
(:func:`search`, or your own loop); :func:`discretize` returns the plain model with the most
probable options. See ``docs/api/relax.md``.
"""

from neuroexapt.relax.api import (
    arch_parameters,
    choices,
    discretize,
    expected_cost,
    kernel_candidates,
    relax,
    set_temperature,
    weight_parameters,
)
from neuroexapt.relax.choices import DepthChoice, OpChoice, WidthChoice
from neuroexapt.relax.search import SearchResult, plot_choices, search

__all__ = ["DepthChoice", "OpChoice", "SearchResult", "WidthChoice", "arch_parameters",
           "choices", "discretize", "expected_cost", "kernel_candidates", "plot_choices",
           "relax", "search", "set_temperature", "weight_parameters"]
