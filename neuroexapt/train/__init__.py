"""Training loops and integrations: run logging sinks (TensorBoard, JSON lines, plots)."""

from neuroexapt.train.sinks import RunLogger

__all__ = ["RunLogger"]
