"""DNM on a model you wrote yourself: a small residual CNN (or an MLP) on scikit-learn's digits.

Nothing in the model is special to NeuroExapt: it is an ``nn.Module`` with its own
``forward`` (a residual addition, functional activations, a global average pool). The
framework traces it, finds the dimensions that must change together (the residual addition
ties the stem's channels to the block's output channels), and grows it in place while it
trains. Its class, its attribute names and the optimizer stay the ones you created.

This example also gathers the measurements itself, as in the design document's loop:
``dnm.update_caches(activations, gradients, targets)`` with tensors recorded by forward hooks
on one training batch. (Giving ``DNMFramework`` a ``probe=`` and calling ``update_caches()``
with no arguments does the same with the framework's own hooks; see dnm_fixed_test.py.)

Usage:
    python examples/dnm_custom_model.py                 # residual CNN, about 10 s on a CPU
    python examples/dnm_custom_model.py --model mlp --epochs 20
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from _data import load_digits
from torch import nn

from neuroexapt.core import DNMFramework

logger = logging.getLogger("dnm_custom_model")


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN; the caller adds the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class DigitsResNet(nn.Module):
    """Stem, one residual block, a strided conv, global average pooling, a linear head."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.block = ResidualBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(x + self.block(x))
        x = F.relu(self.down_bn(self.down(x)))
        return self.head(x.mean(dim=(2, 3)))


class DigitsMLP(nn.Module):
    """Two hidden layers with different activations, on the flattened 8x8 image."""

    def __init__(self, hidden: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x.flatten(1)))
        return self.out(F.gelu(self.fc2(h)))


def capture(model: nn.Module, x: torch.Tensor, y: torch.Tensor
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of every Conv2d and Linear layer on one batch, and the loss gradients w.r.t. them.

    The layers are looked up on every call: after a change the model has new layer names
    (for example ``head.0`` and ``head.1`` once a layer was added after ``head``).
    """
    activations: dict[str, torch.Tensor] = {}
    gradients: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: object, out: torch.Tensor) -> None:
            activations[name] = out.detach()
            out.register_hook(lambda g: gradients.__setitem__(name, g.detach()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return activations, gradients


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Conv2d and Linear layer, by name."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy in eval mode."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; bad values exit with a usage message."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("resnet", "mlp"), default="resnet")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--subset", type=int, default=None, help="first N training images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the models are tiny: one is fastest)")
    p.add_argument("--events", default=None, help="write the events to this JSON-lines file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits(args.seed, args.subset)
    val = min(200, len(y_tr) // 5)  # held out from training: validation and probe
    x_tr, y_tr, x_val, y_val = x_tr[val:], y_tr[val:], x_tr[:val], y_tr[:val]

    model = DigitsResNet() if args.model == "resnet" else DigitsMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    shapes_before, params_before = layer_shapes(model), sum(p.numel() for p in model.parameters())
    dnm = DNMFramework(
        model,
        {
            "morphogenesis_interval": 2,  # check every second epoch
            "max_morphogenesis_per_epoch": 1,
            "max_architecture_changes": 4,
            "trigger_on_bottleneck": True,  # grow at the worst layer, no plateau needed
        },
        optimizer=optimizer,
        probe=(x_val, y_val),  # for tracing and for the sensitivity metric
        events_path=args.events,
        seed=args.seed,
    )

    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=gen).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            optimizer.step()
        val_acc = accuracy(model, x_val, y_val)

        batch = torch.randperm(len(y_tr), generator=gen)[:256]
        activations, gradients = capture(model, x_tr[batch], y_tr[batch])
        dnm.update_caches(activations, gradients, y_tr[batch])
        dnm.record_performance(val_acc)
        trigger, _ = dnm.should_trigger_morphogenesis(epoch, None, {"accuracy": val_acc})
        line = f"epoch {epoch:2d}  val acc {val_acc:.4f}"
        if trigger:
            results = dnm.execute_morphogenesis(epoch)
            model = dnm.model
            done = ", ".join(f"{e['kind']} at {e['layer']}" for e in results["events"])
            line += f"  grew: {done or 'nothing possible'} (+{results['parameters_added']})"
        logger.info(line)

    params_after = sum(p.numel() for p in model.parameters())
    shapes_after = layer_shapes(model)
    print(f"model class after growth: {type(model).__name__}")
    print(f"test accuracy: {accuracy(model, x_te, y_te):.4f}")
    print(f"parameters: {params_before} -> {params_after}")
    print("layer weights (before -> after):")
    for name in sorted(shapes_before.keys() | shapes_after.keys()):
        before = shapes_before.get(name, "-")
        after = shapes_after.get(name, "-")
        print(f"  {name:<24} {before!s:<18} -> {after!s}")
    print(f"events: {len(dnm.events.events)}")
    for e in dnm.events.events:
        print(f"  epoch {e.epoch}: {e.kind} at {e.layer} ({e.params_before} -> "
              f"{e.params_after}); {e.reasons[0] if e.reasons else ''}")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
