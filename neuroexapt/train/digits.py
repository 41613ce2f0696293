"""scikit-learn's bundled 8x8 digits: the data set of the demo and of the end-to-end tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.ops.transaction import model_outputs

__all__ = ["DigitsCNN", "accuracy", "load_digits", "train_epochs"]


class DigitsCNN(nn.Module):
    """A small VGG-style CNN for 1x8x8 digit images."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(2 * width * 16, 32), nn.ReLU(),
                                        nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def load_digits(seed: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): an 80/20 split shuffled by ``seed``, x in [0, 1]."""
    from sklearn import datasets

    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def train_epochs(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           epochs: int, seed: int) -> None:
    """Plain mini-batch training (batch 64, cross-entropy) in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode (the model's modes are restored)."""
    (out,) = model_outputs(model, (x,))
    return float((out.argmax(1) == y).float().mean())
