"""Where a run's measurements go: TensorBoard scalars, a JSON-lines history, a PNG plot."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from neuroexapt.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["RunLogger", "plot_history"]


class RunLogger:
    """Writes per-epoch scalars to ``<run>/tensorboard`` and ``<run>/history.jsonl``.

    TensorBoard (``torch.utils.tensorboard``) and matplotlib are optional: without them the
    JSON history is still written and :meth:`plot` raises a clear error.
    """

    def __init__(self, run_dir: str | os.PathLike[str], tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.run_dir / "history.jsonl"
        self.history_path.write_text("")
        self.rows: list[dict[str, Any]] = []
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard "
                    "(or pass tensorboard=False)"
                ) from e
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, epoch: int, **scalars: float) -> None:
        """Record the scalars of one epoch."""
        row = {"epoch": epoch, **{k: float(v) for k, v in scalars.items()}}
        self.rows.append(row)
        with self.history_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, float(value), epoch)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def plot(self, path: str | os.PathLike[str], *, metric: str, params: str,
             events: list[tuple[int, str]] = ()) -> Path:
        """PNG of ``metric`` and ``params`` per epoch, with ``(epoch, label)`` events marked."""
        return plot_history(self.rows, path, metric=metric, params=params, events=events)


def plot_history(rows: list[dict[str, Any]], path: str | os.PathLike[str], *, metric: str,
                 params: str, events: list[tuple[int, str]] = ()) -> Path:
    """PNG of ``metric`` and ``params`` of ``rows`` (one per epoch), events marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from e
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [r[metric] for r in rows], "o-", color="tab:blue", label=metric)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric, color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, [r[params] for r in rows], "s--", color="tab:orange", label=params)
    ax2.set_ylabel(params, color="tab:orange")
    for epoch, label in events:
        ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
        ax.annotate(label, (epoch, ax.get_ylim()[0]), rotation=90, fontsize=7,
                    va="bottom", ha="right", xytext=(-2, 4), textcoords="offset points")
    ax.set_title(f"{metric} and {params} per epoch")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
