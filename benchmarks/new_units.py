"""Are newly grown units backward-starved? Gradients of new vs old units after each growth init.

A known issue of growing networks: units added to a trained layer may receive much smaller
gradients than the old ones and never catch up. This benchmark measures it for every init of
``neuroexapt.policy.growth.grow_layer`` (``GROWTH_INITS``: gradmax, orthogonal, split).

Protocol (one seed, everything measured):

1. A small CNN (``cifar10_growth.cnn(--width)``: conv w, w, pool, 2w, 2w, pool, 4w, 4w, pool,
   global average pool, linear; BatchNorm + ReLU after every conv) trains for
   ``--pretrain-epochs`` on the first ``subset - val`` images of a seeded CIFAR-10 subset
   (SGD, Nesterov momentum 0.9, weight decay ``--weight-decay``, batch ``--batch-size``,
   learning rate ``--lr`` with a per-batch cosine decay over the whole run, or constant with
   ``--schedule constant``; random crops and flips).
2. It is copied once per arm (model and optimizer state alike). ``none`` stays as it is; each
   init arm grows ``--layer`` by ``--units`` output units (default: as many as it has, i.e.
   doubling) with ``grow_layer``, as ``Expander._units`` calls it: the optimizer migrates,
   ``option`` is the layer's ``GrowthOption`` (from ``measure_bypass`` over
   ``--bypass-batches`` training batches, then ``growth_options(by="macs")``), ``split`` an
   ``AdaptiveNeuronDivision("hybrid", noise_scale=0.1, progressive_epochs=5, fraction=0.25)``
   with ``epochs_left = --epochs-after - 1`` (what ``DNMFramework`` passes: the epoch ends
   still followed by training); ``division.step_epoch`` is called after every post-growth
   epoch, as ``DNMFramework.record_performance`` does.
3. Every arm then trains ``--epochs-after`` more epochs on the same batches in the same order.
   At every step, from the loss gradient (``.grad`` after ``backward``, before the optimizer
   step, so weight decay and momentum are not in it) of the grown layer's weight and of its
   consumers' weights, it records:

   * **fan-in gradient ratio**: mean over new units of the norm of the gradient of the unit's
     fan-in (its weight rows) / the same mean over old units;
   * **fan-out gradient ratio**: the same for the units' fan-out (the consumers' input
     columns of the unit);
   * **fan-in / fan-out weight-norm ratios**: mean per-unit weight norm, new / old;
   * for ``split``, the **twin gap**: mean over new units of ``|w_new - w_twin| / |w_twin|``
     on the fan-in, where the twin is the old unit the new one was copied from (the edit
     record's ``units``); 0 means the copies are still exact clones.

   A ratio far below 1 means starved. Step 0 is the first batch right after growth.
   Validation accuracy (the last ``--val`` images of the subset, held out from training) is
   measured before growth, right after it (with the largest change of the validation logits
   in eval mode: 0 up to rounding if the function was preserved) and at the end.

The markdown table shows the steps ``--report-steps`` and the last one ("end"); ``--json``
holds every step. A single seed: accuracy differences of a few tenths are noise.

Usage (the figures in the report were taken with this command, at one intra-op thread, on a
2-core machine shared with another benchmark; the other processes' CPU use is recorded)::

    nice -n 10 .venv/bin/python benchmarks/new_units.py --data-dir ../shared/data \\
        --threads 1 --json runs/new_units.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.graph import trace
from neuroexapt.ops.resize import unit_entries
from neuroexapt.policy.division import AdaptiveNeuronDivision
from neuroexapt.policy.expansion import measure_bypass
from neuroexapt.policy.growth import GROWTH_INITS, grow_layer, growth_options

try:
    from benchmarks.analysis_overhead import LoadMeter, save_json
    from benchmarks.cifar10_growth import cnn
    from benchmarks.common import Batches, evaluate, params
    from benchmarks.data import load_cifar10
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from analysis_overhead import LoadMeter, save_json  # type: ignore[no-redef]
    from cifar10_growth import cnn  # type: ignore[no-redef]
    from common import Batches, evaluate, params  # type: ignore[no-redef]
    from data import load_cifar10  # type: ignore[no-redef]
    from machine import machine  # type: ignore[no-redef]

ARMS: tuple[str, ...] = ("none", *GROWTH_INITS)


# --------------------------------------------------------------------------- training
def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD with Nesterov momentum 0.9 (the growth benchmark's optimizer)."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                           weight_decay=args.weight_decay)


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Learning rate of global step ``step`` of ``total``."""
    if args.schedule == "constant":
        return args.lr
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Batches, start: int,
                total: int, args: argparse.Namespace, probe: Any = None) -> Iterator[float]:
    """One pass over ``batches``; yields each step's loss (``probe(model)`` runs after the
    backward pass, before the optimizer step)."""
    model.train()
    for k, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(start + k, total, args)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if probe is not None:
            probe(model)
        opt.step()
        yield float(loss.detach())


