"""Architecture search by continuous relaxation on a CIFAR-10 subset (issue 13).

The search space is the VGG-style CNN of the other benchmarks (``vgg_cnn(width)``: three
stages of two 3x3 convolutions) with, in each stage, a kernel choice (3x3 or 5x5) for the
second convolution and a width choice (half or all of the units) for the first: 64
architectures. Arms, every one trained ``--epochs`` epochs from scratch on the same batches:

* **largest**: every kernel 5x5, every width full (the most MACs);
* **base**: the network as written (3x3, full widths); **smallest**: 3x3, half widths;
* **random-k**: ``--random`` architectures drawn uniformly;
* **searched**: :func:`neuroexapt.relax.search` for ``--search-epochs`` epochs (weights and
  architecture on alternating batches, ``--mode``, a MAC penalty ``--penalty``), then
  :func:`neuroexapt.relax.discretize`, then the chosen architecture trained from scratch like
  the others (the DARTS protocol).

Reported: each arm's test accuracy and MACs, the search's wall time against training the
largest architecture once (goal: at most 1.5x), and whether the searched model is at least as
accurate as the best fixed architecture with no fewer MACs (goal).

    python benchmarks/cifar10_relax.py --data-dir ../shared/data --json runs/relax.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from typing import Any

import torch
from torch import nn

import neuroexapt
from neuroexapt.relax import choices, discretize, kernel_candidates, relax, search

try:
    from benchmarks.common import Batches, accuracy, params, train_sgd, vgg_cnn
    from benchmarks.data import load_cifar10
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from common import (  # type: ignore[no-redef]
        Batches,
        accuracy,
        params,
        train_sgd,
        vgg_cnn,
    )
    from data import load_cifar10  # type: ignore[no-redef]
    from machine import machine  # type: ignore[no-redef]

BATCH = 128
KERNEL_LAYERS, WIDTH_LAYERS = ("3", "10", "17"), ("0", "7", "14")  # per stage
COST_GOAL = 1.5


def relaxed(width: int, x: torch.Tensor, mode: str) -> nn.Module:
    """The VGG-style CNN with a kernel and a width choice per stage."""
    model = vgg_cnn(width)
    spec: dict[str, Any] = {n: kernel_candidates(model.get_submodule(n), (3, 5))
                            for n in KERNEL_LAYERS}
    for n in WIDTH_LAYERS:
        size = model.get_submodule(n).out_channels
        spec[n] = {"widths": [size // 2, size]}
    return relax(model, spec, example_inputs=x[:2], mode=mode)


def fixed(width: int, x: torch.Tensor, arch: dict[str, int], seed: int) -> nn.Module:
    """The plain architecture ``arch`` (option per choice), freshly initialised."""
    torch.manual_seed(seed)
    model = relaxed(width, x, "gumbel")
    with torch.no_grad():
        for name, choice in choices(model).items():
            choice.alpha.zero_()
            choice.alpha[arch[name]] = 1.0
    discretize(model, example_inputs=x[:2])
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


train = train_sgd  # the shared training loop (benchmarks/common.py)


def describe(model: nn.Module) -> str:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return " ".join(f"{c.out_channels}@{c.kernel_size[0]}" for c in convs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = load_cifar10(args.data_dir, args.subset, args.seed)
    example = x_te[:1]
    names = list(WIDTH_LAYERS) + list(KERNEL_LAYERS)
    arms: dict[str, dict[str, int]] = {
        "largest": dict.fromkeys(names, 1),
        "base": {**dict.fromkeys(KERNEL_LAYERS, 0), **dict.fromkeys(WIDTH_LAYERS, 1)},
        "smallest": dict.fromkeys(names, 0),
    }
    rng = random.Random(args.seed)
    for k in range(args.random):
        arms[f"random-{k}"] = {n: rng.randrange(2) for n in names}
    rows = []
    # the search
    torch.manual_seed(args.seed)
    model = relaxed(args.width, x_tr, args.mode)
    start = time.perf_counter()
    result = search(model, Batches(x_tr, y_tr, BATCH, args.seed, True), args.search_epochs,
                    lr=args.lr, arch_lr=args.arch_lr, penalty=args.penalty, cost="macs",
                    tau=(args.tau, args.tau_end))
    search_s = time.perf_counter() - start
    arms["searched"] = dict(result.chosen)
    print(f"search: {search_s:.0f} s, chosen {result.chosen}", flush=True)
    for arm, arch in arms.items():
        net = fixed(args.width, x_tr, arch, args.seed)
        seconds = train(net, Batches(x_tr, y_tr, BATCH, args.seed + 1, True), args.epochs,
                        args.lr)
        row = {"arm": arm, "arch": arch, "layers": describe(net), "params": params(net),
               "macs": neuroexapt.count_macs(net, example), "acc": accuracy(net, x_te, y_te),
               "train_s": seconds}
        rows.append(row)
        print(f"  {arm}: {row['acc']:.2f}%  {row['macs'] / 1e6:.1f}M MACs  {row['layers']}  "
              f"({seconds:.0f} s)", flush=True)
    by = {r["arm"]: r for r in rows}
    searched = by["searched"]
    rivals = [r for r in rows if r["arm"] != "searched" and r["macs"] >= searched["macs"]]
    best = max(rivals, key=lambda r: r["acc"]) if rivals else None
    cost_ratio = search_s / by["largest"]["train_s"]
    goals = [
        f"search cost {cost_ratio:.2f}x one training of the largest architecture "
        f"(goal <= {COST_GOAL}x): {'met' if cost_ratio <= COST_GOAL else 'missed'}",
        "searched model at least as accurate as the best fixed architecture with no fewer "
        "MACs: " + ("no such architecture" if best is None else
                    f"{searched['acc']:.2f}% vs {best['arm']} {best['acc']:.2f}%: "
                    f"{'met' if searched['acc'] >= best['acc'] else 'missed'}"),
    ]
    return {"rows": rows, "search": {"seconds": search_s, "rows": result.rows,
                                     "chosen": result.chosen},
            "cost_ratio": cost_ratio, "goals": goals}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder of the cifar10_*.npz archives")
    p.add_argument("--subset", type=int, default=10_000, help="training images")
    p.add_argument("--width", type=int, default=16, help="first width of the CNN")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of every arm")
    p.add_argument("--search-epochs", type=int, default=8)
    p.add_argument("--mode", default="hard", choices=["softmax", "gumbel", "hard"])
    p.add_argument("--tau", type=float, default=2.0, help="first Gumbel temperature")
    p.add_argument("--tau-end", type=float, default=0.2)
    p.add_argument("--penalty", type=float, default=0.0, help="weight of the MAC penalty")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--arch-lr", type=float, default=0.01)
    p.add_argument("--random", type=int, default=3, help="random architectures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = run(args)
    out.update({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": machine(), "args": vars(args),
                "wall_s": time.perf_counter() - start})
    print("\n".join(out["goals"]))
    print(f"total wall time {out['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
