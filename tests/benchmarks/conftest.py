"""Fixtures of the benchmark tests: the benchmark modules and a tiny fake CIFAR-10."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """``bench("cifar10_pruning")`` imports ``benchmarks.cifar10_pruning`` from the repository.

    The torch thread count is restored afterwards (the benchmarks set their own).
    """
    monkeypatch.syspath_prepend(str(ROOT))
    threads = torch.get_num_threads()
    yield lambda name: importlib.import_module(f"benchmarks.{name}")
    torch.set_num_threads(threads)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """320 training and 100 test random images in the shared data folder's ``.npz`` layout."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    x = rng.integers(0, 256, (320, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 320).astype(np.uint8)
    np.savez_compressed(folder / "cifar10_train_part1.npz", x=x[:160], y=y[:160])
    np.savez_compressed(folder / "cifar10_train_part2.npz", x=x[160:], y=y[160:])
    np.savez_compressed(folder / "cifar10_test.npz",
                        x=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
                        y=rng.integers(0, 10, 100).astype(np.uint8))
    return folder
