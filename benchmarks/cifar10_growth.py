"""Growing a small CNN with DNM on CIFAR-10 against fixed small and large CNNs, a uniform
Net2Net schedule and GroMo (issues 6 and 10).

Goals (issue 10): the grown model ends at least 2.5 test-accuracy points above the fixed
small CNN, at most 0.5 point below the fixed large CNN, with at most 70% of the large CNN's
training MACs and at most 75% of its wall time, and above the uniform schedule and GroMo.

The arms train under one budget (epochs, optimizer, learning-rate schedule, batch size,
augmentation, data order) for each seed:

* **small**: a fixed CNN of width ``--width`` (conv w, w, pool, 2w, 2w, pool, 4w, 4w, pool,
  global average pool, linear; 3x3 convs with BatchNorm and ReLU);
* **large**: the same CNN at width ``--large-width`` (2x by default), fixed;
* **dnm**: a copy of the small arm's initial weights that ``neuroexapt.core.DNMFramework``
  grows while it trains, built as the design document's loop does it,
  ``DNMFramework(model, DNM_CONFIG)`` with nothing else: the framework records its
  statistics from the training batches and finds the optimizer by itself. ``DNM_CONFIG`` is
  the document's advanced configuration plus a growth budget (overridable with
  ``--dnm-config``);
* **uniform**: the ablation of the policy: a copy of the small arm in which every conv layer
  is doubled by Net2Net splits (``neuroexapt.widen``, noise 0.1, optimizer migrated) after
  epoch ``--uniform-epoch``, so it is the large architecture from then on;
* **gromo**: the peer library GroMo's growing VGG (``benchmarks/gromo_arm.py``), grown by
  TINY at the dnm arm's scheduled epochs within the large CNN's parameter count; it runs
  after the other arms of a seed (not interleaved), so its wall time is less comparable.

Per seed the three arms run **interleaved epoch by epoch** (the order rotates every epoch),
so a slow-down of the machine hits all arms alike. Each arm has its own generator seeded by
the seed, so all three see the same sample order and the same augmentation (common random
numbers); the small and dnm arms start from identical weights. Training: SGD with Nesterov
momentum 0.9, weight decay 5e-4, batch 128 (or Adam with ``--optimizer adam``), a cosine
learning rate updated every batch (``LambdaLR``; edits keep the optimizer's param groups, so
the schedule keeps working after a change), random 32x32 crops of the 4-pixel zero-padded
images and horizontal flips, done on tensors. The training images are a seeded subset of the
50,000 (``--subset``), of which the last ``--val`` are held out: every arm is validated on
them after each epoch, and the dnm arm uses them as its probe (analysis) and for
``record_performance`` (rollback). Test accuracy is on the full 10,000-image test split, once
at the end.

The dnm arm follows the loop of the design document verbatim (``update_caches()``,
``record_performance``, ``should_trigger_morphogenesis``, ``execute_morphogenesis`` after each
epoch).

Measured and reported per arm: test accuracy (mean, sample std, min, max over seeds), final
parameters, **training MACs** and wall time. Training MACs = sum over epochs of (forward
multiply-accumulates of one 3x32x32 image through the model as it is during that epoch) x
(training images of the epoch); forward MACs are counted by
``neuroexapt.metrics.count_macs`` (``torch.utils.flop_counter.FlopCounterMode``: convolutions
and matrix products, FLOPs / 2); backward passes, BatchNorm, pooling, validation and DNM's
analysis are not counted. Wall time of an arm = the sum of its epochs' training, validation
and (dnm) analysis and edit seconds (``time.perf_counter``); the MAC counting and the final
test evaluation are outside it. The cores used by other processes during each arm-epoch are
measured (``/proc/stat``) and kept.

``--profile`` chooses the budget; explicit options override it:

* ``smoke``: 256 images, 2 epochs, 1 seed (for tests; numbers meaningless);
* ``quick``: 10,000 images (9,000 train / 1,000 val), 15 epochs, 3 seeds (``--jobs 2`` runs
  two seeds at a time, one thread each);
* ``full``: all 50,000 images (45,000 / 5,000), 30 epochs, 3 seeds. At the end of every run
  the script estimates the full profile's runtime on this machine from the per-image times it
  measured (see :func:`estimate_seconds`).

Usage::

    .venv/bin/python benchmarks/cifar10_growth.py --data-dir ../shared/data --profile quick \\
        --threads 1 --json runs/growth_quick.json --plot runs/growth_quick.png

``--threads 1`` (the default) runs every arm on one intra-op thread: the figures were taken
on a 2-core machine that other jobs may share, and the cores those jobs used are reported.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt import widen
from neuroexapt.core import DNMFramework
from neuroexapt.metrics import count_macs
from neuroexapt.policy.growth import GrowthSchedule

try:
    from benchmarks.analysis_overhead import LoadMeter, save_json
    from benchmarks.common import (
        augment,
        conv_widths,
        cosine_schedule,
        evaluate,
        params,
        vgg_cnn,
    )
    from benchmarks.data import load_cifar10
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from analysis_overhead import LoadMeter, save_json  # type: ignore[no-redef]
    from common import (  # type: ignore[no-redef]
        augment,
        conv_widths,
        cosine_schedule,
        evaluate,
        params,
        vgg_cnn,
    )
    from data import load_cifar10  # type: ignore[no-redef]
    from machine import machine  # type: ignore[no-redef]

ARMS = ("small", "large", "dnm", "uniform", "gromo")
ACC_GAIN_GOAL = 2.5  # points above the fixed small CNN
ACC_GAP_GOAL = 0.5  # at most this many points below the fixed large CNN
MACS_GOAL = 0.70  # at most this fraction of the large CNN's training MACs
TIME_GOAL = 0.75  # at most this fraction of the large CNN's wall time

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"subset": 256, "val": 64, "epochs": 2, "seeds": 1},
    "quick": {"subset": 10_000, "val": 1_000, "epochs": 15, "seeds": 3},
    "full": {"subset": None, "val": 5_000, "epochs": 30, "seeds": 3},
}

# The design document's advanced configuration, as written, plus a growth budget: the grown
# model may reach 3x the small CNN's MACs per image (0.75x the large CNN's), spent in four
# steps by 30% of training; "total_epochs" is set from --epochs.
DNM_CONFIG: dict[str, Any] = {
    "morphogenesis_interval": 3,
    "max_morphogenesis_per_epoch": 1,
    "performance_improvement_threshold": 0.01,
    "neuron_division_strategy": "hybrid",
    "division_noise_scale": 0.1,
    "progressive_activation_epochs": 5,
    "bottleneck_detection_metrics": ["gradient_variance", "activation_diversity",
                                     "information_flow", "performance_sensitivity"],
    "rollback_enabled": True,
    "performance_drop_threshold": 0.05,
    "max_architecture_changes": 10,
    "growth_budget": "3x",
    "growth_cost": "macs",
    "growth_by": 0.3,
    "growth_steps": 4,
}


# --------------------------------------------------------------------------- model and data


def cnn(width: int, classes: int = 10) -> nn.Sequential:
    """conv w-w-pool-2w-2w-pool-4w-4w-pool, global average pool, linear (3x32x32 inputs)."""
    return vgg_cnn(width, classes, pool_last=True)


# --------------------------------------------------------------------------- one arm


@dataclass
class Arm:
    """One model in training: its optimizer, schedule, data generator and measurements."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    dnm: DNMFramework | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_macs: int = 0


