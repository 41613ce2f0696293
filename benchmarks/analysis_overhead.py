"""Wall-time overhead of per-layer analysis during training, and the estimators' cost vs N.

Target from the issue: on a VGG-style CNN training on CIFAR-10, analysis every 10 batches
adds at most 5% to an epoch's wall time compared with the same loop without it, measured side
by side in one run; the estimators' cost as the batch size grows is reported.

Two arms train fresh ``copy.deepcopy`` copies of one seeded model (identical initial weights)
for one epoch over the same ``--train-subset`` CIFAR-10 images in the same order:

* ``plain``: SGD(momentum) training loop, batch 128;
* ``analysed``: the same loop inside ``ActivationCollector(model, every=10)`` (default layers:
  every Conv2d and the Linear head; gradients and a 512-sample reservoir on), with
  ``collector.set_targets(y)`` before every forward pass, and at the end of the epoch the
  per-layer metrics from the collected statistics: ``gradient_variance``,
  ``activation_diversity``, ``information_retained`` (Renyi mutual information, median
  bandwidth) and ``unit_scores`` (hybrid). The epoch time includes building the collector and
  that end-of-epoch computation.

The arms alternate, AB then BA, for ``--repeats`` pairs (the order flips so that a slow drift
of the machine's speed does not favour one arm), after an untimed warm-up of each. With
``--schedule lockstep`` the two arms of a pair instead alternate batch by batch, each
arm's epoch time being the sum of its own batch times (plus, for the analysed arm, the
collector's set-up and the end-of-epoch metrics), so that drifts over seconds to minutes
cancel within the pair. Reported:
each arm's median epoch time, the overhead ``median(analysed) / median(plain) - 1``, each
pair's ratio, and a breakdown of the extra time from per-batch timers (hooks on the batches
that are not recorded, the recorded batches, the end-of-epoch metrics). With ``--profile``
(by default only when the target is missed) one more analysed epoch runs under ``cProfile``
and the library functions' times are listed. Both arms compute the same thing, so their
per-batch losses must agree exactly: the script checks it (the hooks change nothing).

Second part: the median time of each estimator in ``neuroexapt.metrics`` on N samples of
D = 128 units (class-dependent Gaussian features, 10 labels), N in ``--sizes``.

Usage::

    .venv/bin/python benchmarks/analysis_overhead.py --data-dir DIR
    .venv/bin/python benchmarks/analysis_overhead.py --data-dir DIR --repeats 5 --json out.json
    .venv/bin/python benchmarks/analysis_overhead.py --data-dir DIR --schedule lockstep

Wall times on a shared machine are only meaningful when other processes leave the cores
idle; the script measures how many cores other processes kept busy during each epoch
(``/proc/stat`` minus its own CPU time) and warns when that is above ``OTHER_CORES_WARNING``.
With ``--wait-idle SECONDS`` it waits for the machine to go idle before each pair (and each
estimator block), and discards and reruns a pair that other processes disturbed, until that
many seconds have passed; the discarded pairs are kept in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import gc
import inspect
import json
import math
import os
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.metrics import (
    ActivationCollector,
    activation_diversity,
    effective_rank,
    gradient_variance,
    hsic,
    information_retained,
    mutual_information,
    renyi_entropy,
    unit_entropy,
    unit_scores,
)
from neuroexapt.metrics import collector as collector_mod
from neuroexapt.metrics import estimators as estimators_mod
from neuroexapt.metrics import layer_metrics as layer_metrics_mod
from neuroexapt.metrics import stats as stats_mod

try:
    from benchmarks.data import load_cifar10
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from data import load_cifar10  # type: ignore[no-redef]

try:
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from machine import machine  # type: ignore[no-redef]


OVERHEAD_TARGET = 0.05  # the issue: analysis adds at most 5% to an epoch's wall time
EVERY = 10  # record every 10th forward pass
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # 0.05 diverges in the first epoch
OTHER_CORES_WARNING = 0.2  # warn when other processes used more cores than this on average
ESTIMATOR_DIM = 128  # D of the estimator timings
ESTIMATOR_CLASSES = 10
PROFILE_ROWS = 20  # library functions listed from the profile


# --------------------------------------------------------------------------- the model


class VGGSmall(nn.Module):
    """VGG-style CNN for 32x32 RGB: conv 32-32-pool-64-64-pool-128-pool, BN, ReLU, linear head.

    Every conv is 3x3, padding 1, no bias, followed by BatchNorm2d and ReLU; pools are 2x2 max.
    The head is one Linear layer on the flattened 128 x 4 x 4 map (160,234 parameters with 10
    classes).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (32, 32, "pool", 64, 64, "pool", 128, "pool"):
            if isinstance(width, str):
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, num_classes]`` of images ``[batch, 3, 32, 32]``."""
        return self.classifier(torch.flatten(self.features(x), 1))


# --------------------------------------------------------------------------- machine load


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime


class LoadMeter:
    """Average number of cores that other processes kept busy between start and stop."""

    def __init__(self) -> None:
        self._start = (*_cpu_seconds(), time.perf_counter())

    def stop(self) -> float:
        """Cores used by other processes since construction."""
        busy0, own0, t0 = self._start
        busy1, own1 = _cpu_seconds()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(time.perf_counter() - t0, 1e-9)


def wait_idle(deadline: float) -> float:
    """Sleep in 1 s probes until other processes use at most ``OTHER_CORES_WARNING`` cores or
    ``deadline`` (``time.monotonic``) passes; returns the last probe's load."""
    load = 0.0
    while time.monotonic() < deadline:
        meter = LoadMeter()
        time.sleep(1.0)
        load = meter.stop()
        if load <= OTHER_CORES_WARNING:
            break
    return load


