"""When and where to change an architecture: triggers, proposals, rollback, events."""

from neuroexapt.policy.analyzer import LayerPerformanceAnalyzer
from neuroexapt.policy.config import DIVISION_STRATEGIES, DNMConfig
from neuroexapt.policy.connections import ConnectionGrowthManager
from neuroexapt.policy.criteria import Criteria
from neuroexapt.policy.division import AdaptiveNeuronDivision
from neuroexapt.policy.events import EventLog, MorphogenesisEvent
from neuroexapt.policy.pruning import PRUNE_COSTS, PRUNE_SCORES, PruneResult, prune_to
from neuroexapt.policy.rollback import Snapshot
from neuroexapt.policy.triggers import MorphogenesisTrigger

__all__ = [
    "DIVISION_STRATEGIES",
    "PRUNE_COSTS",
    "PRUNE_SCORES",
    "AdaptiveNeuronDivision",
    "ConnectionGrowthManager",
    "Criteria",
    "DNMConfig",
    "EventLog",
    "LayerPerformanceAnalyzer",
    "MorphogenesisEvent",
    "MorphogenesisTrigger",
    "PruneResult",
    "Snapshot",
    "prune_to",
]