def make_optimizer(model: nn.Module, args: argparse.Namespace, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer of every arm and its per-batch cosine schedule over ``steps`` batches."""
    opt: torch.optim.Optimizer
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                              weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    return opt, cosine_schedule(opt, steps)


def train_epoch(arm: Arm, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """One augmented pass over ``(x, y)``; (mean loss, accuracy in %) on the fly."""
    arm.model.train()
    loss_sum, hits = 0.0, 0
    for idx in torch.randperm(len(y), generator=arm.gen).split(batch):
        inputs, targets = augment(x[idx], arm.gen), y[idx]
        out = arm.model(inputs)
        loss = F.cross_entropy(out, targets)
        arm.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        arm.optimizer.step()
        arm.scheduler.step()
        loss_sum += loss.item() * len(idx)
        hits += int((out.argmax(1) == targets).sum())
    return loss_sum / len(y), 100.0 * hits / len(y)


def double_every_conv(model: nn.Module, optimizer: torch.optim.Optimizer,
                      example: torch.Tensor) -> list[str]:
    """The uniform arm's change: every inner conv doubled by Net2Net splits (noise 0.1)."""
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d):
            widen(model, name, module.out_channels, example_inputs=example, noise=0.1,
                  optimizer=optimizer)
            done.append(f"doubled {name}")
    return done


