"""Wall-time overhead of DNM and of the NeuroExapt Trainer against the plain loop (issue 6).

Three arms train the same initial model (``VGGSmall`` of ``analysis_overhead.py``, 160k
parameters) on the same CIFAR-10 subset in the same order with the same SGD optimizer, and
validate after every epoch:

* **plain**: the training loop alone;
* **dnm**: the same loop with ``DNMFramework(model, config)`` (the growth benchmark's
  configuration: the document's advanced keys plus a budget) and its documented calls after
  every epoch (``update_caches``, ``record_performance``, ``should_trigger_morphogenesis``,
  ``execute_morphogenesis``), growing the model as it decides. DNM's own work is measured
  directly: the time inside its hooks on the sampled training batches
  (``dnm.recorder.seconds``) plus the time inside those calls, reported as a share of the rest
  of that arm's loop (the training of the model it grew);
* **trainer**: ``neuroexapt.Trainer(info_weight=0.1, entropy_threshold=0)``: the gates and
  the information regulariser on every hidden layer, without structural change, so the
  difference from plain is the analysis alone.

The arms run ``--repeats`` times in rotating order (plain, dnm, trainer; then dnm, trainer,
plain; ...) so that load elsewhere on the machine falls on all of them; the median wall time
per arm is reported with each repeat's ratios. ``--edits`` also runs
``edit_latency.py`` (the latency of every edit on a ResNet-18) with the same thread count.

Usage::

    .venv/bin/python benchmarks/overhead.py --data-dir ../shared/data --json runs/overhead.json
    .venv/bin/python benchmarks/overhead.py --data-dir ../shared/data --edits
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt
from neuroexapt.core import DNMFramework

try:
    from benchmarks import edit_latency
    from benchmarks.analysis_overhead import VGGSmall
    from benchmarks.cifar10_growth import DNM_CONFIG
    from benchmarks.common import Batches, accuracy, evaluate, params
    from benchmarks.data import load_cifar10
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    import edit_latency  # type: ignore[no-redef]
    from analysis_overhead import VGGSmall  # type: ignore[no-redef]
    from cifar10_growth import DNM_CONFIG  # type: ignore[no-redef]
    from common import Batches, accuracy, evaluate, params  # type: ignore[no-redef]
    from data import load_cifar10  # type: ignore[no-redef]
    from machine import machine  # type: ignore[no-redef]

OVERHEAD_GOAL = 0.05  # issue 6: analysis overhead at most 5%
DNM_OWN_GOAL = 0.03  # issue 10: DNM's own work at most 3% of the training loop
ARMS = ("plain", "dnm", "trainer")
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, batches: Batches) -> tuple[float, float]:
    model.train()
    total = hits = count = 0.0
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(y)
        hits += float((out.argmax(1) == y).sum())
        count += len(y)
    return total / count, hits / count


def run_plain(init: nn.Module, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    model = copy.deepcopy(init)
    opt = _sgd(model, args.lr)
    train = Batches(data[0], data[1], args.batch, args.seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        _epoch(model, opt, train)
        evaluate(model, *_val(data, args))
    return {"wall_s": time.perf_counter() - start, "model": model}


def run_dnm(init: nn.Module, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    model = copy.deepcopy(init)
    opt = _sgd(model, args.lr)
    train = Batches(data[0], data[1], args.batch, args.seed)
    config = {**DNM_CONFIG, "total_epochs": args.epochs}
    dnm = DNMFramework(model, config)  # the document's call: no optimizer=, no probe=
    inside = 0.0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train_loss, train_acc = _epoch(model, opt, train)
        val_loss, val_pct = evaluate(model, *_val(data, args))
        val_acc = val_pct / 100.0
        t0 = time.perf_counter()
        dnm.update_caches()
        dnm.record_performance(val_acc)
        trigger, _ = dnm.should_trigger_morphogenesis(
            epoch, {"accuracy": train_acc, "loss": train_loss},
            {"accuracy": val_acc, "loss": val_loss})
        if trigger:
            dnm.execute_morphogenesis(epoch)
            model = dnm.model
        inside += time.perf_counter() - t0
    wall = time.perf_counter() - start
    changes = sum(e.kind != "rollback" for e in dnm.events.events)
    hooks = dnm.recorder.seconds
    dnm.close()
    return {"wall_s": wall, "dnm_calls_s": inside, "dnm_hooks_s": hooks, "model": model,
            "changes": changes}


def run_trainer(init: nn.Module, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    model = copy.deepcopy(init)
    opt = _sgd(model, args.lr)
    trainer = neuroexapt.Trainer(model, info_weight=0.1, entropy_threshold=0.0, optimizer=opt,
                                 lr=args.lr, progress=False)
    start = time.perf_counter()
    x, y = _val(data, args)
    val = [(x[i:i + 500], y[i:i + 500]) for i in range(0, len(y), 500)]
    trainer.fit(Batches(data[0], data[1], args.batch, args.seed), val, args.epochs)
    return {"wall_s": time.perf_counter() - start, "model": trainer.model}


RUNNERS = {"plain": run_plain, "dnm": run_dnm, "trainer": run_trainer}


def _val(data: Data, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``--val`` test images and labels, used for validation."""
    return data[2][:args.val], data[3][:args.val]


