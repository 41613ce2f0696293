"""Training loops and integrations: the information bottleneck, run logging sinks."""

from neuroexapt.train.bottleneck import InformationBottleneck
from neuroexapt.train.sinks import RunLogger

__all__ = ["InformationBottleneck", "RunLogger"]
