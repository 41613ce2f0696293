"""Latency and peak extra memory of each NeuroExapt edit on a ResNet-18 (issue 2).

Target from the issue: every edit takes under 1 s on 2 CPU cores, with peak extra memory
under 2x the model's size (parameters plus buffers).

Each case runs in its own fresh process (``multiprocessing`` "spawn"). In that process the
model is built, an SGD(momentum) optimizer takes one training step (so it has momentum state),
and then, for a warm-up call and for each of ``--repeats`` timed calls, the edit is applied to
a fresh ``copy.deepcopy`` of the model and its optimizer (the copy is not timed). Wall time is
``time.perf_counter`` around the edit call alone. Memory: torch's CPU allocations are invisible
to ``tracemalloc``, so the process's resident set is measured instead. Before each call the
high-water mark is reset to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)
and the peak extra memory is ``VmHWM`` after the call minus ``VmRSS`` before it; the largest
value over the timed repeats is reported. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is
recorded too, as a cross-check (it is only reset by the same mechanism, so without it only the
first call in a process could be measured).

Usage::

    .venv/bin/python benchmarks/edit_latency.py                       # 32x32, CIFAR stem
    .venv/bin/python benchmarks/edit_latency.py --input-size 224 --stem imagenet
    .venv/bin/python benchmarks/edit_latency.py --json results.json --repeats 5 --threads 2
    .venv/bin/python benchmarks/edit_latency.py --wait-idle 600   # on a shared machine

The parent process also measures how many cores other processes kept busy during each case
(``/proc/stat`` minus its own and its workers' CPU time) and warns when that exceeds
``OTHER_CORES_WARNING``: on 2 cores, a concurrent job slows the OpenMP convolutions of the
forward passes by one to two orders of magnitude, so such wall times say nothing about the
library.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt

Stem = Literal["cifar", "imagenet"]

try:
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from machine import machine  # type: ignore[no-redef]


LATENCY_TARGET_S = 1.0  # issue 2: each edit under 1 s on 2 CPU cores
MEMORY_TARGET_X = 2.0  # issue 2: peak extra memory under 2x the model's size
BATCH = 2  # example inputs are [BATCH, 3, size, size]
OTHER_CORES_WARNING = 0.2  # warn when other processes used more cores than this on average


# --------------------------------------------------------------------------- the model


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs, identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18: BasicBlocks [2, 2, 2, 2] of widths 64-128-256-512, torchvision's names.

    Args:
        stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool; for 32x32 inputs) or ``"imagenet"``
            (7x7 stride-2 conv and 3x3 stride-2 max-pool, as in torchvision; for 224x224).
        num_classes: outputs of the final Linear layer (10 gives ~11.2M parameters).
    """

    def __init__(self, stem: Stem = "cifar", num_classes: int = 10) -> None:
        super().__init__()
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths, planes = (64, 128, 256, 512), 64
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            layer = nn.Sequential(BasicBlock(planes, width, stride), BasicBlock(width, width))
            self.add_module(f"layer{i}", layer)
            planes = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``[batch, num_classes]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def build(stem: Stem, size: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """A seeded ResNet-18, an SGD(momentum) optimizer after one training step, example inputs."""
    torch.manual_seed(0)
    model = ResNet18(stem)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(BATCH, 3, size, size)
    loss = F.cross_entropy(model(x), torch.tensor([1, 2] * (BATCH // 2) + [0] * (BATCH % 2)))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, x


# --------------------------------------------------------------------------- the cases

Edit = Callable[[nn.Module, torch.Tensor, torch.optim.Optimizer], Any]


@dataclass(frozen=True)
class Case:
    """One benchmarked call.

    Attributes:
        name: label in the table and the JSON.
        run: applies the call to a model, its example inputs and its optimizer.
        reference: not an edit, only a yardstick (no verdict against the targets).
    """

    name: str
    run: Edit
    reference: bool = False


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One eval-mode forward pass without gradients (what ``trace`` and ``verify`` run)."""
    model.eval()
    with torch.no_grad():
        return model(x)


CASES: tuple[Case, ...] = (
    Case("reference: eval forward", lambda m, x, o: _forward(m, x), reference=True),
    Case("trace", lambda m, x, o: neuroexapt.trace(m, (x,))),
    Case("widen layer3.0.conv1 +32",
         lambda m, x, o: neuroexapt.widen(m, "layer3.0.conv1", 32, example_inputs=x,
                                          optimizer=o)),
    Case("widen layer3.0.conv1 +32 verify",
         lambda m, x, o: neuroexapt.widen(m, "layer3.0.conv1", 32, example_inputs=x,
                                          optimizer=o, verify=True)),
    Case("widen layer1.0.conv1 +16 zero",
         lambda m, x, o: neuroexapt.widen(m, "layer1.0.conv1", 16, strategy="zero",
                                          example_inputs=x, optimizer=o)),
    Case("widen layer1.0.conv1 +16 zero verify",
         lambda m, x, o: neuroexapt.widen(m, "layer1.0.conv1", 16, strategy="zero",
                                          example_inputs=x, optimizer=o, verify=True)),
    Case("widen conv1 +16 (stem+layer1)",
         lambda m, x, o: neuroexapt.widen(m, "conv1", 16, example_inputs=x, optimizer=o)),
    Case("widen conv1 +16 (stem+layer1) verify",
         lambda m, x, o: neuroexapt.widen(m, "conv1", 16, example_inputs=x, optimizer=o,
                                          verify=True)),
    Case("narrow layer3.0.conv1 -64",
         lambda m, x, o: neuroexapt.narrow(m, "layer3.0.conv1", remove=64, example_inputs=x,
                                           optimizer=o)),
    Case("deepen layer2.1.conv1",
         lambda m, x, o: neuroexapt.deepen(m, "layer2.1.conv1", example_inputs=x,
                                           optimizer=o)),
    Case("add_skip layer1.1.conv2->layer3.0.conv1",
         lambda m, x, o: neuroexapt.add_skip(m, "layer1.1.conv2", "layer3.0.conv1",
                                             example_inputs=x, optimizer=o)),
    Case("remove_block layer4.1",
         lambda m, x, o: neuroexapt.remove_block(m, "layer4.1", example_inputs=x,
                                                 optimizer=o)),
)


# --------------------------------------------------------------------------- memory probes


def _status_kb(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _release_and_reset_peak() -> None:
    """Free garbage, return freed heap to the OS, and reset the RSS high-water mark."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: freed memory stays resident (lower figures)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its children)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, sum(u.ru_utime + u.ru_stime for u in own)


def other_cores(seconds: float) -> float:
    """Average number of cores that other processes kept busy over the next ``seconds``."""
    (busy0, own0), start = _cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    (busy1, own1), wall = _cpu_seconds(), time.perf_counter() - start
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def _maxrss_kb() -> int:
    """``ru_maxrss`` of this process (reset by ``clear_refs`` too)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _one_call(
    case: Case, base: tuple[nn.Module, torch.optim.Optimizer], x: torch.Tensor
) -> dict[str, float]:
    """Apply ``case`` once to a fresh copy: wall and CPU seconds, RSS growth in kB."""
    model, optimizer = copy.deepcopy(base)
    _release_and_reset_peak()
    rss0, maxrss0 = _status_kb("VmRSS"), _maxrss_kb()
    start, cpu_start = time.perf_counter(), time.process_time()
    case.run(model, x, optimizer)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "cpu_seconds": time.process_time() - cpu_start,
           "extra_kb": _status_kb("VmHWM") - rss0,
           "maxrss_extra_kb": _maxrss_kb() - maxrss0}
    del model, optimizer
    return out


def measure(name: str, stem: Stem, size: int, repeats: int, threads: int) -> dict[str, Any]:
    """Run one case in this (fresh) process: a warm-up call, then ``repeats`` measured calls."""
    torch.set_num_threads(threads)
    case = next(c for c in CASES if c.name == name)
    model, optimizer, x = build(stem, size)
    base = (model, optimizer)
    first = _one_call(case, base, x)
    calls = [_one_call(case, base, x) for _ in range(repeats)]
    times = [c["seconds"] for c in calls]
    return {
        "name": name,
        "reference": case.reference,
        "first_call_s": first["seconds"],
        "first_call_extra_mb": first["extra_kb"] / 1024,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "median_cpu_s": statistics.median(c["cpu_seconds"] for c in calls),
        "extra_mb": max(c["extra_kb"] for c in calls) / 1024,
        "maxrss_extra_mb": max(c["maxrss_extra_kb"] for c in calls) / 1024,
        "model_mb": model_bytes(model) / 2**20,
    }


# --------------------------------------------------------------------------- report


def verdict(row: dict[str, Any]) -> str:
    """``pass`` when both targets are met, else which one is missed."""
    if row["reference"]:
        return "(reference)"
    missed = []
    if row["median_s"] >= LATENCY_TARGET_S:
        missed.append("time")
    if row["extra_x"] >= MEMORY_TARGET_X:
        missed.append("memory")
    return "pass" if not missed else "FAIL " + "+".join(missed)


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = ["| edit | median s | min s | first call s | peak extra MB | x model size | "
             "vs targets |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['first_call_s']:.3f} "
            f"| {r['extra_mb']:.1f} | {r['extra_x']:.2f} | {r['verdict']} |"
        )
    return "\n".join(lines)


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one case in a fresh process; with ``--wait-idle``, wait for and retry until
    other processes leave the CPU (almost) idle during the whole measurement."""
    deadline = time.monotonic() + args.wait_idle
    attempts = 0
    while True:
        while time.monotonic() < deadline and other_cores(1.0) > OTHER_CORES_WARNING:
            pass
        attempts += 1
        (busy0, own0), start = _cpu_seconds(), time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            row = pool.submit(measure, name, args.stem, args.input_size, args.repeats,
                              args.threads).result()
        (busy1, own1), wall = _cpu_seconds(), time.perf_counter() - start
        row["other_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
        row["attempts"] = attempts
        if row["other_cores"] <= OTHER_CORES_WARNING or time.monotonic() >= deadline:
            return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-size", type=int, default=32, help="H=W of the [2,3,H,W] inputs")
    p.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar",
                   help="cifar: 3x3 conv, no max-pool; imagenet: 7x7/2 conv + max-pool")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per edit")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in workers")
    p.add_argument("--only", nargs="*", default=None, help="case names to run (default all)")
    p.add_argument("--json", default=None, help="write the results to this path")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="on a shared machine, wait up to this long per case for other "
                        "processes to go idle, and rerun the case while they disturb it")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.input_size < 8 or args.wait_idle < 0:
        p.error("--repeats and --threads must be >= 1, --input-size >= 8, --wait-idle >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every case in a fresh process, print the table, optionally write JSON."""
    args = parse_args(argv)
    names = [c.name for c in CASES]
    for n in args.only or []:
        if n not in names:
            sys.exit(f"unknown case {n!r}; cases: {', '.join(names)}")
    selected = [n for n in names if args.only is None or n in args.only]
    size_model = ResNet18(args.stem)
    n_params = sum(p.numel() for p in size_model.parameters())
    info = machine()
    print(f"ResNet-18 ({args.stem} stem): {n_params:,} parameters, "
          f"{model_bytes(size_model) / 2**20:.1f} MB params+buffers; inputs "
          f"[{BATCH},3,{args.input_size},{args.input_size}]; {args.threads} threads; "
          f"{info['cpu']}, nproc {info['nproc']}, torch {info['torch']}", flush=True)
    rows = []
    for name in selected:
        row = run_case(name, args)
        row["extra_x"] = row["extra_mb"] / row["model_mb"]
        row["verdict"] = verdict(row)
        rows.append(row)
        print(f"  {name}: median {row['median_s']:.3f} s, peak extra {row['extra_mb']:.1f} MB, "
              f"other processes used {row['other_cores']:.2f} cores", flush=True)
    print(table(rows))
    busiest = max(r["other_cores"] for r in rows)
    if busiest > OTHER_CORES_WARNING:
        print(f"warning: other processes used up to {busiest:.2f} of {info['nproc']} cores "
              "during a case, so wall times are inflated; rerun on an idle machine")
    if args.json:
        result = {"issue": 2, "date": datetime.datetime.now().astimezone().isoformat(),
                  "command": " ".join([sys.executable, *sys.argv]), "machine": info,
                  "args": vars(args), "params": n_params,
                  "targets": {"latency_s": LATENCY_TARGET_S, "memory_x": MEMORY_TARGET_X},
                  "results": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
