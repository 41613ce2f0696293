"""DNM with every configuration key set explicitly, on scikit-learn's digits.

The first block of the configuration is the design document's "advanced configuration"; the
second holds the keys this implementation adds. Each key is explained where it is set. The
run trains a small CNN, lets DNM change it when validation accuracy stops improving, and prints
the table of events and the configuration as the framework validated it
(``dnm.config.to_dict()``).

Usage:
    python examples/dnm_advanced_config.py
    python examples/dnm_advanced_config.py --strategy gradient_based --epochs 30
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _data import load_digits
from torch import nn

from neuroexapt.core import DNMFramework, MorphogenesisEvent
from neuroexapt.train.digits import DigitsCNN

logger = logging.getLogger("dnm_advanced_config")


def advanced_config(strategy: str = "hybrid", epochs: int = 24) -> dict[str, Any]:
    """The configuration dict: the document's keys, then this implementation's."""
    document = {
        # --- trigger control
        # Epochs between two checks: should_trigger_morphogenesis(epoch) can only say yes when
        # epoch is a multiple of this.
        "morphogenesis_interval": 3,
        # Changes applied by one execute_morphogenesis() call, at the best-ranked bottlenecks.
        "max_morphogenesis_per_epoch": 1,
        # Plateau test: a check fires when the validation metric improved by less than this
        # (absolute, 0.01 = one accuracy point) over the last plateau_window epochs.
        "performance_improvement_threshold": 0.01,
        # --- neuron division
        # Which units of a bottleneck layer are split: "gradient_based" (largest E[g^2]),
        # "activation_based" (largest activation variance) or "hybrid" (mean of both, each
        # normalised by its maximum).
        "neuron_division_strategy": strategy,
        # Relative standard deviation of the opposite noise that separates each unit from its
        # copy (the copies start identical, so the function is unchanged at the split).
        "division_noise_scale": 0.1,
        # Epochs over which that noise is applied, in equal steps (0: all at once).
        "progressive_activation_epochs": 5,
        # --- bottleneck detection: metrics computed for every Conv/Linear layer; a layer is a
        # bottleneck when one of their scores reaches its threshold.
        "bottleneck_detection_metrics": [
            "gradient_variance",  # variance of the loss gradient w.r.t. the layer's units
            "activation_diversity",  # effective rank of the activations / usable units
            "information_flow",  # information about the labels lost since the previous layer
            "performance_sensitivity",  # held-out loss increase when the layer is ablated
        ],
        # --- safety
        # Snapshot model and optimizer before each change and restore both when validation
        # falls by more than performance_drop_threshold within evaluation_window epochs.
        "rollback_enabled": True,
        "performance_drop_threshold": 0.05,
        # Changes allowed over the whole run (rollbacks do not give any back).
        "max_architecture_changes": 10,
    }
    implementation = {
        # Units added to a layer by one division, as a fraction of its units.
        "division_fraction": 0.25,
        # Epochs after a change during which no new change is made and a drop rolls it back.
        "evaluation_window": 2,
        # Epochs over which the improvement of the plateau test is measured.
        "plateau_window": 3,
        # Refuse changes that would take the model above this many parameters (None: no limit).
        "max_parameters": 200_000,
        # Probe batches analysed by each update_caches() call (when a probe= is given).
        "analysis_batches": 4,
        # Insert an identity-initialised layer when a bottleneck cannot be split.
        "allow_deepen": True,
        # Add a zero-initialised skip connection around a layer that loses information.
        "allow_connections": True,
        # Trigger on bottleneck evidence alone, without waiting for a plateau.
        "trigger_on_bottleneck": False,
        # --- growth policy: a budget spent early, where units buy the most per cost
        # The cost the grown model may reach: an absolute count, or a ratio of the start.
        "growth_budget": "3x",
        # What the budget and the ranking of layers count: "macs" (per forward) or
        # "parameters".
        "growth_cost": "macs",
        # Fraction of the run by which the budget is spent, in growth_steps equal steps.
        "growth_by": 0.5,
        "growth_steps": 4,
        # Epochs of the whole run (the schedule needs it).
        "total_epochs": epochs,
        # How new units start: "gradmax" (fan-in along the loss gradient's top directions,
        # fan-out zero), "orthogonal" (random fan-in orthogonal to the existing units) or
        # "split" (Net2Net copies separated by the noise above).
        "growth_init": "gradmax",
        # Learning-rate factor for the new units' weights, for new_unit_lr_epochs epochs.
        "new_unit_lr_scale": 1.0,
        "new_unit_lr_epochs": 3,
        # Every record_every-th training batch is recorded by the framework's own hooks.
        "record_every": 10,
        # Grown widths are rounded to multiples of this (fast CPU kernels).
        "growth_multiple": 8,
    }
    return {**document, **implementation}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Loss and accuracy on one batch, in eval mode."""
    model.eval()
    with torch.no_grad():
        out = model(x)
    return {"loss": float(F.cross_entropy(out, y)),
            "accuracy": float((out.argmax(1) == y).float().mean())}


