"""Pieces every training benchmark shares: batches, augmentation, accuracy, paired latency."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["Batches", "accuracy", "augment", "conv_widths", "cosine_schedule", "evaluate",
           "paired_latency", "params", "train_sgd", "vgg_cnn"]


def vgg_cnn(width: int, classes: int = 10, *, pool_last: bool = True,
            in_channels: int = 3) -> nn.Sequential:
    """conv w-w-pool-2w-2w-pool-4w-4w[-pool], global average pool, linear.

    3x3 convs without bias, each followed by BatchNorm and ReLU; 2x2 max-pools.
    ``pool_last=False`` leaves out the last max-pool (the global pool follows anyway).
    """
    layers: list[nn.Module] = []
    channels = in_channels
    plan = [width, width, 0, 2 * width, 2 * width, 0, 4 * width, 4 * width]
    for out in plan + ([0] if pool_last else []):
        if out == 0:
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU()]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def conv_widths(model: nn.Module) -> list[int]:
    """Output channels of every ``Conv2d`` in module order (inserted layers included)."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, per image, on NCHW tensors."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    out = padded.gather(2, rows.expand(n, x.shape[1], h, padded.shape[3]))
    out = out.gather(3, cols.expand(n, x.shape[1], h, w))
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


class Batches:
    """Shuffled mini-batches; pass ``k`` uses the permutation (and augmentation) of ``seed + k``.

    ``seed=None`` keeps the order (for evaluation); ``augmented=True`` applies :func:`augment`.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int | None,
                 augmented: bool = False) -> None:
        self.x, self.y, self.batch, self.seed, self.passes = x, y, batch, seed, 0
        self.augmented = augmented

    def __len__(self) -> int:
        return (len(self.y) + self.batch - 1) // self.batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        gen = torch.Generator().manual_seed((self.seed or 0) + self.passes)
        order = torch.arange(n) if self.seed is None else torch.randperm(n, generator=gen)
        self.passes += 1
        for i in range(0, n, self.batch):
            idx = order[i:i + self.batch]
            x = self.x[idx]
            yield (augment(x, gen) if self.augmented else x), self.y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 500
             ) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy in percent) in eval mode, in chunks of ``chunk``."""
    model.eval()
    loss, hits = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i:i + chunk])
        loss += float(nn.functional.cross_entropy(out, y[i:i + chunk], reduction="sum"))
        hits += int((out.argmax(1) == y[i:i + chunk]).sum())
    return loss / len(y), 100.0 * hits / len(y)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (see :func:`evaluate`)."""
    return evaluate(model, x, y)[1]


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of the learning rate from its value to 0 over ``steps`` scheduler steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))


def params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _time(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


@torch.no_grad()
def paired_latency(models: Sequence[nn.Module], x: torch.Tensor, repeats: int,
                   warmup: int) -> list[float]:
    """Median seconds of one forward of each model on ``x``, timed in rotating order.

    Each repeat times every model once, starting from a different one each time, so that a
    burst of load elsewhere on the machine falls on all of them alike.
    """
    for m in models:
        m.eval()
    for _ in range(warmup):
        for m in models:
            m(x)
    times: list[list[float]] = [[] for _ in models]
    k = len(models)
    for r in range(repeats):
        for j in range(k):
            i = (r + j) % k
            times[i].append(_time(models[i], x))
    return [statistics.median(t) for t in times]


def train_sgd(model: nn.Module, data: Batches, epochs: int, lr: float) -> float:
    """SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a cosine schedule for ``epochs``;
    returns the wall seconds."""
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    sched = cosine_schedule(opt, max(1, epochs * len(data)))
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise RuntimeError("training diverged (non-finite loss); lower --lr")
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start