# --------------------------------------------------------------------------- training arms

Data = tuple[torch.Tensor, torch.Tensor]


def epoch_order(n: int, seed: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation seeded by ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data,
               idx: torch.Tensor, collector: ActivationCollector | None) -> tuple[float, float]:
    """One SGD step on the samples ``idx`` of ``data``: wall seconds and loss."""
    t0 = time.perf_counter()
    xb, yb = data[0][idx], data[1][idx]
    if collector is not None:
        collector.set_targets(yb)
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    optimizer.step()
    value = loss.item()
    return time.perf_counter() - t0, value


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data,
               order: torch.Tensor, batch_size: int,
               collector: ActivationCollector | None) -> tuple[list[float], list[float]]:
    """One pass over ``data`` in ``order``: per-batch wall seconds and losses."""
    times, losses = [], []
    model.train()
    for start in range(0, len(order), batch_size):
        dt, loss = train_step(model, optimizer, data, order[start:start + batch_size], collector)
        times.append(dt)
        losses.append(loss)
    return times, losses


def fresh(base: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A deep copy of ``base`` and its SGD(momentum) optimizer."""
    model = copy.deepcopy(base)
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                  weight_decay=WEIGHT_DECAY)


def end_of_epoch(collector: ActivationCollector) -> tuple[dict[str, dict[str, float]],
                                                          dict[str, float]]:
    """Every layer's metrics from the collected statistics, and seconds spent per metric."""
    seconds = dict.fromkeys(
        ("gradient_variance", "activation_diversity", "information_retained", "unit_scores"), 0.0)
    results: dict[str, dict[str, float]] = {}
    for name in collector.layers:
        stats = collector[name]
        t0 = time.perf_counter()
        row = {"gradient_variance": gradient_variance(stats)}
        t1 = time.perf_counter()
        row.update(activation_diversity(stats))
        t2 = time.perf_counter()
        row["information_retained"] = information_retained(stats)
        t3 = time.perf_counter()
        scores = unit_scores(stats)
        t4 = time.perf_counter()
        row["unit_score_max"] = float(scores.max())
        results[name] = row
        for key, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            seconds[key] += dt
    return results, seconds


def _arm_result(arm: str, epoch_s: float, times: list[float], losses: list[float],
                analysis_s: float, metric_s: dict[str, float],
                metrics: dict[str, dict[str, float]], other_cores: float) -> dict[str, Any]:
    return {"arm": arm, "epoch_s": epoch_s, "loop_s": sum(times), "analysis_s": analysis_s,
            "metric_s": metric_s, "batch_s": times, "losses": losses,
            "mean_loss": statistics.fmean(losses), "final_loss": statistics.fmean(losses[-10:]),
            "other_cores": other_cores, "metrics": metrics}


def run_arm(arm: str, base: nn.Module, data: Data, order: torch.Tensor, batch_size: int,
            every: int) -> dict[str, Any]:
    """One epoch of ``arm`` (``"plain"`` or ``"analysed"``) on a fresh copy of ``base``."""
    model, optimizer = fresh(base)
    gc.collect()
    meter = LoadMeter()
    start = time.perf_counter()
    metrics: dict[str, dict[str, float]] = {}
    metric_s: dict[str, float] = {}
    analysis_s = 0.0
    if arm == "plain":
        times, losses = train_loop(model, optimizer, data, order, batch_size, None)
    else:
        collector = ActivationCollector(model, every=every)
        with collector:
            times, losses = train_loop(model, optimizer, data, order, batch_size, collector)
        t_end = time.perf_counter()
        metrics, metric_s = end_of_epoch(collector)
        analysis_s = time.perf_counter() - t_end
    wall = time.perf_counter() - start
    return _arm_result(arm, wall, times, losses, analysis_s, metric_s, metrics, meter.stop())


def run_lockstep(base: nn.Module, data: Data, order: torch.Tensor, batch_size: int,
                 every: int) -> dict[str, dict[str, Any]]:
    """Both arms' epochs in one pass, alternating batch by batch (AB, then BA, ...).

    Each arm's epoch time is the sum of its own batch times; the analysed arm adds the
    collector's set-up and removal and the end-of-epoch metrics. Slow drifts of the machine's
    speed then hit both arms alike.
    """
    (plain, opt_a), (analysed, opt_b) = fresh(base), fresh(base)
    plain.train()
    analysed.train()
    gc.collect()
    meter = LoadMeter()
    times: dict[str, list[float]] = {"plain": [], "analysed": []}
    losses: dict[str, list[float]] = {"plain": [], "analysed": []}
    t0 = time.perf_counter()
    collector = ActivationCollector(analysed, every=every)
    with collector:
        setup_s = time.perf_counter() - t0
        steps = {"plain": (plain, opt_a, None), "analysed": (analysed, opt_b, collector)}
        for i, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            for arm in ("plain", "analysed") if i % 2 == 0 else ("analysed", "plain"):
                model, optimizer, hooks = steps[arm]
                dt, loss = train_step(model, optimizer, data, idx, hooks)
                times[arm].append(dt)
                losses[arm].append(loss)
        t_exit = time.perf_counter()
    t_end = time.perf_counter()
    metrics, metric_s = end_of_epoch(collector)
    analysis_s = time.perf_counter() - t_end
    load = meter.stop()
    outside = setup_s + (t_end - t_exit)
    return {
        "plain": _arm_result("plain", sum(times["plain"]), times["plain"], losses["plain"], 0.0,
                             {}, {}, load),
        "analysed": _arm_result("analysed", outside + sum(times["analysed"]) + analysis_s,
                                times["analysed"], losses["analysed"], analysis_s, metric_s,
                                metrics, load),
    }


def breakdown(plain: dict[str, Any], analysed: dict[str, Any], every: int) -> dict[str, float]:
    """Split one pair's extra seconds: non-recorded batches, recorded batches, end of epoch."""
    recorded = [i % every == 0 for i in range(len(plain["batch_s"]))]
    diff = [b - a for a, b in zip(plain["batch_s"], analysed["batch_s"], strict=True)]
    rec = [d for d, r in zip(diff, recorded, strict=True) if r]
    non = [d for d, r in zip(diff, recorded, strict=True) if not r]
    in_loop = sum(diff)
    total = analysed["epoch_s"] - plain["epoch_s"]
    return {
        "extra_s": total,
        "non_recorded_batches_s": sum(non),
        "recorded_batches_s": sum(rec),
        "end_of_epoch_s": analysed["analysis_s"],
        "rest_s": total - in_loop - analysed["analysis_s"],
        "n_recorded": float(len(rec)),
        "n_non_recorded": float(len(non)),
        "median_extra_per_recorded_batch_ms": 1e3 * statistics.median(rec) if rec else math.nan,
        "median_extra_per_non_recorded_batch_ms":
            1e3 * statistics.median(non) if non else math.nan,
    }


def warm_up(base: nn.Module, data: Data, batch_size: int, batches: int, every: int) -> None:
    """Untimed: a few batches of each arm, so that first-call costs hit neither."""
    if batches < 1:
        return
    order = epoch_order(len(data[1]), 12345)[: batches * batch_size]
    run_arm("plain", base, data, order, batch_size, every)
    run_arm("analysed", base, data, order, batch_size, every)


def _qualnames() -> dict[tuple[str, int], str]:
    """``(file, first line) -> qualified name`` of the functions in ``neuroexapt.metrics``."""
    out: dict[tuple[str, int], str] = {}
    for module in (collector_mod, estimators_mod, layer_metrics_mod, stats_mod):
        for obj in vars(module).values():
            members = vars(obj).values() if isinstance(obj, type) else [obj]
            for fn in members:
                fn = inspect.unwrap(fn.fget) if isinstance(fn, property) else fn
                code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
                if code is not None:
                    out[(code.co_filename, code.co_firstlineno)] = code.co_qualname
    return out


def _label(path: str, line: int, func: str, names: dict[tuple[str, int], str]) -> str:
    """``metrics/stats.py:NonFiniteCount.update`` for a library function."""
    rel = path[path.rindex(f"neuroexapt{os.sep}") + len("neuroexapt") + 1:]
    return f"{rel}:{names.get((path, line), func)}"


def profile_analysed(base: nn.Module, data: Data, order: torch.Tensor, batch_size: int,
                     every: int) -> dict[str, Any]:
    """One analysed epoch under cProfile.

    Returns the library's functions by cumulative time, and the built-in (torch C++) calls
    made directly from library functions, by their time inside those calls (``tottime``).
    """
    profiler = cProfile.Profile()
    profiler.enable()
    result = run_arm("analysed", base, data, order, batch_size, every)
    profiler.disable()
    table = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    names, lib = _qualnames(), f"neuroexapt{os.sep}"
    rows, builtins = [], []
    for (path, line, func), (_, ncalls, tottime, cumtime, callers) in table.items():
        if lib in path:
            rows.append({"function": _label(path, line, func, names), "calls": ncalls,
                         "tottime_s": tottime, "cumtime_s": cumtime})
        elif path == "~":  # a built-in: attribute its time to the library callers
            for (cpath, cline, cfunc), (_, cn, ctt, _) in callers.items():
                if lib in cpath:
                    builtins.append({"call": func, "caller": _label(cpath, cline, cfunc, names),
                                     "calls": cn, "tottime_s": ctt})
    rows.sort(key=lambda r: -r["cumtime_s"])
    builtins.sort(key=lambda r: -r["tottime_s"])
    return {"epoch_s_profiled": result["epoch_s"], "functions": rows[:PROFILE_ROWS],
            "builtin_calls": builtins[:PROFILE_ROWS]}


def run_pair(r: int, base: nn.Module, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    """Pair ``r``: both arms on the epoch order seeded ``seed + r``; with ``--schedule epochs``
    one epoch after the other, AB if r is even, else BA; with ``lockstep`` batch by batch."""
    order = epoch_order(len(data[1]), args.seed + r)
    if args.schedule == "lockstep":
        runs, label = run_lockstep(base, data, order, args.batch_size, args.every), "lockstep"
    else:
        arms = ("plain", "analysed") if r % 2 == 0 else ("analysed", "plain")
        runs = {arm: run_arm(arm, base, data, order, args.batch_size, args.every)
                for arm in arms}
        label = "".join("AB"[arm == "analysed"] for arm in arms)
    a, b = runs["plain"], runs["analysed"]
    return {"repeat": r, "order": label,
            "plain": a, "analysed": b, "ratio": b["epoch_s"] / a["epoch_s"],
            "same_losses": a["losses"] == b["losses"], "breakdown": breakdown(a, b, args.every)}


def overhead(args: argparse.Namespace, data: Data,
             checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The side-by-side training comparison; ``checkpoint`` gets the pairs after each one."""
    torch.manual_seed(args.seed)
    base = VGGSmall()
    warm_up(base, data, args.batch_size, args.warmup_batches, args.every)
    deadline = time.monotonic() + args.wait_idle
    pairs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    while len(pairs) < args.repeats:
        r = len(pairs)
        wait_idle(deadline)
        pair = run_pair(r, base, data, args)
        busy = max(pair["plain"]["other_cores"], pair["analysed"]["other_cores"])
        disturbed = busy > OTHER_CORES_WARNING and time.monotonic() < deadline
        print(f"  pair {r} ({pair['order']}): plain {pair['plain']['epoch_s']:.2f} s, analysed "
              f"{pair['analysed']['epoch_s']:.2f} s (end-of-epoch metrics "
              f"{pair['analysed']['analysis_s']:.3f} s), ratio {pair['ratio']:.4f}; other "
              f"processes up to {busy:.2f} cores; loss {pair['plain']['losses'][0]:.2f} -> "
              f"{pair['plain']['final_loss']:.2f} (last 10 batches); losses equal: "
              f"{pair['same_losses']}"
              + ("; disturbed, discarded and rerun" if disturbed else ""), flush=True)
        (discarded if disturbed else pairs).append(pair)
        if checkpoint is not None:
            checkpoint({"pairs": pairs, "discarded_pairs": discarded})
    med_a = statistics.median(p["plain"]["epoch_s"] for p in pairs)
    med_b = statistics.median(p["analysed"]["epoch_s"] for p in pairs)
    over = med_b / med_a - 1
    summary = {
        "median_plain_s": med_a, "median_analysed_s": med_b, "overhead": over,
        "pair_ratios": [p["ratio"] for p in pairs],
        "median_pair_overhead": statistics.median(p["ratio"] for p in pairs) - 1,
        "meets_target": over <= OVERHEAD_TARGET,
        "all_pairs_meet_target": all(p["ratio"] - 1 <= OVERHEAD_TARGET for p in pairs),
        "all_losses_equal": all(p["same_losses"] for p in pairs),
        "breakdown_median": {k: statistics.median(p["breakdown"][k] for p in pairs)
                             for k in pairs[0]["breakdown"]},
        "metric_s_median": {k: statistics.median(p["analysed"]["metric_s"][k] for p in pairs)
                            for k in pairs[0]["analysed"]["metric_s"]},
        "max_other_cores": max(max(p["plain"]["other_cores"], p["analysed"]["other_cores"])
                               for p in pairs),
    }
    profile = None
    if args.profile == "always" or (args.profile == "auto" and not summary["meets_target"]):
        wait_idle(deadline)
        profile = profile_analysed(base, data, epoch_order(len(data[1]), args.seed),
                                   args.batch_size, args.every)
    for p in discarded:  # keep their timings in the JSON, without the bulky per-batch lists
        for arm in ("plain", "analysed"):
            p[arm] = {k: v for k, v in p[arm].items() if k not in ("batch_s", "losses")}
    return {"pairs": pairs, "discarded_pairs": discarded, "summary": summary, "profile": profile,
            "last_metrics": pairs[-1]["analysed"]["metrics"]}


# --------------------------------------------------------------------------- estimators

Estimator = Callable[[torch.Tensor, torch.Tensor], float | torch.Tensor]

ESTIMATORS: dict[str, Estimator] = {
    "mutual_information renyi (sigma=silverman, default)":
        lambda x, y: mutual_information(x, y, method="renyi"),
    "mutual_information renyi (sigma=median, as information_retained)":
        lambda x, y: mutual_information(x, y, method="renyi", sigma="median"),
    "mutual_information ksg (labels: Ross)": lambda x, y: mutual_information(x, y, method="ksg"),
    "renyi_entropy": lambda x, y: renyi_entropy(x),
    "hsic (normalized)": lambda x, y: hsic(x, y),
    "effective_rank": lambda x, y: effective_rank(x),
    "unit_entropy (binned)": lambda x, y: unit_entropy(x),
}


def estimator_data(n: int, d: int, seed: int) -> Data:
    """``[n, d]`` float32 features, class means plus unit noise, and ``[n]`` labels."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, ESTIMATOR_CLASSES, (n,), generator=gen)
    means = torch.randn(ESTIMATOR_CLASSES, d, generator=gen)
    return means[y] + torch.randn(n, d, generator=gen), y


def time_once(fn: Estimator, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn(x, y)`` after one untimed call."""
    fn(x, y)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_estimators(sizes: list[int], dim: int, repeats: int, seed: int, wait: float
                    ) -> dict[str, Any]:
    """Median seconds of each estimator at each N; with ``wait`` > 0, each N's block is
    rerun while other processes disturb it, until ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    table: dict[str, dict[int, float]] = {name: {} for name in ESTIMATORS}
    load: dict[int, float] = {}
    for n in sizes:
        x, y = estimator_data(n, dim, seed)
        while True:
            wait_idle(deadline)
            meter = LoadMeter()
            row = {name: time_once(fn, x, y, repeats) for name, fn in ESTIMATORS.items()}
            load[n] = meter.stop()
            if load[n] <= OTHER_CORES_WARNING or time.monotonic() >= deadline:
                break
        for name, t in row.items():
            table[name][n] = t
        print(f"  estimators at N={n} done; other processes {load[n]:.2f} cores", flush=True)
    return {"dim": dim, "sizes": sizes, "repeats": repeats, "median_s": table,
            "other_cores": load}


# --------------------------------------------------------------------------- report


def overhead_table(result: dict[str, Any]) -> str:
    """Per-pair epoch times and ratios as a Markdown table."""
    lines = ["| pair | order | plain s | analysed s | of which end-of-epoch s | ratio | "
             "other cores (A / B) | losses equal |", "|---:|---|---:|---:|---:|---:|---|---|"]
    for p in result["pairs"]:
        a, b = p["plain"], p["analysed"]
        lines.append(f"| {p['repeat']} | {p['order']} | {a['epoch_s']:.2f} | {b['epoch_s']:.2f} "
                     f"| {b['analysis_s']:.3f} | {p['ratio']:.4f} | {a['other_cores']:.2f} / "
                     f"{b['other_cores']:.2f} | {p['same_losses']} |")
    s = result["summary"]
    lines.append(f"| median | | {s['median_plain_s']:.2f} | {s['median_analysed_s']:.2f} | | "
                 f"{1 + s['overhead']:.4f} | | |")
    return "\n".join(lines)


def breakdown_table(result: dict[str, Any]) -> str:
    """Median over pairs of where the extra seconds go, as a Markdown table."""
    s = result["summary"]
    bd, base = s["breakdown_median"], s["median_plain_s"]
    rows = [
        ("non-recorded batches (hooks only), sum", bd["non_recorded_batches_s"]),
        ("recorded batches (statistics, reservoir, gradient hooks), sum",
         bd["recorded_batches_s"]),
        ("end-of-epoch metrics", bd["end_of_epoch_s"]),
        ("rest (collector set-up, outside the batches)", bd["rest_s"]),
        ("total extra", bd["extra_s"]),
    ]
    lines = ["| part (median over pairs) | extra s | % of plain epoch |", "|---|---:|---:|"]
    lines += [f"| {name} | {v:.3f} | {100 * v / base:.2f} |" for name, v in rows]
    lines.append(f"| per recorded batch ({bd['n_recorded']:.0f} per epoch), median | "
                 f"{bd['median_extra_per_recorded_batch_ms'] / 1e3:.4f} | |")
    lines.append(f"| per non-recorded batch ({bd['n_non_recorded']:.0f} per epoch), median | "
                 f"{bd['median_extra_per_non_recorded_batch_ms'] / 1e3:.4f} | |")
    lines += ["", "| end-of-epoch metric (all layers) | median s |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in s["metric_s_median"].items()]
    return "\n".join(lines)


def profile_table(profile: dict[str, Any]) -> str:
    """The profiled library functions and their torch calls as Markdown tables."""
    lines = [f"cProfile of one analysed epoch ({profile['epoch_s_profiled']:.2f} s with the "
             "profiler on); library functions:", "",
             "| function | calls | tottime s | cumtime s |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['function']}` | {r['calls']} | {r['tottime_s']:.3f} | {r['cumtime_s']:.3f} |"
              for r in profile["functions"]]
    lines += ["", "built-in (torch) calls made by library functions, by time inside them:", "",
              "| call | from | calls | s |", "|---|---|---:|---:|"]
    lines += [f"| `{r['call']}` | `{r['caller']}` | {r['calls']} | {r['tottime_s']:.3f} |"
              for r in profile["builtin_calls"]]
    return "\n".join(lines)


def estimator_table(result: dict[str, Any]) -> str:
    """Median milliseconds per estimator and N, with the growth of the last doubling."""
    sizes = result["sizes"]
    head = " | ".join(f"N={n} ms" for n in sizes)
    lines = [f"| estimator (D={result['dim']}) | {head} | last step x |",
             "|---|" + "---:|" * (len(sizes) + 1)]
    for name, row in result["median_s"].items():
        cells = " | ".join(f"{1e3 * row[n]:.2f}" for n in sizes)
        growth = row[sizes[-1]] / row[sizes[-2]] if len(sizes) > 1 else math.nan
        lines.append(f"| {name} | {cells} | {growth:.1f} |")
    return "\n".join(lines)


def save_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` (through a temporary file, so a kill leaves the old one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True,
                   help="folder with cifar10_train_part1.npz, cifar10_train_part2.npz, "
                        "cifar10_test.npz")
    p.add_argument("--train-subset", type=int, default=10_000, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--every", type=int, default=EVERY, help="record every n-th forward pass")
    p.add_argument("--repeats", type=int, default=3, help="pairs of epochs (one per arm)")
    p.add_argument("--schedule", choices=("epochs", "lockstep"), default="epochs",
                   help="epochs: whole epochs alternate (AB, BA, ...); lockstep: the two arms "
                        "alternate batch by batch within each pair")
    p.add_argument("--warmup-batches", type=int, default=10, help="untimed batches per arm")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="profile one analysed epoch: auto = only when the target is missed")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048],
                   help="N of the estimator timings")
    p.add_argument("--estimator-repeats", type=int, default=5)
    p.add_argument("--skip-training", action="store_true", help="only time the estimators")
    p.add_argument("--skip-estimators", action="store_true", help="only the training overhead")
    p.add_argument("--json", default=None, help="write all results to this path")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="on a shared machine: wait up to this long (in all, per part) for other "
                        "processes to go idle, and rerun a pair or estimator block they disturb")
    args = p.parse_args(argv)
    ints = (args.train_subset, args.batch_size, args.every, args.repeats, args.threads,
            args.estimator_repeats, *args.sizes)
    if min(ints) < 1 or args.warmup_batches < 0 or min(args.sizes) < 4 or args.wait_idle < 0:
        p.error("sizes, counts and --threads must be >= 1 (--sizes >= 4, --warmup-batches and "
                "--wait-idle >= 0)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run both parts, print Markdown tables, optionally write JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    n_params = sum(p.numel() for p in VGGSmall().parameters())
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"{started}; {info['cpu']}, nproc {info['nproc']}, torch {info['torch']}, "
          f"{args.threads} threads; VGGSmall {n_params:,} parameters", flush=True)
    out: dict[str, Any] = {"started": started, "machine": info, "args": vars(args),
                           "parameters": n_params, "target": OVERHEAD_TARGET}
    if not args.skip_training:
        x, y, _, _ = load_cifar10(args.data_dir, subset=args.train_subset, seed=args.seed)
        print(f"training on {len(y)} CIFAR-10 images, batch {args.batch_size}, every "
              f"{args.every}", flush=True)
        def checkpoint(partial: dict[str, Any]) -> None:
            if args.json:  # progress survives an interrupted run
                save_json(args.json, {**out, "overhead_partial": partial})

        result = overhead(args, (x, y), checkpoint)
        out["overhead"] = result
        s = result["summary"]
        print(overhead_table(result))
        print()
        print(breakdown_table(result))
        print()
        verdict = "MET" if s["meets_target"] else "MISSED"
        if result["discarded_pairs"]:
            print(f"{len(result['discarded_pairs'])} pairs disturbed by other processes were "
                  "discarded and rerun (kept in the JSON)")
        print(f"overhead median(analysed)/median(plain) - 1 = {100 * s['overhead']:+.2f}% "
              f"(target <= {100 * OVERHEAD_TARGET:.0f}%): {verdict}; every pair within target: "
              f"{s['all_pairs_meet_target']}; per-batch losses identical in every pair: "
              f"{s['all_losses_equal']}")
        if s["max_other_cores"] > OTHER_CORES_WARNING:
            print(f"warning: other processes used up to {s['max_other_cores']:.2f} of "
                  f"{info['nproc']} cores during an epoch; wall times are disturbed")
        if result["profile"] is not None:
            print()
            print(profile_table(result["profile"]))
        print()
    if not args.skip_estimators:
        est = time_estimators(args.sizes, ESTIMATOR_DIM, args.estimator_repeats, args.seed,
                              args.wait_idle)
        out["estimators"] = est
        print(estimator_table(est))
        if max(est["other_cores"].values()) > OTHER_CORES_WARNING:
            print("warning: other processes used more than "
                  f"{OTHER_CORES_WARNING} cores during an estimator block; times are disturbed")
    out["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    if args.json:
        save_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
