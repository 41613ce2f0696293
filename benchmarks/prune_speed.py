"""How long pruning takes: ``neuroexapt.prune_to`` against Torch-Pruning (issue 11).

On the pruning benchmark's two models (``cifar10_pruning.py``: the wide CNN and ResNet-20, as
built, untrained; the time does not depend on the weights), each method removes ``--amount``
of the MACs, timed side by side in rotating order, median of ``--repeats``:

* ``neuroexapt norm``: ``prune_to(by="macs", score="norm")``: the structural work alone (one
  trace and one ``narrow_many`` per round, MAC counting);
* ``neuroexapt information``: ``prune_to(by="macs")`` with its default score, which adds one
  forward and backward pass per scoring batch (``--score-batches`` of 128 random images);
* ``torch-pruning``: the pruning benchmark's procedure, a ``MetaPruner`` with magnitude
  importance and a uniform ratio found by 10 bisection steps on the MACs;
* ``torch-pruning one step``: one ``MetaPruner`` step at the ratio that bisection found.

Usage::

    .venv/bin/python benchmarks/prune_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch

import neuroexapt

try:
    from benchmarks import cifar10_pruning as pruning
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    import cifar10_pruning as pruning  # type: ignore[no-redef]
    from machine import machine  # type: ignore[no-redef]


def methods(model: torch.nn.Module, batches: list, amount: float
            ) -> dict[str, Callable[[], object]]:
    """Each method as a call that prunes a fresh copy of ``model``."""
    example = batches[0][0][:1]
    goal = neuroexapt.count_macs(model, example) * (1 - amount)
    _, ratio = pruning.prune_torch_pruning(model, goal, example)
    return {
        "neuroexapt norm": lambda: neuroexapt.prune_to(
            copy.deepcopy(model), batches, amount, by="macs", score="norm"),
        "neuroexapt information": lambda: neuroexapt.prune_to(
            copy.deepcopy(model), batches, amount, by="macs", batches=len(batches)),
        "torch-pruning": lambda: pruning.prune_torch_pruning(model, goal, example),
        "torch-pruning one step": lambda: pruning._tp_pruned(model, ratio, example),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--amount", type=float, default=0.5, help="share of the MACs to remove")
    p.add_argument("--score-batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=int, default=32, help="first width of the wide CNN")
    p.add_argument("--resnet-width", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{machine()}; {args.threads} threads; -{args.amount:.0%} MACs; "
          f"{args.score_batches} scoring batches of 128", flush=True)
    print("| model | method | median s | x torch-pruning |\n|---|---|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(128, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (128,), generator=gen)) for _ in range(args.score_batches)]
    for name, build in pruning.MODELS.items():
        torch.manual_seed(0)
        model = build(args)
        calls = methods(model, batches, args.amount)
        times: dict[str, list[float]] = {k: [] for k in calls}
        names = list(calls)
        for r in range(args.repeats):
            for j in range(len(names)):  # rotating order: load elsewhere falls on all alike
                key = names[(r + j) % len(names)]
                start = time.perf_counter()
                calls[key]()
                times[key].append(time.perf_counter() - start)
        base = statistics.median(times["torch-pruning"])
        for key in names:
            t = statistics.median(times[key])
            print(f"| {name} | {key} | {t:.2f} | {t / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
