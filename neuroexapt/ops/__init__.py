"""Function-preserving edits of live models, their history and checkpoints."""

from neuroexapt.ops.checkpoint import Checkpoint, load, replay, restore, save
from neuroexapt.ops.deepen import deepen
from neuroexapt.ops.history import EditRecord, get_history
from neuroexapt.ops.remove import remove_block
from neuroexapt.ops.resize import narrow, narrow_many, unit_norms, widen
from neuroexapt.ops.skip import add_skip

__all__ = [
    "Checkpoint",
    "EditRecord",
    "add_skip",
    "deepen",
    "get_history",
    "load",
    "narrow",
    "narrow_many",
    "remove_block",
    "replay",
    "restore",
    "save",
    "unit_norms",
    "widen",
]
