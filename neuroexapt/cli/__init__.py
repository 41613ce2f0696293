"""Command line: ``neuroexapt train``, ``report``, ``analyze``, ``demo`` and ``edit-demo``.

``train --config run.yaml`` trains the model the file names on its data with DNM, the
information-theoretic Trainer or plainly, into a run folder; ``--resume RUN_DIR`` continues a
run; ``report RUN_DIR`` prints its events and writes its plot; ``analyze`` prints a model's
bottleneck report (see :mod:`neuroexapt.cli.train` and :mod:`neuroexapt.cli.config`).

``demo`` trains a small CNN on scikit-learn's bundled 8x8 digits with DNM on: the model grows
where the analysis finds bottlenecks once validation accuracy stalls. It shows a progress bar,
prints the morphogenesis events, the final accuracy and parameter count, and writes a run
folder (events, TensorBoard logs, a PNG of accuracy and parameters per epoch).

``edit-demo`` trains the same CNN, then widens, deepens, adds a skip connection (each checked
to leave the outputs unchanged) and narrows it (pruning), carrying the optimizer's state.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import torch

import neuroexapt
from neuroexapt.ops.transaction import model_outputs
from neuroexapt.train.digits import DigitsCNN, accuracy, load_digits, train_epochs

__all__ = ["main"]


def edit_demo(epochs: int, seed: int) -> int:
    """Run the edit demonstration; returns the process exit code."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = time.perf_counter()
    train_epochs(model, opt, x_tr, y_tr, epochs, seed)
    probe = x_te[:64]
    print(f"trained {epochs} epochs: test accuracy {accuracy(model, x_te, y_te):.3f}, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    print(f"\n{'edit':<44} {'params':>14} {'max |dy| / scale':>17}  check")
    edits = [
        ("widen features.0 by 8 (Net2Net split)",
         lambda: neuroexapt.widen(model, "features.0", 8, example_inputs=probe, optimizer=opt,
                                  verify=True)),
        ("widen classifier.0 by 16 (zero-init)",
         lambda: neuroexapt.widen(model, "classifier.0", 16, strategy="zero", optimizer=opt,
                                  verify=True)),
        ("deepen features.3 (identity conv+BN+ReLU)",
         lambda: neuroexapt.deepen(model, "features.3", optimizer=opt, verify=True)),
        ("add_skip features.0 -> classifier.0",
         lambda: neuroexapt.add_skip(model, "features.0", "classifier.0", optimizer=opt,
                                     verify=True)),
        ("narrow features.3: remove 8 weakest",
         lambda: neuroexapt.narrow(model, "features.3", remove=8, optimizer=opt)),
    ]
    for label, edit in edits:
        before = model_outputs(model, (probe,))[0]
        record = edit()
        after = model_outputs(model, (probe,))[0]
        err = float((after - before).abs().max()) / max(1.0, float(before.abs().max()))
        check = "pruning (changes outputs)" if record.op == "narrow" else \
            "ok" if err <= 1e-5 else "FAILED"
        params = f"{record.params_before}->{record.params_after}"
        print(f"{label:<44} {params:>14} {err:>17.2e}  {check}")
        if check == "FAILED":
            return 1
    acc_edit = accuracy(model, x_te, y_te)
    train_epochs(model, opt, x_tr, y_tr, max(1, epochs // 2), seed + 1)
    print(f"\nafter the edits: test accuracy {acc_edit:.3f}; after {max(1, epochs // 2)} more "
          f"epochs with the migrated optimizer: {accuracy(model, x_te, y_te):.3f}")
    print(f"edit history: {[r.op for r in neuroexapt.get_history(model)]}; "
          f"class still {type(model).__name__}; {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuroexapt`` command."""
    parser = argparse.ArgumentParser(prog="neuroexapt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="grow a CNN with DNM on the digits data set")
    p_demo.add_argument("--epochs", type=int, default=30)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--width", type=int, default=4, help="starting width of the CNN")
    p_demo.add_argument("--out", default="runs/demo", help="run folder")
    p_demo.add_argument("--verbose", action="store_true", help="log every edit")
    p_edit = sub.add_parser("edit-demo", help="edit a CNN on the digits data set")
    p_edit.add_argument("--epochs", type=int, default=6)
    p_edit.add_argument("--seed", type=int, default=0)
    p_edit.add_argument("--verbose", action="store_true", help="log every edit")
    p_train = sub.add_parser("train", help="train from a run configuration (YAML)")
    p_train.add_argument("--config", default=None, help="the run configuration file")
    p_train.add_argument("--resume", default=None, help="a run folder to continue")
    p_train.add_argument("--no-progress", action="store_true")
    p_train.add_argument("--verbose", action="store_true", help="log every edit")
    p_report = sub.add_parser("report", help="the events and plot of a run folder")
    p_report.add_argument("run_dir")
    p_report.add_argument("--verbose", action="store_true")
    p_an = sub.add_parser("analyze", help="the bottleneck report of a model on data")
    p_an.add_argument("--model", required=True, help="built-in name or module:factory")
    p_an.add_argument("--data", default="digits", help="'digits' or an image folder")
    p_an.add_argument("--checkpoint", default=None, help="a neuroexapt.save file")
    p_an.add_argument("--batches", type=int, default=8)
    p_an.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("train", "report", "analyze"):
        from neuroexapt.cli import train
        from neuroexapt.errors import NeuroExaptError

        try:
            if args.command == "train":
                return train.train_command(args.config, args.resume, not args.no_progress)
            if args.command == "report":
                return train.report_command(args.run_dir)
            return train.analyze_command(args.model, args.data, args.checkpoint, args.batches)
        except NeuroExaptError as e:
            parser.exit(2, f"neuroexapt {args.command}: error: {e}\n")
    if args.command == "demo":
        from neuroexapt.cli.dnm_demo import dnm_demo

        return dnm_demo(args.epochs, args.seed, args.width, args.out)
    return edit_demo(args.epochs, args.seed)