# --------------------------------------------------------------------------- measurement
class UnitProbe:
    """Per-step gradient and weight norms of the old and new units of one grown layer."""

    def __init__(self, model: nn.Module, layer: str, example: torch.Tensor, old: int) -> None:
        group = trace(model, example).group_of(layer)
        self.layer, self.size, self.old = layer, group.size, old
        self.fan_in = [m for m in group.members
                       if m.role == "out" and m.module == layer and m.tensor == "weight"]
        self.fan_out = [m for m in group.members if m.role == "in" and m.tensor == "weight"]
        self.consumers = sorted({m.module for m in self.fan_out})
        self.twins: torch.Tensor | None = None
        self.records: list[dict[str, Any]] = []

    def _per_unit(self, model: nn.Module, members: list[Any], grad: bool) -> torch.Tensor | None:
        """Per-unit norm over ``members``' entries (their squares summed), or None."""
        total = torch.zeros(self.size, dtype=torch.float64)
        for m in members:
            p = model.get_submodule(m.module).get_parameter(m.tensor)
            t = p.grad if grad else p
            if t is None:
                return None
            total += unit_entries(t.detach().double(), m, self.size).pow(2).sum(1)
        return total.sqrt()

    def _ratio(self, norms: torch.Tensor | None) -> float | None:
        if norms is None:
            return None
        new, old = float(norms[self.old:].mean()), float(norms[:self.old].mean())
        return new / old if old > 0 else None

    def _rows(self, model: nn.Module) -> torch.Tensor:
        return torch.cat([unit_entries(model.get_submodule(m.module).get_parameter(m.tensor)
                                       .detach().double(), m, self.size) for m in self.fan_in], 1)

    def set_twins(self, copied: list[int]) -> None:
        """The old unit each new unit was split from (``widen`` appends the copies of the
        sorted ``units`` in that order, at the end of the layer)."""
        self.twins = torch.tensor(sorted(copied), dtype=torch.long)

    def twin_gap(self, model: nn.Module) -> float | None:
        if self.twins is None:
            return None
        rows = self._rows(model)
        twin = rows[self.twins]
        gap = (rows[self.old:] - twin).norm(dim=1) / twin.norm(dim=1).clamp(min=1e-30)
        return float(gap.mean())

    def __call__(self, model: nn.Module, step: int | None = None, loss: float | None = None
                 ) -> dict[str, Any]:
        gin = self._per_unit(model, self.fan_in, grad=True)
        gout = self._per_unit(model, self.fan_out, grad=True)
        win = self._per_unit(model, self.fan_in, grad=False)
        wout = self._per_unit(model, self.fan_out, grad=False)
        rec = {
            "step": len(self.records) if step is None else step,
            "fan_in_grad_ratio": self._ratio(gin),
            "fan_out_grad_ratio": self._ratio(gout),
            "fan_in_weight_ratio": self._ratio(win),
            "fan_out_weight_ratio": self._ratio(wout),
            "fan_in_grad_new": None if gin is None else float(gin[self.old:].mean()),
            "fan_in_grad_old": None if gin is None else float(gin[:self.old].mean()),
            "fan_out_grad_new": None if gout is None else float(gout[self.old:].mean()),
            "fan_out_grad_old": None if gout is None else float(gout[:self.old].mean()),
            # fraction of new units whose fan-in gradient is exactly zero
            "fan_in_grad_zero_units": None if gin is None else
            float((gin[self.old:] == 0).double().mean()),
            "twin_gap": self.twin_gap(model),
        }
        self.records.append(rec)
        return rec


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])