def measure(data: Data, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    init = VGGSmall()
    warm = copy.deepcopy(init)  # one-time costs (allocator, kernels) before any timing
    _epoch(warm, _sgd(warm, args.lr), Batches(data[0][:512], data[1][:512], args.batch, 0))
    arms = args.arms
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for r in range(args.repeats):
        for i in range(len(arms)):
            arm = arms[(r + i) % len(arms)]
            torch.manual_seed(args.seed + r)
            out = RUNNERS[arm](init, data, args)
            model = out.pop("model")
            out.update(params=params(model), acc=accuracy(model, data[2], data[3]))
            runs[arm].append(out)
            print(f"repeat {r + 1} {arm}: {out['wall_s']:.1f} s", flush=True)
    plain = [x["wall_s"] for x in runs["plain"]]
    summary: dict[str, dict[str, Any]] = {}
    for arm in arms:
        walls = [x["wall_s"] for x in runs[arm]]
        summary[arm] = {"median_s": statistics.median(walls),
                        "ratios": [w / p for w, p in zip(walls, plain, strict=True)],
                        "params": runs[arm][-1]["params"],
                        "acc": statistics.mean(x["acc"] for x in runs[arm])}
        summary[arm]["overhead"] = summary[arm]["median_s"] / summary["plain"]["median_s"] - 1
    if "dnm" in runs:
        own = [x["dnm_calls_s"] + x["dnm_hooks_s"] for x in runs["dnm"]]
        summary["dnm"]["own_share"] = statistics.median(
            o / (x["wall_s"] - o) for o, x in zip(own, runs["dnm"], strict=True))
        summary["dnm"]["hooks_share"] = statistics.median(
            x["dnm_hooks_s"] / (x["wall_s"] - o) for o, x in zip(own, runs["dnm"], strict=True))
        summary["dnm"]["changes"] = [x["changes"] for x in runs["dnm"]]
    return {"runs": runs, "summary": summary}


def table(result: dict[str, Any], args: argparse.Namespace) -> str:
    s = result["summary"]
    lines = ["| arm | median wall s | overhead vs plain | per-repeat ratio | final params | "
             "test acc % |", "|---|---:|---:|---|---:|---:|"]
    for arm in args.arms:
        row = s[arm]
        ratios = ", ".join(f"{r:.3f}" for r in row["ratios"])
        lines.append(f"| {arm} | {row['median_s']:.1f} | {100 * row['overhead']:+.1f}% | "
                     f"{ratios} | {row['params']:,} | {row['acc']:.2f} |")
    lines.append("")
    if "dnm" in s:
        own = s["dnm"]["own_share"] <= DNM_OWN_GOAL
        lines.append(f"DNM's own work (its hooks on the training batches and its calls after "
                     f"each epoch) took {100 * s['dnm']['own_share']:.1f}% of the rest of its "
                     f"loop's wall time, the hooks {100 * s['dnm']['hooks_share']:.1f}% (median "
                     f"over repeats; goal <= {100 * DNM_OWN_GOAL:.0f}%: "
                     f"{'met' if own else 'missed'}); changes made per run: "
                     f"{s['dnm']['changes']}.")
    if "trainer" in s:
        goal = s["trainer"]["overhead"] <= OVERHEAD_GOAL
        lines.append(f"Trainer analysis overhead {100 * s['trainer']['overhead']:+.1f}% "
                     f"(goal <= {100 * OVERHEAD_GOAL:.0f}%: {'met' if goal else 'missed'}); "
                     f"{args.epochs} epochs of {args.subset} images, {args.threads} threads.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder of the cifar10_*.npz archives")
    p.add_argument("--subset", type=int, default=10_000, help="training images")
    p.add_argument("--val", type=int, default=1_000, help="test images used for validation")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--edits", action="store_true", help="also run edit_latency.py")
    p.add_argument("--arms", default=",".join(ARMS),
                   help="comma-separated arms among plain, dnm, trainer (plain is always run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(wanted) - set(ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; valid: {', '.join(ARMS)}")
    args.arms = [a for a in ARMS if a == "plain" or a in wanted]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data_dir, args.subset, args.seed)
    result = measure(data, args)
    print(table(result, args))
    if args.json:
        out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine(), "args": vars(args), **result}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=float)
    if args.edits:
        edit_latency.main(["--threads", str(args.threads)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