def run_epoch(arm: Arm, epoch: int, data: dict[str, torch.Tensor], batch: int,
              uniform_epoch: int) -> None:
    """Train, validate and (dnm, uniform) grow ``arm`` for one epoch; append its record."""
    macs = count_macs(arm.model, data["x_val"][:1])
    n_params = params(arm.model)
    lr = arm.optimizer.param_groups[0]["lr"]
    meter = LoadMeter()
    t0 = time.perf_counter()
    train_loss, train_acc = train_epoch(arm, data["x_train"], data["y_train"], batch)
    t1 = time.perf_counter()
    val_loss, val_acc = evaluate(arm.model, data["x_val"], data["y_val"])
    t2 = time.perf_counter()
    events: list[str] = []
    trigger_reason = None
    if arm.dnm is not None:  # the design document's loop
        dnm = arm.dnm
        before = len(dnm.events.events)
        dnm.update_caches()
        dnm.record_performance(val_acc / 100.0)  # may roll the last change back
        go, reasons = dnm.should_trigger_morphogenesis(
            epoch, {"loss": train_loss, "accuracy": train_acc / 100.0},
            {"loss": val_loss, "accuracy": val_acc / 100.0})
        trigger_reason = reasons[0]
        if go:
            dnm.execute_morphogenesis(epoch)
            arm.model = dnm.model  # the same object, edited in place
        events = [f"{e.kind} at {e.layer} ({e.params_before:,} -> {e.params_after:,})"
                  for e in dnm.events.events[before:]]
    elif arm.name == "uniform" and epoch == uniform_epoch:
        events = double_every_conv(arm.model, arm.optimizer, data["x_val"][:8])
    t3 = time.perf_counter()
    in_optimizer = {id(p) for group in arm.optimizer.param_groups for p in group["params"]}
    arm.train_macs += macs * len(data["y_train"])
    arm.history.append({
        "epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
        "val_loss": val_loss, "val_acc": val_acc, "params": n_params,
        "params_after": params(arm.model), "forward_macs": macs,
        "train_s": t1 - t0, "val_s": t2 - t1, "dnm_s": t3 - t2, "wall_s": t3 - t0,
        "other_cores": meter.stop(), "trigger": trigger_reason, "events": events,
        # every parameter of the (possibly edited) model is trained by the optimizer
        "all_params_in_optimizer": all(id(p) in in_optimizer for p in arm.model.parameters()),
    })


