"""Pruning on CIFAR-10: NeuroExapt's information criterion against Torch-Pruning (issue 6).

For each model (a wide VGG-style CNN and a CIFAR ResNet-20), one dense model is trained, then
copies of it are pruned to the same MAC targets (``--targets``, shares of the dense model's
MACs removed) by two methods and fine-tuned with the same budget:

* **neuroexapt**: :func:`neuroexapt.prune_to` with ``--score`` (default ``information``: the
  first-order loss of target information, in nats, of removing each unit, per MAC saved;
  ``norm``: group magnitude) and ``--allocation`` (``global`` ranking or ``uniform`` share),
  ``--steps`` rounds, scored on ``--score-batches`` training batches;
* **neuroexapt-latency** (``--latency-arm``): :func:`neuroexapt.prune_to` with
  ``by="latency"``: the same score per second saved, each module's latency measured on a batch
  of 64 with ``--latency-threads`` threads, until the measured latency falls by the target
  share (so its MACs differ from the other arms'; compare it by measured latency);
* **torch-pruning**: ``torch_pruning.pruner.MetaPruner`` with ``GroupMagnitudeImportance(p=2)``
  (its default), uniform per-layer ratio, the ratio found by bisection so that the pruned
  model has the MACs (``neuroexapt.count_macs``) the neuroexapt model reached (closest from
  above): the comparison at equal MACs;
* **torch-pruning-latency** (with ``--latency-arm``): the same, at the ratio (of 0.05, 0.10,
  ..., 0.90) whose latency at batch 64 is closest to the neuroexapt-latency model's, all
  timed in one rotation (``--latency-threads`` threads): the comparison at equal measured
  latency.

Training and fine-tuning: SGD (momentum 0.9, weight decay 5e-4, Nesterov), cosine learning
rate, batch 128, random crop and flip; the dense model trains ``--epochs``, every pruned one
fine-tunes ``--finetune-epochs`` from ``--finetune-lr``. Accuracy is on the full 10,000-image
test split. Latency: eval mode, ``torch.no_grad``, ``--latency-threads`` threads, the dense and
every pruned model of one target timed in rotation (median of ``--repeats`` runs) at batch 1
and 64; speedup = dense / pruned, measured side by side.

Usage::

    .venv/bin/python benchmarks/cifar10_pruning.py --data-dir ../shared/data \\
        --json runs/cifar10_pruning.json --plot runs/cifar10_pruning.png
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt

try:
    from benchmarks.common import (
        Batches,
        accuracy,
        paired_latency,
        params,
        train_sgd,
        vgg_cnn,
    )
    from benchmarks.data import load_cifar10
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from common import (  # type: ignore[no-redef]
        Batches,
        accuracy,
        paired_latency,
        params,
        train_sgd,
        vgg_cnn,
    )
    from data import load_cifar10  # type: ignore[no-redef]
    from machine import machine  # type: ignore[no-redef]

PARAM_GOAL, ACC_GOAL, SPEED_GOAL, SPEED_GOAL_B1 = 0.50, 0.5, 2.0, 1.5  # issue 11
BATCH = 128


# ----------------------------------------------------------------------------- models
def wide_cnn(width: int = 32) -> nn.Sequential:
    """VGG-style: conv w, w, pool, 2w, 2w, pool, 4w, 4w, global pool, linear (BN + ReLU)."""
    return vgg_cnn(width, pool_last=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, section 4.2), widths 16/32/64."""

    def __init__(self, n: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        c = width
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(BasicBlock(c, out, 2 if stage > 0 and i == 0 else 1))
                c = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS: dict[str, Callable[[argparse.Namespace], nn.Module]] = {
    "wide_cnn": lambda a: wide_cnn(a.width),
    "resnet20": lambda a: ResNetCifar(3, a.resnet_width),
}


# ----------------------------------------------------------------------------- training
train = train_sgd  # the shared training loop (benchmarks/common.py)


# ----------------------------------------------------------------------------- pruning
def prune_neuroexapt(model: nn.Module, data: Batches, amount: float,
                     args: argparse.Namespace, by: str = "macs") -> None:
    batches = [b for _, b in zip(range(args.score_batches), data, strict=False)]
    if by == "latency":  # measured on batches of 64 at the inference thread count
        batches = [(x[:64], y[:64]) for x, y in batches]
        torch.set_num_threads(args.latency_threads)
    try:
        neuroexapt.prune_to(model, batches, amount, by=by, score=args.score,
                            steps=args.steps, batches=len(batches),
                            allocation=args.allocation)
    finally:
        torch.set_num_threads(args.threads)


def _tp_pruned(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    last = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(pruned, example, importance=tp.importance.
                                  GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[last])
    pruner.step()
    return pruned


def prune_torch_pruning(model: nn.Module, goal_macs: float, example: torch.Tensor
                        ) -> tuple[nn.Module, float]:
    """The uniform channel ratio whose pruned model is closest above ``goal_macs``' cut."""
    low, high = 0.0, 0.95
    best = None
    for _ in range(10):
        mid = 0.5 * (low + high)
        candidate = _tp_pruned(model, mid, example)
        if neuroexapt.count_macs(candidate, example) > goal_macs:
            low = mid
        else:
            high, best = mid, candidate
    if best is None:
        best = _tp_pruned(model, high, example)
    return best, high


def prune_torch_pruning_latency(model: nn.Module, reference: nn.Module, x: torch.Tensor,
                                repeats: int) -> tuple[nn.Module, float]:
    """The uniform ratio whose pruned model runs ``x`` closest to ``reference``'s latency.

    Latency is not monotonic in the ratio on a CPU (some channel counts run slower than
    larger ones), so instead of a bisection, Torch-Pruning's models at ratios 0.05, 0.10, ...,
    0.90 are all timed in one rotation with ``reference`` (median of ``repeats``), and the one
    whose latency is closest to it (in log ratio) is kept.
    """
    ratios = [round(0.05 * k, 2) for k in range(1, 19)]
    candidates = [_tp_pruned(model, r, x[:1]) for r in ratios]
    times = paired_latency([reference, *candidates], x, repeats, 2)
    gaps = [abs(math.log(t / times[0])) for t in times[1:]]
    best = min(range(len(ratios)), key=gaps.__getitem__)
    return candidates[best], ratios[best]


def dense_model(name: str, x_tr: torch.Tensor, y_tr: torch.Tensor, args: argparse.Namespace
                ) -> tuple[nn.Module, float]:
    """The trained dense model and its training seconds, from ``--dense-cache`` if there."""
    torch.manual_seed(args.seed)
    dense = MODELS[name](args)
    path = None
    if args.dense_cache:
        key = f"{name}_w{args.width if name == 'wide_cnn' else args.resnet_width}" \
              f"_n{len(x_tr)}_e{args.epochs}_lr{args.lr}_s{args.seed}"
        path = f"{args.dense_cache}/{key}.pt"
        try:
            saved = torch.load(path)
        except FileNotFoundError:
            pass
        else:
            dense.load_state_dict(saved["state"])
            print(f"{name} dense: loaded {path}", flush=True)
            return dense, float(saved["train_s"])
    train_s = train(dense, Batches(x_tr, y_tr, BATCH, args.seed, True), args.epochs, args.lr)
    if path is not None:
        import os
        os.makedirs(args.dense_cache, exist_ok=True)
        torch.save({"state": dense.state_dict(), "train_s": train_s}, path)
    return dense, train_s


# ----------------------------------------------------------------------------- run
def run_model(name: str, split: tuple[torch.Tensor, ...], args: argparse.Namespace
              ) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = split
    dense, train_s = dense_model(name, x_tr, y_tr, args)
    example = x_te[:1]
    base = {"params": params(dense), "macs": neuroexapt.count_macs(dense, example),
            "acc": accuracy(dense, x_te, y_te), "train_s": train_s}
    print(f"{name} dense: {base['params']:,} params, {base['macs'] / 1e6:.1f}M MACs, "
          f"{base['acc']:.2f}%, trained in {train_s:.0f} s", flush=True)
    rows = []
    for amount in args.targets:
        pruned: dict[str, nn.Module] = {}
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        prune_neuroexapt(model, Batches(x_tr, y_tr, BATCH, args.seed + 999), amount, args)
        prune_s = {"neuroexapt": time.perf_counter() - start}
        pruned["neuroexapt"] = model
        if args.latency_arm:
            fast = copy.deepcopy(dense)
            start = time.perf_counter()
            prune_neuroexapt(fast, Batches(x_tr, y_tr, BATCH, args.seed + 999), amount, args,
                             by="latency")
            prune_s["neuroexapt-latency"] = time.perf_counter() - start
            pruned["neuroexapt-latency"] = fast
        start = time.perf_counter()
        # Torch-Pruning at the MACs prune_to reached (rounding to multiples of 8 can take it
        # past the target): the comparison at equal MACs
        tp_model, ratio = prune_torch_pruning(
            dense, neuroexapt.count_macs(pruned["neuroexapt"], example), example)
        prune_s["torch-pruning"] = time.perf_counter() - start
        pruned["torch-pruning"], ratios = tp_model, {"torch-pruning": ratio}
        if args.latency_arm:
            torch.set_num_threads(args.latency_threads)
            start = time.perf_counter()
            tp_fast, ratios["torch-pruning-latency"] = prune_torch_pruning_latency(
                dense, pruned["neuroexapt-latency"], torch.randn(64, 3, 32, 32),
                max(5, args.repeats // 3))
            prune_s["torch-pruning-latency"] = time.perf_counter() - start
            torch.set_num_threads(args.threads)
            pruned["torch-pruning-latency"] = tp_fast
        for method, m in pruned.items():
            before = accuracy(m, x_te, y_te)
            tune_s = train(m, Batches(x_tr, y_tr, BATCH, args.seed + 1, True),
                           args.finetune_epochs, args.finetune_lr)
            rows.append({"model": name, "target": amount, "method": method,
                         "params": params(m), "macs": neuroexapt.count_macs(m, example),
                         "acc_after_prune": before, "acc": accuracy(m, x_te, y_te),
                         "prune_s": prune_s[method], "finetune_s": tune_s,
                         "tp_ratio": ratios.get(method)})
        torch.set_num_threads(args.latency_threads)
        for batch, repeats in ((1, args.repeats), (64, max(5, args.repeats // 3))):
            x = torch.randn(batch, 3, 32, 32)
            times = paired_latency([dense, *pruned.values()], x, repeats, 3)
            for row, t in zip(rows[-len(pruned):], times[1:], strict=True):
                row[f"b{batch}_ms"] = 1e3 * t
                row[f"dense_b{batch}_ms"] = 1e3 * times[0]
                row[f"speedup_b{batch}"] = times[0] / t
        torch.set_num_threads(args.threads)
        for row in rows[-len(pruned):]:
            row["param_cut_pct"] = 100.0 * (1 - row["params"] / base["params"])
            row["mac_cut_pct"] = 100.0 * (1 - row["macs"] / base["macs"])
            row["acc_change_pts"] = row["acc"] - base["acc"]
            print(f"  {name} -{amount:.0%} MACs {row['method']}: {row['acc']:.2f}% "
                  f"({row['acc_change_pts']:+.2f}), params -{row['param_cut_pct']:.1f}%, "
                  f"b64 {row['speedup_b64']:.2f}x", flush=True)
    return {"dense": base, "rows": rows}


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's pruning goals, met or missed, for each model (NeuroExapt rows)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ours = [r for r in mine if r["method"] in ("neuroexapt", "neuroexapt-latency")]
        ok = [r for r in ours if r["param_cut_pct"] >= 100 * PARAM_GOAL
              and r["acc_change_pts"] >= -ACC_GOAL and r["speedup_b64"] >= SPEED_GOAL
              and r["speedup_b1"] >= SPEED_GOAL_B1]
        met = ", ".join(f"{r['method']} at -{r['target']:.0%}" for r in ok)
        out.append(f"{model}: >=50% params, <=0.5 pt loss, >=2x b64, >=1.5x b1: "
                   f"{'met by ' + met if ok else 'missed'}")
        for arm, peer, what in (("neuroexapt", "torch-pruning", "MACs"),
                                ("neuroexapt-latency", "torch-pruning-latency",
                                 "measured latency")):
            theirs = {r["target"]: r for r in mine if r["method"] == peer}
            pairs = [(r, theirs[r["target"]]) for r in mine
                     if r["method"] == arm and r["target"] in theirs]
            if pairs:
                wins = [r for r, t in pairs if r["acc"] >= t["acc"]]
                out.append(f"{model}: accuracy >= Torch-Pruning's at equal {what}: "
                           f"{len(wins)} of {len(pairs)} targets")
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| model | MACs cut | method | params | MACs | acc after prune % | "
             "acc after fine-tune % | change pts | b1 ms (dense) | b1 speedup | b64 ms (dense) "
             "| b64 speedup | prune s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in result["models"].items():
        d = res["dense"]
        lines.append(f"| {name} | 0% | dense | {d['params']:,} | {d['macs'] / 1e6:.1f}M | | "
                     f"{d['acc']:.2f} | | | | | |")
        for r in res["rows"]:
            lines.append(
                f"| {name} | {r['mac_cut_pct']:.0f}% | {r['method']} | {r['params']:,} "
                f"(-{r['param_cut_pct']:.0f}%) | {r['macs'] / 1e6:.1f}M | "
                f"{r['acc_after_prune']:.2f} | {r['acc']:.2f} | {r['acc_change_pts']:+.2f} | "
                f"{r['b1_ms']:.2f} ({r['dense_b1_ms']:.2f}) | {r['speedup_b1']:.2f}x | "
                f"{r['b64_ms']:.1f} ({r['dense_b64_ms']:.1f}) | {r['speedup_b64']:.2f}x | "
                f"{r['prune_s']:.1f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        res = result["models"][name]
        d = res["dense"]
        for method, marker in (("neuroexapt", "o"), ("neuroexapt-latency", "^"),
                               ("torch-pruning", "s"), ("torch-pruning-latency", "v")):
            rows = [r for r in res["rows"] if r["method"] == method]
            if rows:
                ax.plot([r["speedup_b64"] for r in rows], [r["acc"] for r in rows],
                        marker=marker, label=method)
        ax.scatter([1.0], [d["acc"]], marker="*", s=150, c="k")
        ax.set_xlabel("measured speed-up at batch 64 (dense = 1)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{name}: pruned, then fine-tuned")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder of the cifar10_*.npz archives")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--subset", type=int, default=10_000, help="training images (None: all)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the dense model")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                   help="shares of the dense model's MACs to remove")
    p.add_argument("--width", type=int, default=32, help="first width of the wide CNN")
    p.add_argument("--resnet-width", type=int, default=16, help="first width of ResNet-20")
    p.add_argument("--steps", type=int, default=5, help="rounds of neuroexapt.prune_to")
    p.add_argument("--score-batches", type=int, default=8)
    p.add_argument("--score", default="information", choices=["information", "norm"],
                   help="prune_to's unit score")
    p.add_argument("--allocation", default="global", choices=["global", "uniform"],
                   help="prune_to's allocation of the cut among layers")
    p.add_argument("--latency-arm", action="store_true",
                   help="also prune by measured latency (neuroexapt-latency)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for training")
    p.add_argument("--latency-threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30, help="latency repeats at batch 1")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--dense-cache", default=None,
                   help="folder to save the trained dense models in and load them from")
    args = p.parse_args(argv)
    if args.subset is not None and args.subset <= 0:
        args.subset = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    split = load_cifar10(args.data_dir, args.subset, args.seed)
    result: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "machine": machine(), "args": vars(args), "models": {}}
    for name in args.models:
        torch.set_num_threads(args.threads)
        result["models"][name] = run_model(name, split, args)
    rows = [r for res in result["models"].values() for r in res["rows"]]
    result["goals"] = goals(rows)
    result["wall_s"] = time.perf_counter() - start
    print(table(result))
    print("\n".join(result["goals"]))
    print(f"total wall time {result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
