"""The single exception hierarchy of NeuroExapt.

Every error the library raises on purpose derives from :class:`NeuroExaptError`, and
messages say what was wrong, the offending value, the valid options and the fix.
Each class also derives from the closest built-in exception so that callers who
catch ``ValueError`` or ``TypeError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FunctionPreservationError",
    "LayerNotFoundError",
    "NeuroExaptError",
    "SurgeryError",
    "TraceError",
    "UnsupportedModuleError",
]


class NeuroExaptError(Exception):
    """Root of every error raised by NeuroExapt."""


class ConfigError(NeuroExaptError, ValueError):
    """A configuration key or argument value is invalid (unknown key, bad value)."""


class TraceError(NeuroExaptError, RuntimeError):
    """torch.fx could not trace the model, or the traced graph cannot be analysed."""


class UnsupportedModuleError(NeuroExaptError, TypeError):
    """A layer type has no handler; register one with ``neuroexapt.register_handler``."""


class LayerNotFoundError(NeuroExaptError, KeyError):
    """A layer name does not exist in the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class SurgeryError(NeuroExaptError, RuntimeError):
    """An edit cannot be applied; the model, optimizer and history are unchanged."""


class FunctionPreservationError(SurgeryError):
    """An edit meant to preserve the model's function changed its outputs beyond tolerance."""


class CheckpointError(NeuroExaptError, RuntimeError):
    """A checkpoint cannot be written or read back."""


class AnalysisError(NeuroExaptError, RuntimeError):
    """Measurements could not be taken (an empty loader, only non-finite losses)."""
