"""Keeping an optimizer's parameters and state consistent across a model edit.

Every edit returns a :class:`ParamMap`; :func:`migrate` applies it to an optimizer in place
(momentum and Adam moments re-indexed like the parameters), and is the standalone function
for an optimizer the user manages. :func:`snapshot` and :func:`restore` put an optimizer back
exactly when an edit fails.

Example:
    >>> snap = snapshot(optimizer)
    >>> migrate(optimizer, param_map)  # param_map: returned by the edit
"""

from __future__ import annotations

from neuroexapt.optim.migrate import OptimizerSnapshot, migrate, restore, snapshot
from neuroexapt.optim.named import load_named_state, named_state
from neuroexapt.optim.parammap import DimMap, ParamChange, ParamMap

__all__ = [
    "DimMap",
    "OptimizerSnapshot",
    "ParamChange",
    "ParamMap",
    "load_named_state",
    "migrate",
    "named_state",
    "restore",
    "snapshot",
]
