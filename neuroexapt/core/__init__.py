"""The DNM (Dynamic Neural Morphogenesis) API of the first design document.

``from neuroexapt.core import DNMFramework`` and its components.
"""

from neuroexapt.core.dnm import DNMFramework, DNMNet2Net
from neuroexapt.policy.analyzer import LayerPerformanceAnalyzer
from neuroexapt.policy.config import DNMConfig
from neuroexapt.policy.connections import ConnectionGrowthManager
from neuroexapt.policy.division import AdaptiveNeuronDivision
from neuroexapt.policy.events import MorphogenesisEvent

__all__ = [
    "AdaptiveNeuronDivision",
    "ConnectionGrowthManager",
    "DNMConfig",
    "DNMFramework",
    "DNMNet2Net",
    "LayerPerformanceAnalyzer",
    "MorphogenesisEvent",
]
