"""Data loading shared by the examples: CIFAR-10 and Fashion-MNIST from disk, scikit-learn's digits.

The examples are standalone: they import this file (it sits beside them) and nothing from
``benchmarks/``. CIFAR-10 is read from either of two layouts of ``--data-dir``:

* the offline ``.npz`` archives (``cifar10_train_part1.npz``, ``cifar10_train_part2.npz``,
  ``cifar10_test.npz``; each holds ``x`` uint8 N x 32 x 32 x 3 and ``y``);
* the original python version, as torchvision downloads it: a ``cifar-10-batches-py`` folder
  with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (given directly or its parent).

Fashion-MNIST is read from the offline ``.npz`` archives ``fashion_mnist_train.npz`` and
``fashion_mnist_test.npz`` (``x`` uint8 N x 28 x 28 x 1 and ``y``).

The pickles are read with an unpickler that only accepts what a NumPy array needs, so a file
cannot run code while it is read; torchvision is not needed.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "load_cifar10", "load_digits", "load_fashion_mnist"]

# Per-channel mean and standard deviation of the CIFAR-10 training pixels on [0, 1].
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
# The same for the Fashion-MNIST training pixels (one channel).
FASHION_MNIST_MEAN = (0.286041,)
FASHION_MNIST_STD = (0.353024,)

NPZ_FILES = ("cifar10_train_part1.npz", "cifar10_train_part2.npz", "cifar10_test.npz")
FASHION_MNIST_FILES = ("fashion_mnist_train.npz", "fashion_mnist_test.npz")
PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST = "test_batch"

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# The globals a pickled NumPy array refers to (NumPy 1 and 2 spellings, protocols 2-5).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings and NumPy arrays, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays and lists"
            )
        return super().find_class(module, name)


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file: images N x 32 x 32 x 3 uint8 and labels."""
    with path.open("rb") as f:
        entry = _ArrayUnpickler(f, encoding="latin1").load()
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = np.asarray(entry["data"], dtype=np.uint8)
    # Rows are 3072 bytes: the red plane, then green, then blue, each 32 x 32 row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(entry["labels"], dtype=np.int64)


def _pickle_dir(root: Path) -> Path | None:
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / PICKLE_TRAIN[0]).is_file():
            return candidate
    return None


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as archive:
        return archive["x"], archive["y"].astype(np.int64)


def load_cifar10(data_dir: str | Path) -> Arrays:
    """CIFAR-10 as ``(x_train, y_train, x_test, y_test)``: uint8 NHWC images, int64 labels.

    Args:
        data_dir: a folder with the three ``.npz`` archives, or a ``cifar-10-batches-py``
            folder (or the folder that contains one).

    Raises:
        FileNotFoundError: neither layout is complete in ``data_dir``.
    """
    root = Path(data_dir)
    if all((root / name).is_file() for name in NPZ_FILES):
        parts = [_read_npz(root / name) for name in NPZ_FILES]
        x_tr = np.concatenate([parts[0][0], parts[1][0]])
        y_tr = np.concatenate([parts[0][1], parts[1][1]])
        return x_tr, y_tr, *parts[2]
    folder = _pickle_dir(root)
    if folder is not None:
        names = (*PICKLE_TRAIN, PICKLE_TEST)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}")
        train = [_read_pickle_batch(folder / n) for n in PICKLE_TRAIN]
        x_te, y_te = _read_pickle_batch(folder / PICKLE_TEST)
        x_tr = np.concatenate([x for x, _ in train])
        return x_tr, np.concatenate([y for _, y in train]), x_te, y_te
    raise FileNotFoundError(
        f"no CIFAR-10 in {root}: expected {', '.join(NPZ_FILES)}, or a cifar-10-batches-py "
        f"folder with {', '.join(PICKLE_TRAIN)} and {PICKLE_TEST}"
    )


def load_fashion_mnist(data_dir: str | Path) -> Arrays:
    """Fashion-MNIST as ``(x_train, y_train, x_test, y_test)``: uint8 NHWC images, int64 labels.

    Args:
        data_dir: a folder with ``fashion_mnist_train.npz`` and ``fashion_mnist_test.npz``.

    Raises:
        FileNotFoundError: an archive is missing from ``data_dir``.
    """
    root = Path(data_dir)
    missing = [name for name in FASHION_MNIST_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no Fashion-MNIST in {root}: {', '.join(missing)} missing; "
                                "--data-dir must be the folder holding "
                                f"{', '.join(FASHION_MNIST_FILES)}")
    (x_tr, y_tr), (x_te, y_te) = (_read_npz(root / name) for name in FASHION_MNIST_FILES)
    return x_tr, y_tr, x_te, y_te


def load_digits(seed: int = 0, subset: int | None = None,
                test_fraction: float = 0.2) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8 x 8 digits as ``(x_train, y_train, x_test, y_test)``.

    Images are float32 ``[N, 1, 8, 8]`` on [0, 1]; the split is a seeded permutation.
    ``subset`` keeps the first ``subset`` training images.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = len(y) - int(test_fraction * len(y))
    x_tr, y_tr = x[:cut], y[:cut]
    if subset is not None:
        x_tr, y_tr = x_tr[:subset], y_tr[:subset]
    return x_tr, y_tr, x[cut:], y[cut:]
