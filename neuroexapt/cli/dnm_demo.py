"""The morphogenesis demo behind ``neuroexapt demo``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from neuroexapt.core import DNMFramework
from neuroexapt.ops.edit import count_parameters
from neuroexapt.train.sinks import RunLogger

logger = logging.getLogger(__name__)

__all__ = ["DEMO_CONFIG", "dnm_demo"]

# Checks every 2 epochs; grows when validation accuracy gained < 0.5 point over 2 epochs.
DEMO_CONFIG: dict[str, Any] = {
    "morphogenesis_interval": 2,
    "max_morphogenesis_per_epoch": 2,
    "performance_improvement_threshold": 0.005,
    "plateau_window": 2,
    "neuron_division_strategy": "hybrid",
    "division_fraction": 0.5,
    "division_noise_scale": 0.1,
    "progressive_activation_epochs": 3,
    "rollback_enabled": True,
    "performance_drop_threshold": 0.05,
    "max_architecture_changes": 8,
}


def dnm_demo(epochs: int, seed: int, width: int, out: str) -> int:
    """Train a small CNN on digits with DNM; returns the process exit code."""
    from tqdm import tqdm

    from neuroexapt.train.digits import DigitsCNN, accuracy, load_digits, train_epochs

    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    cut = int(0.85 * len(y_tr))  # validation: a held-out slice of the training split
    x_tr, y_tr, x_va, y_va = x_tr[:cut], y_tr[:cut], x_tr[cut:], y_tr[cut:]
    model = DigitsCNN(width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = Path(out)
    sink = RunLogger(run)
    probe = [(x_va[i : i + 128], y_va[i : i + 128]) for i in range(0, len(y_va), 128)]
    dnm = DNMFramework(model, DEMO_CONFIG, optimizer=opt, probe=probe,
                       events_path=run / "events.jsonl", seed=seed)
    start_params, start = count_parameters(model), time.perf_counter()
    print(f"DNM demo: digits {len(y_tr)} train / {len(y_va)} validation / {len(y_te)} test, "
          f"CNN of width {width} with {start_params} parameters; run folder {run}")
    bar = tqdm(range(1, epochs + 1), desc="epochs", unit="epoch")
    for epoch in bar:
        train_epochs(model, opt, x_tr, y_tr, 1, seed * 1000 + epoch)
        val = accuracy(model, x_va, y_va)
        dnm.update_caches()
        dnm.record_performance(val)
        go, _ = dnm.should_trigger_morphogenesis(epoch, None, {"accuracy": val})
        if go:
            dnm.execute_morphogenesis(epoch)
            model = dnm.model
        sink.log(epoch, val_accuracy=val, parameters=count_parameters(model))
        bar.set_postfix(val=f"{val:.3f}", params=count_parameters(model))
    sink.close()
    test = accuracy(model, x_te, y_te)
    events = dnm.events.events
    by_epoch: dict[int, list[str]] = {}
    for e in events:
        by_epoch.setdefault(e.epoch, []).append(e.kind.replace("_", " "))
    marks = [(ep, " + ".join(sorted(set(kinds)))) for ep, kinds in by_epoch.items()]
    plot = sink.plot(run / "accuracy_params.png", metric="val_accuracy", params="parameters",
                     events=marks)
    _print_events(events)
    print(f"\nfinal test accuracy {test:.4f}; parameters {start_params} -> "
          f"{count_parameters(model)}; {len(events)} events; "
          f"{time.perf_counter() - start:.1f} s")
    print(f"run folder: {run}/ (events.jsonl, history.jsonl, tensorboard/, {plot.name})")
    return 0


def _print_events(events: list[Any]) -> None:
    print(f"\n{'epoch':>5}  {'kind':<18} {'layer':<28} {'params':>14}  {'val before':>10}  "
          f"{'val after':>9}")
    if not events:
        print("  (no morphogenesis: validation accuracy never stalled)")
    for e in events:
        after = f"{e.metric_after:.4f}" if e.metric_after is not None else "-"
        before = f"{e.metric_before:.4f}" if e.metric_before is not None else "-"
        print(f"{e.epoch:>5}  {e.kind:<18} {e.layer[:28]:<28} "
              f"{e.params_before:>6}->{e.params_after:<6}  {before:>10}  {after:>9}")
        for reason in e.reasons[:2]:
            print(f"{'':>7}because {reason[:100]}")
