"""Does ``channels_last`` help the pruned models on this CPU? (issue 11)

On the pruning benchmark's two models (``cifar10_pruning.py``: the wide CNN and ResNet-20,
untrained: latency does not depend on the weights), the dense model and the one
``neuroexapt.prune_to(by="latency", score="norm")`` makes ``--amount`` faster are each timed in
the default (contiguous, NCHW) memory format and in ``channels_last`` (NHWC: the model and
its input converted with ``.to(memory_format=torch.channels_last)``), all four timed in
rotation (median of ``--repeats``), eval mode, ``no_grad``, at batch 1 and 64.

Usage::

    .venv/bin/python benchmarks/channels_last.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

import neuroexapt

try:
    from benchmarks import cifar10_pruning as pruning
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    import cifar10_pruning as pruning  # type: ignore[no-redef]
    from machine import machine  # type: ignore[no-redef]


@torch.no_grad()
def rotated(models: list[torch.nn.Module], inputs: tuple[torch.Tensor, ...], repeats: int
            ) -> list[float]:
    """Median seconds of each model on its input, timed in rotating order after 3 warm-ups."""
    for m, x in zip(models, inputs, strict=True):
        for _ in range(3):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for r in range(repeats):
        for j in range(len(models)):
            i = (r + j) % len(models)
            start = time.perf_counter()
            models[i](inputs[i])
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--amount", type=float, default=0.5, help="share of the latency removed")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=int, default=32, help="first width of the wide CNN")
    p.add_argument("--resnet-width", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{machine()}; {args.threads} threads; prune_to -{args.amount:.0%} latency")
    print("| model | batch | dense NCHW ms | dense NHWC ms | pruned NCHW ms | pruned NHWC ms |"
          "\n|---|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 3, 32, 32, generator=gen),
             torch.randint(0, 10, (64,), generator=gen)) for _ in range(2)]
    last = torch.channels_last
    for name, build in pruning.MODELS.items():
        torch.manual_seed(0)
        dense = build(args).eval()
        pruned = copy.deepcopy(dense)
        neuroexapt.prune_to(pruned, data, args.amount, by="latency", score="norm", batches=2)
        models = [dense, copy.deepcopy(dense).to(memory_format=last), pruned,
                  copy.deepcopy(pruned).to(memory_format=last)]
        for batch in (1, 64):
            x = torch.randn(batch, 3, 32, 32, generator=gen)
            inputs = (x, x.to(memory_format=last)) * 2
            times = rotated(models, inputs, args.repeats if batch == 1 else
                            max(5, args.repeats // 3))
            print(f"| {name} | {batch} | " + " | ".join(f"{1e3 * t:.2f}" for t in times) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
