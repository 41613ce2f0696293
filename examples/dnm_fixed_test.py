"""CIFAR-10 training with DNM (Dynamic Neural Morphogenesis): the design document's loop.

A VGG-style CNN trains with SGD (momentum, cosine learning rate) and the standard augmentation
(random crop with 4 pixels of padding, horizontal flip). After every epoch the framework
measures the layers on a probe (a held-out slice of the training set), records the validation
accuracy, decides whether to change the architecture and, when it does, grows the model in
place: neuron division (Net2Net split), layer addition or a skip connection, with the
optimizer's state carried over. A change that makes validation accuracy fall by more than
``performance_drop_threshold`` is rolled back.

Usage:
    python examples/dnm_fixed_test.py --data-dir /path/to/cifar10 --out runs/dnm_cifar
    python examples/dnm_fixed_test.py --data-dir ~/data/cifar-10-batches-py --subset 5000 \\
        --epochs 3 --interval 1 --trigger-on-bottleneck

``--data-dir`` holds either the ``.npz`` archives (``cifar10_train_part1.npz``,
``cifar10_train_part2.npz``, ``cifar10_test.npz``) or torchvision's ``cifar-10-batches-py``.
With ``--out``, the run folder receives ``events.jsonl`` (one morphogenesis event per line) and
``summary.json`` (per-epoch metrics, test accuracy, parameter counts, events).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from torch import nn

from neuroexapt.core import DNMFramework

logger = logging.getLogger("dnm_fixed_test")


class VGGish(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU layers and a max-pool, then a two-layer classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage in range(3):
            out = width * 2**stage
            for _ in range(2):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False),
                           nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(channels * 4 * 4, 256), nn.ReLU(),
                                        nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images -> float, per-channel standardised."""
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded images, and a random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 9, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    crops = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices come first
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, crops.flip(3), crops)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, batch_size: int, gen: torch.Generator) -> dict[str, float]:
    """One epoch of augmented SGD; returns the mean loss and the accuracy."""
    model.train()
    loss_sum, correct = 0.0, 0
    for idx in torch.randperm(len(y), generator=gen).split(batch_size):
        idx = idx.to(x.device)
        inputs, targets = normalize(augment(x[idx], gen)), y[idx]
        out = model(inputs)
        loss = F.cross_entropy(out, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        correct += int((out.argmax(1) == targets).sum())
    return {"loss": loss_sum / len(y), "accuracy": correct / len(y)}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000) -> dict[str, float]:
    """Mean loss and accuracy in eval mode (no augmentation)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        inputs, targets = normalize(x[start:start + batch_size]), y[start:start + batch_size]
        out = model(inputs)
        loss_sum += float(F.cross_entropy(out, targets, reduction="sum"))
        correct += int((out.argmax(1) == targets).sum())
    return {"loss": loss_sum / len(y), "accuracy": correct / len(y)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; bad values exit with a usage message."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True,
                   help="folder with the CIFAR-10 .npz archives or cifar-10-batches-py")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="initial learning rate (cosine decay)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32, help="channels of the first stage")
    p.add_argument("--subset", type=int, default=None,
                   help="use only the first N training images (quick runs)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training images held out as validation set and probe")
    p.add_argument("--probe-batch-size", type=int, default=256)
    p.add_argument("--interval", type=int, default=3, help="morphogenesis_interval (epochs)")
    p.add_argument("--max-changes", type=int, default=10, help="max_architecture_changes")
    p.add_argument("--trigger-on-bottleneck", action="store_true",
                   help="change at a bottleneck without waiting for a validation plateau")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", default=None, help="run folder for events.jsonl and summary.json")
    p.add_argument("--quiet", action="store_true", help="only warnings and the final summary")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        p.error("--epochs and --batch-size must be at least 1")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.subset is not None and args.subset < 20:
        p.error(f"--subset must be at least 20 images, got {args.subset}")
    return args


def load_data(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Train / validation / test tensors (uint8 NCHW images, int64 labels) on ``device``."""
    x_tr, y_tr, x_te, y_te = load_cifar10(args.data_dir)
    if args.subset is not None:
        x_tr, y_tr = x_tr[:args.subset], y_tr[:args.subset]
    n_val = max(1, round(args.val_fraction * len(y_tr)))

    def tensors(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
        return images, torch.from_numpy(y).long().to(device)

    (xt, yt), (xv, yv) = tensors(x_tr[:-n_val], y_tr[:-n_val]), tensors(x_tr[-n_val:],
                                                                        y_tr[-n_val:])
    xs, ys = tensors(x_te, y_te)
    return {"x_train": xt, "y_train": yt, "x_val": xv, "y_val": yv, "x_test": xs, "y_test": ys}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train with DNM; returns the summary."""
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    data = load_data(args, device)
    logger.info("CIFAR-10: %d train, %d validation, %d test images on %s",
                len(data["y_train"]), len(data["y_val"]), len(data["y_test"]), device)

    model = VGGish(args.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=True)
    # Closed-form cosine factor per epoch: a rollback restores the optimizer's state (its
    # learning rate included) and the next step() sets the scheduled value again.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / args.epochs)))
    probe = [(normalize(data["x_val"][i:i + args.probe_batch_size]),
              data["y_val"][i:i + args.probe_batch_size])
             for i in range(0, len(data["y_val"]), args.probe_batch_size)]
    out = Path(args.out) if args.out else None
    events_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        events_path = out / "events.jsonl"
        events_path.write_text("")  # this run's events only
    dnm_config = {
        "morphogenesis_interval": args.interval,  # check every N epochs
        "max_morphogenesis_per_epoch": 1,  # at most one change per check
        "performance_improvement_threshold": 0.01,  # plateau: < 1 point gained over 3 epochs
        "max_architecture_changes": args.max_changes,
        "trigger_on_bottleneck": args.trigger_on_bottleneck,
    }
    dnm = DNMFramework(model, dnm_config, optimizer=optimizer, probe=probe,
                       events_path=str(events_path) if events_path else None, seed=args.seed)

    params_before = count_parameters(model)
    gen = torch.Generator().manual_seed(args.seed)
    history: list[dict[str, Any]] = []
    start, analysis_s = time.perf_counter(), 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_m = train_epoch(model, optimizer, data["x_train"], data["y_train"],
                              args.batch_size, gen)
        val_m = evaluate(model, data["x_val"], data["y_val"])

        t1 = time.perf_counter()
        dnm.update_caches()  # measure the layers on the probe
        analysis_s += time.perf_counter() - t1
        n_events = len(dnm.events.events)
        dnm.record_performance(val_m["accuracy"])  # may roll back the last change
        rolled_back = [e for e in dnm.events.events[n_events:] if e.kind == "rollback"]
        trigger, reasons = dnm.should_trigger_morphogenesis(epoch + 1, train_m, val_m)
        changes: dict[str, Any] = {}
        if trigger:
            logger.info("morphogenesis triggered at epoch %d: %s", epoch + 1, "; ".join(reasons))
            changes = dnm.execute_morphogenesis(epoch + 1)
            model = dnm.model  # the same object, grown in place
        scheduler.step()

        record = {"epoch": epoch + 1, "lr": lr, "train": train_m, "val": val_m,
                  "parameters": count_parameters(model), "seconds": time.perf_counter() - t0,
                  "rolled_back": bool(rolled_back),
                  "changes": [f"{e['kind']} at {e['layer']}" for e in changes.get("events", [])]}
        history.append(record)
        logger.info(
            "epoch %3d/%d  lr %.4f  train loss %.3f acc %.4f  val loss %.3f acc %.4f  "
            "params %d  %.1f s%s%s", epoch + 1, args.epochs, lr, train_m["loss"],
            train_m["accuracy"], val_m["loss"], val_m["accuracy"], record["parameters"],
            record["seconds"], "  rolled back" if rolled_back else "",
            "  " + ", ".join(record["changes"]) if record["changes"] else "")

    test_m = evaluate(model, data["x_test"], data["y_test"])
    summary = {
        "test_accuracy": test_m["accuracy"], "test_loss": test_m["loss"],
        "test_images": len(data["y_test"]),
        "parameters_before": params_before, "parameters_after": count_parameters(model),
        "events": [e.to_dict() for e in dnm.events.events],
        "seconds": time.perf_counter() - start, "analysis_seconds": analysis_s,
        "config": dnm.config.to_dict(), "args": vars(args), "epochs": history,
    }
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summary: dict[str, Any], out: str | None) -> None:
    """Test accuracy, parameter counts, events and time, for people."""
    before, after = summary["parameters_before"], summary["parameters_after"]
    print(f"test accuracy: {summary['test_accuracy']:.4f} ({summary['test_images']} images)")
    print(f"parameters: {before} before, {after} after ({after - before:+d}, "
          f"{100.0 * (after - before) / before:+.1f}%)")
    print(f"morphogenesis events: {len(summary['events'])}")
    for e in summary["events"]:
        print(f"  epoch {e['epoch']:>3}  {e['kind']:<18} {e['layer']:<24} "
              f"{e['params_before']} -> {e['params_after']}")
    print(f"time: {summary['seconds']:.1f} s (layer analysis {summary['analysis_seconds']:.1f} s)")
    if out:
        print(f"run folder: {out} (events.jsonl, summary.json)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        summary = run(args)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