def run_arm(name: str, base: nn.Module, base_opt: torch.optim.Optimizer,
            data: dict[str, torch.Tensor], args: argparse.Namespace, start: int, total: int,
            log: Any) -> dict[str, Any]:
    """Copy ``base``, grow it with init ``name`` (not for "none"), train; the measurements."""
    model = copy.deepcopy(base)
    opt = make_optimizer(model, args)
    opt.load_state_dict(base_opt.state_dict())
    x_tr, y_tr, x_val, y_val = data["x_train"], data["y_train"], data["x_val"], data["y_val"]
    example = x_tr[:8]
    before_logits = _logits(model, x_val)
    val_before = evaluate(model, x_val, y_val)[1]
    layer = model.get_submodule(args.layer)
    old = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    units = args.units or old
    out: dict[str, Any] = {"arm": name, "layer": args.layer, "old_units": old,
                           "val_acc_before": val_before, "params_before": params(model)}
    division = None
    copied: list[int] = []
    t0 = time.perf_counter()
    if name != "none":
        bypass = measure_bypass(model, [(x_tr[i:i + args.batch_size], y_tr[i:i + args.batch_size])
                                        for i in range(0, args.bypass_batches * args.batch_size,
                                                       args.batch_size)], F.cross_entropy)
        options = {o.layer: o for o in growth_options(model, example, bypass, by="macs")}
        option = options.get(args.layer)
        if name == "gradmax" and option is None:
            raise SystemExit(f"no growth option for {args.layer!r}; growable: {sorted(options)}")
        division = AdaptiveNeuronDivision("hybrid", noise_scale=0.1, progressive_epochs=5,
                                          fraction=0.25, seed=args.seed)
        record = grow_layer(model, args.layer, units, init=name, example_inputs=example,
                            optimizer=opt, option=option, split=division, seed=args.seed,
                            epochs_left=args.epochs_after - 1)
        out["units"] = units
        out["edit"] = str(record.args)
        copied = list(record.args.get("units", []))
        if option is not None:
            out["bypass_rank"] = int((option.gains > 1e-12 * float(option.gains[0])).sum())
            out["directions"] = 0 if option.directions is None else int(
                option.directions.shape[0])
    out["grow_s"] = time.perf_counter() - t0
    after_logits = _logits(model, x_val)
    out["function_change"] = float((after_logits - before_logits).abs().max())
    out["val_acc_after_growth"] = evaluate(model, x_val, y_val)[1]
    out["params_after"] = params(model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    out["all_params_in_optimizer"] = all(id(p) in in_opt for p in model.parameters())
    probe = None
    if name != "none":
        probe = UnitProbe(model, args.layer, example, old)
        out["consumers"] = probe.consumers
        if name == "split":
            probe.set_twins(copied)
            out["twin_gap_at_growth"] = probe.twin_gap(model)
    batches = Batches(x_tr, y_tr, args.batch_size, seed=args.seed + 1, augmented=True)
    step, losses = start, []
    t0 = time.perf_counter()
    for epoch in range(args.epochs_after):
        for loss in train_steps(model, opt, batches, step, total, args,
                                probe=(lambda m: probe(m)) if probe is not None else None):
            if probe is not None:
                probe.records[-1]["loss"] = loss
                probe.records[-1]["epoch"] = epoch
            losses.append(loss)
            step += 1
        if division is not None:
            division.step_epoch(model)  # as DNMFramework.record_performance does
        log(f"{name:<10} epoch {epoch + 1}/{args.epochs_after} "
            f"loss {sum(losses[-len(batches):]) / len(batches):.3f}")
    out["train_s"] = time.perf_counter() - t0
    out["val_acc_end"] = evaluate(model, x_val, y_val)[1]
    out["final_loss"] = losses[-1] if losses else None
    out["steps"] = probe.records if probe is not None else []
    return out


def measure(data: dict[str, torch.Tensor], args: argparse.Namespace, log: Any = print
            ) -> dict[str, Any]:
    """Pretrain once, then every arm; the measurements."""
    torch.manual_seed(args.seed)
    base = cnn(args.width)
    if args.layer not in dict(base.named_modules()):
        convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
        raise SystemExit(f"--layer {args.layer!r} is not a module; convs: {convs}")
    opt = make_optimizer(base, args)
    batches = Batches(data["x_train"], data["y_train"], args.batch_size, seed=args.seed,
                      augmented=True)
    per_epoch = len(batches)
    total = per_epoch * (args.pretrain_epochs + args.epochs_after)
    step = 0
    t0 = time.perf_counter()
    for epoch in range(args.pretrain_epochs):
        losses = list(train_steps(base, opt, batches, step, total, args))
        step += len(losses)
        log(f"pretrain   epoch {epoch + 1}/{args.pretrain_epochs} "
            f"loss {sum(losses) / len(losses):.3f}")
    pre = {"train_s": time.perf_counter() - t0, "steps": step,
           "val_acc": evaluate(base, data["x_val"], data["y_val"])[1]}
    arms = {}
    for name in args.arms:
        meter = LoadMeter()
        arms[name] = run_arm(name, base, opt, data, args, step, total, log)
        arms[name]["other_cores"] = meter.stop()
    return {"pretrain": pre, "steps_per_epoch": per_epoch, "arms": arms}


# --------------------------------------------------------------------------- report
def _f(v: float | None, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def table(result: dict[str, Any], args: argparse.Namespace) -> str:
    """Markdown: per init and reported step, the ratios; then per arm, the accuracies."""
    lines = ["| init | step | fan-in grad ratio | fan-out grad ratio | fan-in weight ratio | "
             "fan-out weight ratio | twin gap | val acc |",
             "|---|---|---|---|---|---|---|---|"]
    for name, arm in result["arms"].items():
        steps = arm["steps"]
        if not steps:
            lines.append(f"| {name} | end | n/a | n/a | n/a | n/a | n/a | "
                         f"{arm['val_acc_end']:.2f} |")
            continue
        wanted = [s for s in args.report_steps if s < len(steps) - 1] + [len(steps) - 1]
        for s in wanted:
            r = steps[s]
            last = s == len(steps) - 1
            acc = f"{arm['val_acc_end']:.2f}" if last else \
                (f"{arm['val_acc_after_growth']:.2f} (after growth)" if s == 0 else "")
            lines.append(
                f"| {name} | {'end (' + str(s) + ')' if last else s} | "
                f"{_f(r['fan_in_grad_ratio'])} | {_f(r['fan_out_grad_ratio'])} | "
                f"{_f(r['fan_in_weight_ratio'])} | {_f(r['fan_out_weight_ratio'])} | "
                f"{_f(r['twin_gap'])} | {acc} |")
    lines += ["", "| arm | val acc before | after growth | end | max logit change at growth | "
              "params | other cores |", "|---|---|---|---|---|---|---|"]
    for name, arm in result["arms"].items():
        lines.append(f"| {name} | {arm['val_acc_before']:.2f} | "
                     f"{arm['val_acc_after_growth']:.2f} | {arm['val_acc_end']:.2f} | "
                     f"{arm['function_change']:.2e} | {arm['params_after']:,} | "
                     f"{arm['other_cores']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True,
                   help="folder with cifar10_train_part1.npz, cifar10_train_part2.npz, "
                        "cifar10_test.npz")
    p.add_argument("--subset", type=int, default=10_000, help="CIFAR-10 training images used")
    p.add_argument("--val", type=int, default=1_000, help="of which held out for validation")
    p.add_argument("--width", type=int, default=8, help="cnn(width) of cifar10_growth")
    p.add_argument("--layer", default="10", help="the conv layer that grows (a module name)")
    p.add_argument("--units", type=int, default=0, help="units added (0: double the layer)")
    p.add_argument("--arms", type=lambda s: s.split(","), default=list(ARMS),
                   help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--epochs-after", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--bypass-batches", type=int, default=4,
                   help="training batches measure_bypass averages for gradmax")
    p.add_argument("--report-steps", type=lambda s: [int(v) for v in s.split(",")],
                   default=[0, 1, 10, 50, 100, 200], help="steps shown in the table")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"unknown arms {bad}; valid: {', '.join(ARMS)}")
    if args.epochs_after < 1 or args.pretrain_epochs < 0:
        p.error("--epochs-after must be >= 1 and --pretrain-epochs >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    x_tr, y_tr, _, _ = load_cifar10(args.data_dir, args.subset, args.seed)
    n = len(y_tr) - args.val
    if n < 1:
        raise SystemExit(f"--val {args.val} leaves no training images of --subset {args.subset}")
    data = {"x_train": x_tr[:n], "y_train": y_tr[:n], "x_val": x_tr[n:], "y_val": y_tr[n:]}
    t0 = time.perf_counter()
    meter = LoadMeter()
    result = measure(data, args)
    result["wall_s"] = time.perf_counter() - t0
    result["other_cores"] = meter.stop()
    print(table(result, args))
    print(f"\n{result['wall_s']:.0f} s at {args.threads} thread(s); other processes used "
          f"{result['other_cores']:.2f} cores on average")
    if args.json:
        save_json(args.json, {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "command": " ".join(sys.argv if argv is None else argv),
                              "machine": machine(),
                              "threads": torch.get_num_threads(), "args": vars(args), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