def _result(arm: Arm, seed: int, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    t0 = time.perf_counter()
    test_loss, test_acc = evaluate(arm.model, data["x_test"], data["y_test"])
    events = [e.to_dict() for e in arm.dnm.events.events] if arm.dnm is not None else [
        {"epoch": h["epoch"], "kind": "uniform", "layer": e} for h in arm.history
        for e in h["events"]]
    return {
        "seed": seed, "test_acc": test_acc, "test_loss": test_loss,
        "test_s": time.perf_counter() - t0, "params": params(arm.model),
        "widths": conv_widths(arm.model), "train_macs": arm.train_macs,
        "final_forward_macs": count_macs(arm.model, data["x_val"][:1]),
        "wall_s": sum(h["wall_s"] for h in arm.history),
        "train_s": sum(h["train_s"] for h in arm.history),
        "val_s": sum(h["val_s"] for h in arm.history),
        "dnm_s": sum(h["dnm_s"] for h in arm.history),
        "history": arm.history, "events": events,
    }


def run_seed(seed: int, index: int, data: dict[str, torch.Tensor], args: argparse.Namespace,
             dnm_config: dict[str, Any], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The arms of one seed, interleaved epoch by epoch (GroMo after them); their results."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    small = cnn(args.width)
    models = {"small": small, "large": cnn(args.large_width)}
    for name in ("dnm", "uniform"):
        models[name] = copy.deepcopy(small)
    names = [n for n in ARMS if n in args.arms and n in models]
    steps = args.epochs * math.ceil(len(data["y_train"]) / args.batch_size)
    arms: dict[str, Arm] = {}
    for name in names:
        opt, sched = make_optimizer(models[name], args, steps)
        arms[name] = Arm(name, models[name], opt, sched, torch.Generator().manual_seed(seed))
    if "dnm" in arms:  # as the design document writes it: nothing but the model and config
        arms["dnm"].dnm = DNMFramework(arms["dnm"].model, dnm_config, seed=seed)
    for epoch in range(1, args.epochs + 1 if names else 1):
        shift = (index + epoch - 1) % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order every epoch
            arm = arms[name]
            run_epoch(arm, epoch, data, args.batch_size, args.uniform_epoch)
            h = arm.history[-1]
            log(f"seed {seed} epoch {epoch:>2}/{args.epochs} {name:<7} "
                f"train {h['train_acc']:5.1f}% val {h['val_acc']:5.1f}% "
                f"params {h['params_after']:>9,} {h['wall_s']:6.1f} s "
                f"other cores {h['other_cores']:.2f}"
                + (f"  {'; '.join(h['events'])}" if h["events"] else ""))
    results = {name: _result(arm, seed, data) for name, arm in arms.items()}
    if "dnm" in arms:
        arms["dnm"].dnm.close()
    if "gromo" in args.arms:
        try:  # the optional peer (bench extra)
            from benchmarks.gromo_arm import run_gromo_arm
        except ImportError:
            from gromo_arm import run_gromo_arm  # type: ignore[no-redef]

        schedule = arms["dnm"].dnm.schedule if "dnm" in arms else GrowthSchedule(
            0.0, 0.0, dnm_config.get("total_epochs", args.epochs), dnm_config.get("growth_by", 0.5),
            dnm_config.get("growth_steps", 4))  # the epochs the dnm arm grows at
        epochs = list(schedule.epochs) if schedule is not None else [1, 2, 3, 4]
        try:  # a failure of the peer's code must not lose the other arms' measurements
            results["gromo"] = run_gromo_arm(
                data, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, weight_decay=args.weight_decay, seed=seed, growth_epochs=epochs,
                neurons_per_growth=args.width * 2, param_budget=params(cnn(args.large_width)),
                log=lambda text: log(f"seed {seed} gromo   {text}"))
        except Exception as e:  # reported in the JSON and the output, not raised
            log(f"seed {seed} gromo   failed: {type(e).__name__}: {e}")
            results["gromo"] = {"seed": seed, "error": f"{type(e).__name__}: {e}"}
            return results
        g = results["gromo"]
        g["seed"] = seed
        for key in ("test_s", "dnm_s", "val_s"):
            g.setdefault(key, 0.0)
        g.setdefault("widths", [])
    return results


# --------------------------------------------------------------------------- summaries


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for one value), min and max."""
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per arm: spreads of test accuracy, parameters, training MACs and wall time."""
    return {name: {key: spread([float(r.get(key, 0.0)) for r in rs])
                   for key in ("test_acc", "params", "train_macs", "wall_s", "train_s",
                               "dnm_s")}
            for name, rs in runs.items() if rs}


def goals(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, measured on the means over seeds (those whose arms ran)."""
    if not all(n in summary for n in ("small", "large", "dnm")):
        return []
    acc = {n: s["test_acc"]["mean"] for n, s in summary.items()}
    wall = summary["dnm"]["wall_s"]["mean"] / summary["large"]["wall_s"]["mean"]
    macs = summary["dnm"]["train_macs"]["mean"] / summary["large"]["train_macs"]["mean"]
    out = [
        {"goal": f"dnm >= small + {ACC_GAIN_GOAL:g} points", "measured": acc["dnm"] - acc["small"],
         "text": f"{acc['dnm'] - acc['small']:+.2f} points",
         "met": acc["dnm"] - acc["small"] >= ACC_GAIN_GOAL},
        {"goal": f"dnm >= large - {ACC_GAP_GOAL:g} points", "measured": acc["dnm"] - acc["large"],
         "text": f"{acc['dnm'] - acc['large']:+.2f} points",
         "met": acc["dnm"] - acc["large"] >= -ACC_GAP_GOAL},
        {"goal": f"dnm training MACs <= {MACS_GOAL:.0%} of large", "measured": macs,
         "text": f"{macs:.0%}", "met": macs <= MACS_GOAL},
        {"goal": f"dnm wall time <= {TIME_GOAL:.0%} of large", "measured": wall,
         "text": f"{wall:.0%}", "met": wall <= TIME_GOAL},
    ]
    for peer in ("uniform", "gromo"):
        if peer in acc:
            out.append({"goal": f"dnm > {peer}", "measured": acc["dnm"] - acc[peer],
                        "text": f"{acc['dnm'] - acc[peer]:+.2f} points",
                        "met": acc["dnm"] > acc[peer]})
    return out


def estimate_seconds(runs: dict[str, list[dict[str, Any]]], measured: tuple[int, int, int],
                     n_train: int, n_val: int, n_test: int, epochs: int, seeds: int
                     ) -> dict[str, float]:
    """Runtime of a run of this budget on this machine, from the per-image times measured.

    Per arm, seconds per training image = sum of training seconds / images trained, over all
    epochs and seeds (for dnm this averages its sizes along the measured growth); validation,
    test and dnm analysis seconds per image likewise. The estimate sums, over the arms,
    ``seeds * (epochs * (n_train * train + n_val * (val + dnm)) + n_test * test)``.
    ``measured`` is the (train, val, test) image counts of the measured run.
    """
    m_train, m_val, m_test = measured
    total = {}
    for name, rs in runs.items():
        passes = sum(len(r["history"]) for r in rs)  # epochs run, over seeds
        per_train = sum(r["train_s"] for r in rs) / (passes * m_train)
        per_val = sum(r["val_s"] + r["dnm_s"] for r in rs) / (passes * m_val)
        per_test = sum(r["test_s"] for r in rs) / (len(rs) * m_test)
        total[name] = seeds * (epochs * (n_train * per_train + n_val * per_val)
                               + n_test * per_test)
    total["all"] = sum(total.values())
    return total


def _pm(s: dict[str, float | None], fmt: str) -> str:
    std = "n/a" if s["std"] is None else format(s["std"], fmt)
    return (f"{format(s['mean'], fmt)} | {std} | {format(s['min'], fmt)} | "
            f"{format(s['max'], fmt)}")


def tables(summary: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]],
           verdict: list[dict[str, Any]]) -> str:
    """The Markdown tables: per arm, per seed, DNM events, goals."""
    names = [n for n in ARMS if n in summary]
    ref = summary.get("large", summary[names[0]])
    large_wall, large_macs = ref["wall_s"]["mean"], ref["train_macs"]["mean"]
    lines = ["| arm | test acc % mean | std | min | max | parameters (mean) | training MACs (G) "
             "| MACs / large | wall s (mean) | wall / large |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        s = summary[name]
        lines.append(f"| {name} | {_pm(s['test_acc'], '.2f')} | {s['params']['mean']:,.0f} | "
                     f"{s['train_macs']['mean'] / 1e9:,.0f} | "
                     f"{s['train_macs']['mean'] / large_macs:.2f} | {s['wall_s']['mean']:.0f} | "
                     f"{s['wall_s']['mean'] / large_wall:.2f} |")
    lines += ["", "| seed | arm | test acc % | parameters | conv widths | training MACs (G) | "
              "train s | val s | dnm s | wall s |", "|---:|---|---:|---:|---|---:|---:|---:|"
              "---:|---:|"]
    for i in range(len(runs[names[0]])):
        for name in names:
            r = runs[name][i]
            lines.append(f"| {r['seed']} | {name} | {r['test_acc']:.2f} | {r['params']:,} | "
                         f"{r['widths']} | {r['train_macs'] / 1e9:,.0f} | {r['train_s']:.0f} | "
                         f"{r['val_s']:.0f} | {r['dnm_s']:.0f} | {r['wall_s']:.0f} |")
    lines += ["", "| seed | epoch | layer | kind | parameters | val acc before -> after |",
              "|---:|---:|---|---|---:|---|"]
    for r in runs.get("dnm", []):
        for e in r["events"]:
            after = "n/a" if e["metric_after"] is None else f"{100 * e['metric_after']:.1f}"
            before = "n/a" if e["metric_before"] is None else f"{100 * e['metric_before']:.1f}"
            lines.append(f"| {r['seed']} | {e['epoch']} | {e['layer']} | {e['kind']} | "
                         f"{e['params_before']:,} -> {e['params_after']:,} | "
                         f"{before} -> {after} |")
    lines += ["", "| goal | measured (means over seeds) | verdict |", "|---|---:|---|"]
    for g in verdict:
        lines.append(f"| {g['goal']} | {g['text']} | {'met' if g['met'] else 'missed'} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], path: str) -> None:
    """Test accuracy against training MACs, and validation accuracy over epochs with events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"small": "tab:blue", "large": "tab:orange", "dnm": "tab:green",
              "uniform": "tab:purple", "gromo": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in [n for n in ARMS if runs.get(n)]:
        rs = runs[name]
        ax1.scatter([r["train_macs"] / 1e12 for r in rs], [r["test_acc"] for r in rs],
                    color=colors[name], alpha=0.5, label=f"{name} (each seed)")
        ax1.scatter([statistics.fmean(r["train_macs"] / 1e12 for r in rs)],
                    [statistics.fmean(r["test_acc"] for r in rs)], color=colors[name],
                    marker="*", s=200, edgecolors="black")
        for i, r in enumerate(rs):
            ep = [h["epoch"] for h in r["history"]]
            ax2.plot(ep, [h["val_acc"] for h in r["history"]], color=colors[name], alpha=0.7,
                     label=f"{name} val" if i == 0 else None)
    marked = False
    for r in runs.get("dnm", []):
        val = {h["epoch"]: h["val_acc"] for h in r["history"]}
        for e in r["events"]:
            ax2.scatter([e["epoch"]], [val.get(e["epoch"], float("nan"))], color="black",
                        marker="x" if e["kind"] == "rollback" else "^", zorder=3,
                        label=None if marked else "DNM change (x: rollback)")
            marked = True
    ax1.set_xlabel("training MACs (T, forward, whole run)")
    ax1.set_ylabel("test accuracy %")
    ax1.set_title("accuracy vs training compute (star: mean over seeds)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation accuracy %")
    ax2.set_title("validation accuracy per epoch; DNM changes marked")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; profile values fill the options left unset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True,
                   help="folder with cifar10_train_part1.npz, cifar10_train_part2.npz, "
                        "cifar10_test.npz")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--subset", type=int, default=None,
                   help="training images drawn (seeded, fixed over seeds), val included")
    p.add_argument("--full-data", action="store_true", help="use all 50,000 training images")
    p.add_argument("--val", type=int, default=None, help="held-out images of the subset")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...)")
    p.add_argument("--width", type=int, default=16, help="width of the small CNN (and dnm)")
    p.add_argument("--large-width", type=int, default=32)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default 0.05 (sgd), 2e-3 (adam)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dnm-config", default="{}",
                   help="JSON dict of DNM config keys overriding DNM_CONFIG")
    p.add_argument("--uniform-epoch", type=int, default=2,
                   help="epoch after which the uniform arm doubles every conv")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated arms to run, from {','.join(ARMS)}")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run at a time, in separate processes (each --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the results to this path")
    p.add_argument("--plot", default=None, help="write the figure (PNG) to this path")
    args = p.parse_args(argv)
    profile = PROFILES[args.profile]
    for key in ("val", "epochs", "seeds"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    if args.full_data:
        args.subset = None
    elif args.subset is None:
        args.subset = profile["subset"]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm {unknown[0]!r}; valid: {', '.join(ARMS)}")
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 2e-3
    if args.epochs < 1 or args.seeds < 1 or args.batch_size < 1:
        p.error("--epochs, --seeds and --batch-size must be at least 1")
    if args.subset is not None and not 0 < args.val < args.subset:
        p.error(f"--val must be in 1..{args.subset - 1}")
    try:
        overrides = json.loads(args.dnm_config)
    except json.JSONDecodeError as e:
        p.error(f"--dnm-config is not JSON: {e}")
    if not isinstance(overrides, dict):
        p.error("--dnm-config must be a JSON object")
    args.dnm_overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every seed, print the Markdown tables, optionally write JSON and a figure."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("neuroexapt").setLevel(logging.WARNING)
    started = time.perf_counter()
    info = machine()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    x_tr, y_tr, x_te, y_te = load_cifar10(args.data_dir, subset=args.subset, seed=0)
    n = len(y_tr) - args.val
    if n < 1:
        raise SystemExit(f"--val {args.val} leaves no training images of {len(y_tr)}")
    data = {"x_train": x_tr[:n], "y_train": y_tr[:n], "x_val": x_tr[n:], "y_val": y_tr[n:],
            "x_test": x_te, "y_test": y_te}
    dnm_config = {**DNM_CONFIG, "total_epochs": args.epochs, **args.dnm_overrides}
    print(f"{date}; {info['cpu']}, nproc {info['nproc']}, torch {info['torch']}, "
          f"{args.threads} threads x {args.jobs} jobs; profile {args.profile}: {n} train / "
          f"{args.val} val / {len(y_te)} test images, {args.epochs} epochs, {args.seeds} seeds, "
          f"{args.optimizer} lr {args.lr:g}, widths {args.width} / {args.large_width}; arms "
          f"{', '.join(args.arms)}", flush=True)
    print(f"DNM config: {json.dumps(dnm_config)}", flush=True)

    out: dict[str, Any] = {"date": date, "machine": info, "args": vars(args),
                           "dnm_config": dnm_config, "goals_definition": {
                               "acc_gain_points": ACC_GAIN_GOAL, "acc_gap_points": ACC_GAP_GOAL,
                               "macs_fraction": MACS_GOAL, "time_fraction": TIME_GOAL}}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS if name in args.arms}
    seeds = list(range(args.seeds))
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_seed, seed, i, data, args, dnm_config,
                                   _Log(started)) for i, seed in enumerate(seeds)]
            results = [f.result() for f in futures]
    else:
        results = []
        for index, seed in enumerate(seeds):
            results.append(run_seed(seed, index, data, args, dnm_config, _Log(started)))
            if args.json:  # progress survives an interrupted run
                partial = {name: [r[name] for r in results] for name in runs}
                save_json(args.json, {**out, "runs": partial, "partial": True})
    failed = []
    for result in results:
        for name, value in result.items():
            if "error" in value:
                failed.append({"arm": name, **value})
                print(f"seed {value['seed']} {name}: left out, it failed: {value['error']}")
            else:
                runs[name].append(value)
    runs = {name: r for name, r in runs.items() if r}
    out["failed"] = failed
    summary = summarise(runs)
    verdict = goals(summary)
    runtime = time.perf_counter() - started
    full = PROFILES["full"]
    measured = (n, args.val, len(y_te))
    estimate = estimate_seconds({k: v for k, v in runs.items() if k != "gromo"}, measured,
                                50_000 - full["val"], full["val"], 10_000, full["epochs"],
                                full["seeds"])
    print()
    print(tables(summary, runs, verdict))
    print()
    other = [h.get("other_cores", 0.0) for k, rs in runs.items() if k != "gromo" for r in rs
             for h in r["history"]]
    interleaved = [k for k in runs if k != "gromo"]
    same_lr = all(len({tuple(h["lr"] for h in runs[name][i]["history"]) for name in interleaved})
                  == 1 for i in range(args.seeds))
    if interleaved:
        print(f"learning rate at the start of every epoch identical in the interleaved arms "
              f"(the schedule kept working through the edits): {same_lr}")
    load = (f"; other processes used {statistics.fmean(other):.2f} cores on average (max "
            f"{max(other):.2f}) per arm-epoch" if other else "")
    print(f"runtime {runtime:.0f} s ({runtime / 60:.1f} min){load}")
    print(f"estimated runtime of --profile full ({50_000 - full['val']} train / {full['val']} val "
          f"images, {full['epochs']} epochs, {full['seeds']} seeds, {args.threads} threads) from "
          f"the per-image times measured here, without gromo: {estimate['all'] / 3600:.1f} h")
    out.update(runs=runs, summary=summary, goals=verdict, runtime_s=runtime, same_lr=same_lr,
               full_profile_estimate_s=estimate, partial=False)
    if args.json:
        save_json(args.json, out)
        print(f"wrote {args.json}")
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


class _Log:
    """Timestamped progress lines (a picklable callable, for --jobs)."""

    def __init__(self, started: float) -> None:
        self.wall = time.time() - (time.perf_counter() - started)

    def __call__(self, text: str) -> None:
        print(f"[{time.time() - self.wall:7.0f} s] {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
