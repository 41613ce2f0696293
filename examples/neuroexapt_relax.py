"""Discrete architectural choices by continuous relaxation, on scikit-learn's digits.

    python examples/neuroexapt_relax.py [--search-epochs 6] [--epochs 10] [--log-dir runs/relax]

A small CNN whose second convolution may use a 3x3 or a 5x5 kernel, whose first convolution
may keep 8, 12 or 16 channels and whose first Linear layer may keep 8 to 32 units: the Trainer
searches the choices (weights and architecture on alternating batches, a budget on MACs),
discretises the model into plain layers with the chosen options, then trains it on, and the
example prints what was chosen and what it costs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

import neuroexapt
from neuroexapt.relax import kernel_candidates
from neuroexapt.train.digits import DigitsCNN, accuracy, load_digits


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search; returns the process exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--search-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--penalty", type=float, default=0.3, help="weight of the MAC budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--log-dir", default=None, help="search history, TensorBoard, choices.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits(args.seed)
    train_loader = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, len(y_tr), 64)]
    val_loader = [(x_te[i : i + 128], y_te[i : i + 128]) for i in range(0, len(y_te), 128)]

    ne = neuroexapt.NeuroExapt(task_type="classification")
    model = ne.wrap_model(DigitsCNN(width=16))
    macs = neuroexapt.count_macs(model, x_tr[:1])
    ne.relax({"features.3": kernel_candidates(model.features[3], (3, 5)),
              "features.0": {"widths": [8, 12, 16]},
              "classifier.0": {"widths": [8, 16, 32]}}, example_inputs=x_tr[:4])
    options = {"arch_lr": 0.05, "penalty": args.penalty, "cost": "macs"}
    if args.log_dir:
        options["log_dir"] = args.log_dir
    trainer = neuroexapt.Trainer(model=model, lr=3e-3, info_weight=0.05, progress=False,
                                 search_epochs=args.search_epochs, search=options)
    trainer.fit(train_loader, val_loader, epochs=args.epochs)
    result = trainer.search_result
    print(f"searched {args.search_epochs} epochs in {result.seconds:.1f} s; chosen "
          f"{result.chosen}")
    print(f"kernel of features.3: {model.features[3].kernel_size}, channels of features.0: "
          f"{model.features[0].out_channels}, units of classifier.0: "
          f"{model.classifier[0].out_features}")
    print(f"MACs per image {macs} -> {neuroexapt.count_macs(model, x_tr[:1])}; test accuracy "
          f"{accuracy(model, x_te, y_te):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
