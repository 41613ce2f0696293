"""The machine a benchmark ran on, for its report."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["machine"]


def machine() -> dict[str, Any]:
    """CPU model, core counts, torch and Python versions."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
