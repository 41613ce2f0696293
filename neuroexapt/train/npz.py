"""Loaders of the offline CIFAR-10 and Fashion-MNIST ``.npz`` archives (benchmarks, CLI).

Each archive holds ``x`` (uint8, N x H x W x C, channels last) and ``y`` (uint8 class ids);
the CIFAR-10 training split comes in two parts (``cifar10_train_part1.npz``,
``cifar10_train_part2.npz``) that are concatenated in order. The loaders return float32
tensors in NCHW layout, scaled to [0, 1] and normalised per channel with the published
training-set statistics, and int64 labels. The directory is always an argument: nothing is
looked up implicitly.

Example:
    >>> x_tr, y_tr, x_te, y_te = load_cifar10("path/to/data", subset=10_000, seed=0)
    >>> x_tr.shape, x_tr.dtype, y_tr.dtype
    (torch.Size([10000, 3, 32, 32]), torch.float32, torch.int64)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_cifar10",
    "load_fashion_mnist",
]

# Per-channel mean and standard deviation of the training pixels on [0, 1].
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
FASHION_MNIST_MEAN = (0.286041,)
FASHION_MNIST_STD = (0.353024,)

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _read(data_dir: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``x`` and ``y`` of the archives ``names`` in ``data_dir``."""
    xs, ys = [], []
    for name in names:
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; --data-dir must be the folder holding {', '.join(names)}"
            )
        with np.load(path) as archive:
            xs.append(archive["x"])
            ys.append(archive["y"])
    return np.concatenate(xs), np.concatenate(ys)


def _pick(n: int, subset: int | None, seed: int) -> np.ndarray | None:
    """Indices of a seeded random subset of size ``subset`` (sorted), or None for all."""
    if subset is None:
        return None
    if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= n:
        raise ValueError(f"subset must be None or an integer in 1..{n}, got {subset!r}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:subset])


def _to_tensors(x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC -> normalised float32 NCHW, and labels as int64."""
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = images.sub_(m).div_(s).contiguous()
    return images, torch.from_numpy(y.astype(np.int64))


def _load(data_dir: str | Path, train: Sequence[str], test: str, subset: int | None, seed: int,
          mean: Sequence[float], std: Sequence[float]) -> Split:
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    x_tr, y_tr = _read(root, train)
    keep = _pick(len(y_tr), subset, seed)
    if keep is not None:
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    x_te, y_te = _read(root, [test])
    return (*_to_tensors(x_tr, y_tr, mean, std), *_to_tensors(x_te, y_te, mean, std))


def load_cifar10(data_dir: str | Path, subset: int | None = None, seed: int = 0) -> Split:
    """CIFAR-10 as normalised float tensors.

    Args:
        data_dir: folder holding ``cifar10_train_part1.npz``, ``cifar10_train_part2.npz`` and
            ``cifar10_test.npz``.
        subset: number of training images to keep, drawn uniformly without replacement
            (seeded) and kept in their original order; None keeps all 50,000. The test split
            is always complete.
        seed: seed of the subset draw.

    Returns:
        ``(x_train [N, 3, 32, 32] float32, y_train [N] int64, x_test, y_test)``.

    Raises:
        FileNotFoundError: the folder or one of the archives is missing.
        ValueError: ``subset`` is not None or an integer in 1..50000.
    """
    return _load(data_dir, ("cifar10_train_part1.npz", "cifar10_train_part2.npz"),
                 "cifar10_test.npz", subset, seed, CIFAR10_MEAN, CIFAR10_STD)


def load_fashion_mnist(data_dir: str | Path, subset: int | None = None, seed: int = 0) -> Split:
    """Fashion-MNIST as normalised float tensors ``[N, 1, 28, 28]``; see :func:`load_cifar10`.

    Reads ``fashion_mnist_train.npz`` and ``fashion_mnist_test.npz`` from ``data_dir``.
    """
    return _load(data_dir, ("fashion_mnist_train.npz",), "fashion_mnist_test.npz", subset, seed,
                 FASHION_MNIST_MEAN, FASHION_MNIST_STD)