def events_table(events: Sequence[MorphogenesisEvent]) -> str:
    """A fixed-width table of the events, with the first reason of each."""
    head = (f"{'epoch':>5}  {'kind':<18} {'layer':<22} {'params':>15}  "
            f"{'val before':>10} {'val after':>9}  reason")
    rows = [head, "-" * len(head)]
    for e in events:
        params = f"{e.params_before}->{e.params_after}"
        before = "-" if e.metric_before is None else f"{e.metric_before:.4f}"
        after = "-" if e.metric_after is None else f"{e.metric_after:.4f}"
        reason = e.reasons[0] if e.reasons else ""
        rows.append(f"{e.epoch:>5}  {e.kind:<18} {e.layer[:22]:<22} {params:>15}  "
                    f"{before:>10} {after:>9}  {reason}")
    if not events:
        rows.append("(no events)")
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; bad values exit with a usage message."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="hybrid",
                   choices=("gradient_based", "activation_based", "hybrid"),
                   help="neuron_division_strategy")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--subset", type=int, default=None, help="first N training images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the model is tiny: one is fastest)")
    p.add_argument("--events", default=None, help="write the events to this JSON-lines file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits(args.seed, args.subset)
    val = min(200, len(y_tr) // 5)
    x_tr, y_tr, x_val, y_val = x_tr[val:], y_tr[val:], x_tr[:val], y_tr[:val]

    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    params_before = sum(p.numel() for p in model.parameters())
    # as the design document writes it: the framework records its statistics from the
    # training batches and finds the optimizer by itself
    dnm = DNMFramework(model, advanced_config(args.strategy, args.epochs),
                       events_path=args.events, seed=args.seed)

    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=gen).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            optimizer.step()
        train_m, val_m = evaluate(model, x_tr, y_tr), evaluate(model, x_val, y_val)
        dnm.update_caches()
        dnm.record_performance(val_m["accuracy"])
        trigger, reasons = dnm.should_trigger_morphogenesis(epoch, train_m, val_m)
        logger.info("epoch %2d  train acc %.4f  val acc %.4f  %s", epoch, train_m["accuracy"],
                    val_m["accuracy"], "trigger" if trigger else reasons[0])
        if trigger:
            results = dnm.execute_morphogenesis(epoch)
            model = dnm.model
            logger.info("  applied: %d divisions, %d layers, %d connections (+%d parameters)",
                        results["neuron_divisions"], results["layers_added"],
                        results["connections_added"], results["parameters_added"])

    params_after = sum(p.numel() for p in model.parameters())
    print(f"test accuracy: {evaluate(model, x_te, y_te)['accuracy']:.4f}")
    print(f"parameters: {params_before} -> {params_after}")
    print(f"time: {time.perf_counter() - start:.1f} s")
    print("\nevents:")
    print(events_table(dnm.events.events))
    print("\nconfiguration (dnm.config.to_dict()):")
    print(json.dumps(dnm.config.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
