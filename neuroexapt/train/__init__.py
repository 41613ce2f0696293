"""Training loops and integrations: the NeuroExapt facade, the information bottleneck, run
logging sinks."""

from neuroexapt.train.bottleneck import InformationBottleneck
from neuroexapt.train.facade import NeuroExapt
from neuroexapt.train.sinks import RunLogger
from neuroexapt.train.trainer import Trainer

__all__ = ["InformationBottleneck", "NeuroExapt", "RunLogger", "Trainer"]
