"""The quick start and advanced usage of the information-theoretic design document, on
scikit-learn's digits.

    python examples/neuroexapt_quickstart.py [--epochs 20] [--log-dir runs/quickstart]

It wraps a small CNN, sets a custom layer-importance metric and a monitor, trains it with the
information bottleneck (``info_weight``) while units whose gates pass less than the adaptive
entropy threshold are removed for real, then prunes by a criteria expression and grows with
mutation, as the document's advanced usage does, printing what each step changed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

import neuroexapt
from neuroexapt.train.digits import DigitsCNN, accuracy, load_digits


def main(argv: Sequence[str] | None = None) -> int:
    """Run the quick start; returns the process exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--log-dir", default=None, help="TensorBoard and history.jsonl of the monitor")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits(args.seed)
    train_loader = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, len(y_tr), 64)]
    val_loader = [(x_te[i : i + 128], y_te[i : i + 128]) for i in range(0, len(y_te), 128)]

    # The design document's quick start, line by line.
    ne = neuroexapt.NeuroExapt(task_type="classification", depth=4, entropy_weight=0.5)
    model = ne.wrap_model(DigitsCNN(width=args.width))
    before = sum(p.numel() for p in model.parameters())
    trainer = neuroexapt.Trainer(model=model, info_weight=0.1, entropy_threshold=0.3,
                                 lr=3e-3, progress=not args.quiet)

    # The advanced usage: a custom importance metric (here, each unit's variance relative to
    # the layer's largest, one score per unit) and a monitor that logs every epoch.
    def custom_importance(layer_output: torch.Tensor, target_output: torch.Tensor
                          ) -> torch.Tensor:
        var = layer_output.var(0)
        return var / var.max().clamp(min=1e-12)

    ne.set_importance_metric(custom_importance)
    metrics = ne.monitor(metrics=["entropy", "mi_gain", "struct_complexity"],
                         log_dir=args.log_dir)
    history = trainer.fit(train_loader, val_loader, epochs=args.epochs)

    after = sum(p.numel() for p in model.parameters())
    print(f"parameters {before} -> {after} ({100 * (1 - after / before):.1f}% fewer); "
          f"units pruned {int(sum(history['pruned_units']))}; "
          f"test accuracy {accuracy(model, x_te, y_te):.4f}")
    print("monitored entropy per epoch:", [round(v, 3) for v in metrics["entropy"]])
    records = ne.prune_layers(criteria="importance < 0.05")
    print(f"prune_layers('importance < 0.05'): {len(records)} layers, parameters "
          f"{ne.parameters_count()}, test accuracy {accuracy(model, x_te, y_te):.4f}")
    records = ne.expand_layers(method="mutate", num_layers=2)
    print(f"expand_layers('mutate', 2): {[r.target for r in records]}, parameters "
          f"{ne.parameters_count()}, test accuracy {accuracy(model, x_te, y_te):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
