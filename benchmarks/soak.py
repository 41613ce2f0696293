"""Soak: many edits in one process, with resident memory, time per edit and hooks watched
(issue 15).

A small CNN goes through ``--edits`` edits in rotation: widen (a split, verified), narrow,
deepen (verified), a snapshot and a rollback to it, and a save/load round trip; an optimizer
follows every edit and takes a step after it. Every ``--every`` edits the resident set size
(``/proc/self/statm``, after a garbage collection) and the mean time per edit are printed. At
the end the model must hold no forward or backward hook, and the history must replay.

    python benchmarks/soak.py --edits 100
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt
from neuroexapt.policy.rollback import Snapshot
from neuroexapt.train.digits import DigitsCNN


def rss_mb() -> float:
    """Resident set size of this process, MB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def hooks(model: nn.Module) -> int:
    """Forward, pre-forward and backward hooks left on the model's modules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def soak(edits: int, every: int, seed: int = 0) -> dict[str, Any]:
    """Run the rotation; returns the memory and time samples."""
    torch.manual_seed(seed)
    model = DigitsCNN(width=8)
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    samples: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    last = start
    folder = Path(tempfile.mkdtemp())
    for i in range(1, edits + 1):
        kind = i % 5
        if kind == 0:
            neuroexapt.widen(model, "classifier.0", 2, example_inputs=x, optimizer=opt,
                             verify=True)
        elif kind == 1:
            neuroexapt.narrow(model, "classifier.0", remove=2, example_inputs=x, optimizer=opt)
        elif kind == 2:
            neuroexapt.deepen(model, "classifier.0", example_inputs=x, optimizer=opt,
                              verify=True) if i % 20 == 2 else \
                neuroexapt.widen(model, "features.0", 1, example_inputs=x, optimizer=opt)
        elif kind == 3:
            snap = Snapshot.take(model, opt)
            neuroexapt.narrow(model, "features.0", remove=1, example_inputs=x, optimizer=opt)
            snap.restore(model, opt)
        else:
            neuroexapt.save(model, folder / "m.pt", opt)
            model, opt = neuroexapt.load(folder / "m.pt", lambda: DigitsCNN(width=8),
                                         lambda m: torch.optim.SGD(m.parameters(), lr=0.01,
                                                                   momentum=0.9))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i % every == 0:
            gc.collect()
            now = time.perf_counter()
            samples.append((i, rss_mb(), (now - last) / every))
            last = now
            print(f"{i:5d} edits: rss {samples[-1][1]:.1f} MB, {1e3 * samples[-1][2]:.1f} ms "
                  "per edit", flush=True)
    return {"samples": samples, "hooks": hooks(model), "seconds": time.perf_counter() - start,
            "history": len(neuroexapt.get_history(model)), "model": model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = soak(args.edits, args.every)
    first, final = out["samples"][0], out["samples"][-1]
    print(f"{args.edits} edits in {out['seconds']:.1f} s; rss {first[1]:.1f} -> {final[1]:.1f} "
          f"MB; time per edit {1e3 * first[2]:.1f} -> {1e3 * final[2]:.1f} ms; hooks left "
          f"{out['hooks']}; history {out['history']} edits")
    return 0 if out["hooks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
