"""Pruning a wide CNN on Fashion-MNIST with ``neuroexapt.Trainer`` (issue 5).

Aims from the issue: 30-50% fewer parameters, at most 0.5 point test-accuracy loss and 2x
faster CPU inference (batch 1 and 64).

Two arms share the seed, the initial weights, the data order, the epochs and the optimizer
(Adam, ``--lr``):

* **A, baseline**: ``neuroexapt.Trainer(model, info_weight=0, entropy_threshold=0)``: the
  same loop and gates with neither the regulariser nor any pruning;
* **B, pruned**: ``neuroexapt.Trainer(model, info_weight=X, entropy_threshold=T,
  evolve_every=1)``: the gates are priced and units below the adaptive threshold are removed
  for real (``narrow``).

The validation split that the Trainer uses for rollback is the last ``--val`` images of the
training subset; the accuracy reported is on the full 10,000-image test split. Latency:
``torch.no_grad``, eval mode, ``torch.set_num_threads(--threads)``, a warm-up, then A and B
timed alternately (``time.perf_counter`` around one forward) and the median reported;
speedup = median A / median B.

The gates start at ``mu = 1``, ``log sigma^2 = -9``, that is 4.5 nats per unit, and their Adam
(lr 1e-2) moves ``log sigma^2`` by about 0.01 a batch; on a short run the threshold must
therefore sit near 4.5 nats for anything to be pruned (0.3-1 nats prunes nothing in a few
hundred batches).

Usage::

    .venv/bin/python benchmarks/pruning.py --data-dir ../shared/data
    .venv/bin/python benchmarks/pruning.py --data-dir ../shared/data --info-weight 1 \\
        --entropy-threshold 0.5 --json pruning.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from typing import Any

import torch
from torch import nn

import neuroexapt

try:
    from benchmarks.common import Batches, accuracy, conv_widths, paired_latency, params
    from benchmarks.data import load_fashion_mnist
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from common import (  # type: ignore[no-redef]
        Batches,
        accuracy,
        conv_widths,
        paired_latency,
        params,
    )
    from data import load_fashion_mnist  # type: ignore[no-redef]
    from machine import machine  # type: ignore[no-redef]

PARAM_AIM = (0.30, 0.50)  # issue 5: 30-50% fewer parameters
ACC_AIM = 0.5  # issue 5: at most 0.5 accuracy points lost
SPEED_AIM = 2.0  # issue 5: 2x faster inference
BATCH = 128  # training batch size


def wide_cnn(width: int = 64) -> nn.Sequential:
    """conv w - conv w - pool - conv 2w - pool - linear, with BN and ReLU, for 1x28x28."""
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU()]
    return nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                         *block(width, 2 * width), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * width * 7 * 7, 10))


def train_arm(init: nn.Module, split: tuple[torch.Tensor, ...], args: argparse.Namespace,
              info_weight: float, threshold: float) -> tuple[nn.Module, dict[str, Any]]:
    """Train a copy of ``init`` with the Trainer; the model, its history and wall time."""
    x_tr, y_tr, x_val, y_val = split
    torch.manual_seed(args.seed)  # the gates' noise: the same stream in both arms
    model = copy.deepcopy(init)
    trainer = neuroexapt.Trainer(model, info_weight=info_weight, entropy_threshold=threshold,
                                 lr=args.lr, evolve_every=1, progress=False)
    start = time.perf_counter()
    history = trainer.fit(Batches(x_tr, y_tr, BATCH, args.seed),
                          Batches(x_val, y_val, 500, None), epochs=args.epochs)
    return trainer.model, {"train_s": time.perf_counter() - start, "history": history}


@torch.no_grad()
def latency(a: nn.Module, b: nn.Module, batch: int, repeats: int, warmup: int
            ) -> tuple[float, float]:
    """Median seconds of one forward of ``a`` and of ``b``, timed alternately."""
    ta, tb = paired_latency([a, b], torch.randn(batch, 1, 28, 28), repeats, warmup)
    return ta, tb


def verdict(row: dict[str, Any]) -> str:
    parts = [
        ("params", PARAM_AIM[0] * 100 <= row["param_reduction_pct"],
         f"{row['param_reduction_pct']:.1f}% fewer"),
        ("accuracy", row["acc_change_pts"] >= -ACC_AIM, f"{row['acc_change_pts']:+.2f} pts"),
        ("speed b1", row["speedup_b1"] >= SPEED_AIM, f"{row['speedup_b1']:.2f}x"),
        ("speed b64", row["speedup_b64"] >= SPEED_AIM, f"{row['speedup_b64']:.2f}x"),
    ]
    return ", ".join(f"{n} {v} ({'met' if ok else 'missed'})" for n, ok, v in parts)


def table(base: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = ("| arm | info_weight | entropy_threshold | conv widths | parameters | test acc % | "
            "b1 ms | b64 ms | train s |\n|---|---:|---:|---|---:|---:|---:|---:|---:|")
    lines = [head, f"| A baseline | 0 | 0 | {base['widths']} | {base['params']:,} | "
             f"{base['acc']:.2f} | {base['b1_ms']:.3f} | {base['b64_ms']:.2f} | "
             f"{base['train_s']:.0f} |"]
    for r in rows:
        lines.append(f"| B pruned | {r['info_weight']:g} | {r['entropy_threshold']:g} | "
                     f"{r['widths']} | {r['params']:,} | {r['acc']:.2f} | {r['b1_ms']:.3f} | "
                     f"{r['b64_ms']:.2f} | {r['train_s']:.0f} |")
    lines += ["", "| setting (X, T) | parameters | accuracy | b1 ms A / B | speedup b1 | "
              "b64 ms A / B | speedup b64 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:  # A's latency as measured beside this B
        lines.append(f"| {r['info_weight']:g}, {r['entropy_threshold']:g} | "
                     f"-{r['param_reduction_pct']:.1f}% | {r['acc_change_pts']:+.2f} pts | "
                     f"{r['base_b1_ms']:.3f} / {r['b1_ms']:.3f} | {r['speedup_b1']:.2f}x | "
                     f"{r['base_b64_ms']:.2f} / {r['b64_ms']:.2f} | {r['speedup_b64']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder of fashion_mnist_*.npz")
    p.add_argument("--train-subset", type=int, default=4_500,
                   help="training images drawn (seeded), of which --val validate")
    p.add_argument("--val", type=int, default=500, help="validation images for rollback")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=64, help="channels of the first two convs")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--info-weight", type=float, nargs="+", default=[1.0],
                   help="one or more settings, paired with --entropy-threshold")
    p.add_argument("--entropy-threshold", type=float, nargs="+", default=[4.4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats-b1", type=int, default=30)
    p.add_argument("--repeats-b64", type=int, default=10)
    p.add_argument("--json", default=None, help="write the results to this path")
    args = p.parse_args(argv)
    if len(args.info_weight) != len(args.entropy_threshold):
        p.error("--info-weight and --entropy-threshold need the same number of values")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data_dir, args.train_subset, args.seed)
    n = len(y_tr) - args.val
    split = (x_tr[:n], y_tr[:n], x_tr[n:], y_tr[n:])
    torch.manual_seed(args.seed)
    init = wide_cnn(args.width)
    base_model, base = train_arm(init, split, args, 0.0, 0.0)
    base.update(params=params(base_model), acc=accuracy(base_model, x_te, y_te),
                widths=conv_widths(base_model))
    print(f"A baseline: {base['params']:,} params, {base['acc']:.2f}%, "
          f"{base['train_s']:.0f} s", flush=True)
    rows = []
    for iw, et in zip(args.info_weight, args.entropy_threshold, strict=True):
        model, row = train_arm(init, split, args, iw, et)
        row.update(info_weight=iw, entropy_threshold=et, params=params(model),
                   acc=accuracy(model, x_te, y_te), widths=conv_widths(model))
        b1 = latency(base_model, model, 1, args.repeats_b1, 5)
        b64 = latency(base_model, model, 64, args.repeats_b64, 2)
        row.update(b1_ms=1e3 * b1[1], b64_ms=1e3 * b64[1], base_b1_ms=1e3 * b1[0],
                   base_b64_ms=1e3 * b64[0], speedup_b1=b1[0] / b1[1],
                   speedup_b64=b64[0] / b64[1],
                   param_reduction_pct=100.0 * (1 - row["params"] / base["params"]),
                   acc_change_pts=row["acc"] - base["acc"])
        rows.append(row)
        print(f"B ({iw:g}, {et:g}): {verdict(row)}", flush=True)
    # the baseline's latency is measured beside each pruned model; the table shows the first
    base.update(b1_ms=rows[0]["base_b1_ms"], b64_ms=rows[0]["base_b64_ms"])
    print(table(base, rows))
    if args.json:
        result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "machine": machine(), "args": vars(args), "baseline": base, "pruned": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
