"""The NeuroExapt Trainer on Fashion-MNIST (or CIFAR-10): a CNN pruned while it trains.

    python examples/neuroexapt_fashion_mnist.py --data-dir ../shared/data --subset 4000 --epochs 3
    python examples/neuroexapt_fashion_mnist.py --data-dir ../shared/data --dataset cifar10

``--data-dir`` holds the offline ``.npz`` archives (``fashion_mnist_train.npz`` and
``fashion_mnist_test.npz``, or ``cifar10_train_part1.npz``, ``cifar10_train_part2.npz`` and
``cifar10_test.npz``). A seeded ``--subset`` of the training images is drawn; its last
``--val`` images validate (the Trainer rolls a change back when validation accuracy falls),
the rest train. The CNN (conv w - conv w - pool - conv 2w - pool - linear, with BatchNorm and
ReLU) is wrapped with ``NeuroExapt(task_type="classification")`` and trained by
``Trainer(...).fit``: every hidden layer gets information-bottleneck gates priced by
``--info-weight``, and the units whose gates pass less than the adaptive
``--entropy-threshold`` (nats) are removed for real between epochs. The parameter count before
and after, the conv widths and the accuracy on the full test split are printed.

The defaults (``--info-weight 1 --entropy-threshold 4.4``) are those of the pruning benchmark
(docs/benchmarks.md): the gates start at 4.5 nats per unit and move slowly, so on runs of a few
hundred batches only thresholds near 4.5 nats prune anything.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from _data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_cifar10,
    load_fashion_mnist,
)
from torch import nn

import neuroexapt

DATASETS = {
    "fashion_mnist": (load_fashion_mnist, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "cifar10": (load_cifar10, CIFAR10_MEAN, CIFAR10_STD),
}


def cnn(channels: int, size: int, width: int = 32, classes: int = 10) -> nn.Sequential:
    """conv w - conv w - pool - conv 2w - pool - linear, with BN and ReLU, for ``size``^2 images."""
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU()]
    return nn.Sequential(*block(channels, width), *block(width, width), nn.MaxPool2d(2),
                         *block(width, 2 * width), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * width * (size // 4) ** 2, classes))


def to_tensors(x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC -> float32 NCHW standardised per channel; labels int64."""
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((images - m) / s).contiguous(), torch.from_numpy(np.asarray(y, dtype=np.int64))


class Batches:
    """Mini-batches of ``(x, y)``; reshuffled at every pass when ``seed`` is given."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int,
                 seed: int | None = None) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.gen) if self.gen is not None else \
            torch.arange(n)
        for i in range(0, n, self.batch):
            idx = order[i:i + self.batch]
            yield self.x[idx], self.y[idx]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
               for i in range(0, len(y), batch))
    return hits / len(y)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder of the .npz archives")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fashion_mnist")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--subset", type=int, default=None,
                   help="training images drawn (seeded); default all")
    p.add_argument("--val", type=int, default=None,
                   help="images of the subset held out for validation (default 10%%)")
    p.add_argument("--info-weight", type=float, default=1.0)
    p.add_argument("--entropy-threshold", type=float, default=4.4, help="nats")
    p.add_argument("--width", type=int, default=32, help="channels of the first two convs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no INFO logs")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.subset is not None and args.subset < 2:
        p.error(f"--subset must be at least 2 images, got {args.subset}")
    return args


def load(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_val, y_val, x_test, y_test)`` as tensors."""
    loader, mean, std = DATASETS[args.dataset]
    x_tr, y_tr, x_te, y_te = loader(args.data_dir)
    if args.subset is not None and args.subset < len(y_tr):
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(y_tr))[:args.subset])
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    n_val = args.val if args.val is not None else max(1, len(y_tr) // 10)
    if not 1 <= n_val < len(y_tr):
        raise ValueError(f"--val must be in 1..{len(y_tr) - 1}, got {n_val}")
    x, y = to_tensors(x_tr, y_tr, mean, std)
    return (x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], *to_tensors(x_te, y_te, mean, std))


def run(args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Wrap, train and prune the CNN on ``data`` (see :func:`load`); returns the figures."""
    x_tr, y_tr, x_val, y_val, x_te, y_te = data
    torch.manual_seed(args.seed)
    print(f"{args.dataset}: {len(y_tr)} training, {len(y_val)} validation, "
          f"{len(y_te)} test images of shape {tuple(x_tr.shape[1:])}")

    ne = neuroexapt.NeuroExapt(task_type="classification", entropy_weight=0.5)
    model = ne.wrap_model(cnn(x_tr.shape[1], x_tr.shape[2], width=args.width))
    before, widths_before = parameters(model), conv_widths(model)
    trainer = neuroexapt.Trainer(model=model, info_weight=args.info_weight,
                                 entropy_threshold=args.entropy_threshold, lr=args.lr,
                                 evolve_every=1, progress=not args.quiet)
    history = trainer.fit(Batches(x_tr, y_tr, args.batch_size, seed=args.seed),
                          Batches(x_val, y_val, 500), epochs=args.epochs)

    after, acc = parameters(model), accuracy(model, x_te, y_te)
    for epoch, (loss, val, n) in enumerate(zip(history["train_loss"], history["val_metric"],
                                               history["parameters"], strict=True), 1):
        print(f"epoch {epoch}: train loss {loss:.4f}, validation accuracy {val:.4f}, "
              f"parameters {int(n)}")
    print(f"conv widths {widths_before} -> {conv_widths(model)}; "
          f"units pruned {int(sum(history['pruned_units']))}")
    print(f"parameters {before} -> {after} ({100 * (1 - after / before):.1f}% fewer)")
    print(f"test accuracy {acc:.4f} ({len(y_te)} images)")
    return {"parameters_before": before, "parameters_after": after, "test_accuracy": acc,
            "history": history}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; returns the process exit code (2 when the data is missing)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    try:
        data = load(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
