"""Edits on the models people bring (issue 12): torchvision and Hugging Face models.

Models are built with random weights and no download: torchvision's classification models
(``torchvision.models.get_model(name, weights=None, num_classes=10)``, 64x64 inputs) and
Hugging Face transformers from small configs (``tests/helpers/hf_zoo.py``). Families whose
library is not installed are skipped, and the report says so.

For each model, up to ``--layers`` of its Conv/Linear/Embedding layers (transformers' ``Conv1D``
too), spread evenly over the model, each get three edits on a fresh copy of the model:

* ``widen``: ``neuroexapt.widen`` by two units per segment (every unit once where a LayerNorm
  or a mean reads the group), ``verify=True`` (``allow_approximate`` where a sum reads it);
* ``narrow``: ``neuroexapt.narrow`` of one unit per segment;
* ``deepen``: ``neuroexapt.deepen`` (an identity-initialised layer after it), ``verify=True``.

Each case is one of:

* ``ok``: the edit returned, the model runs and its outputs keep their shapes (widen and
  deepen: and their values, which ``verify`` checked);
* ``refused``: a ``NeuroExaptError`` was raised and the model is exactly as before (same
  ``state_dict``, same outputs);
* ``FAILED``: anything else: a raw exception, or a model changed by a refused edit.

Then ``neuroexapt.prune_to`` removes 30% of the MACs (``score="norm"``), and, side by side,
Torch-Pruning (``MetaPruner``, magnitude importance, uniform ratio 0.3, the output layer
ignored) prunes the same model when it is installed, in a child process limited to 16 GiB
and 10 minutes (it exhausted 24 GiB on Swin-T); each result is ok (the pruned model runs
with the output's shape and fewer parameters), refused (a clear error) or FAILED.

Usage::

    .venv/bin/python benchmarks/model_zoo.py --json runs/model_zoo.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt
from neuroexapt.errors import NeuroExaptError

try:
    from benchmarks.machine import machine
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    from machine import machine  # type: ignore[no-redef]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "convnext_tiny", "shufflenet_v2_x0_5", "densenet121", "vgg11", "regnet_x_400mf",
               "squeezenet1_0", "googlenet", "mnasnet0_5", "vit_b_16", "swin_t"]
EDITS = ("widen", "narrow", "deepen")
Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def torchvision_models() -> dict[str, Callable[[], Built]]:
    """torchvision's models, or {} when it is not installed."""
    try:
        import torchvision
    except ImportError:
        return {}

    def build(name: str) -> Built:
        torch.manual_seed(0)
        kwargs: dict[str, Any] = {"image_size": 64} if name.startswith("vit") else {}
        if name == "googlenet":
            kwargs = {"aux_logits": False, "init_weights": True}
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
        return model.eval(), (torch.randn(2, 3, 64, 64, generator=torch.Generator()
                                          .manual_seed(0)),)

    return {f"torchvision/{n}": (lambda n=n: build(n)) for n in TORCHVISION}


def hf_models() -> dict[str, Callable[[], Built]]:
    """transformers' models from small configs, or {} when it is not installed."""
    try:
        import transformers
    except ImportError:
        return {}
    transformers.logging.set_verbosity_error()
    from helpers.hf_zoo import NAMES, build

    return {f"hf/{n}": (lambda n=n: build(n)) for n in NAMES}


def _output(out: Any) -> torch.Tensor:
    """The logits of a model's output (a tensor, a ModelOutput or a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(iter(out.values()))
    return out[0]


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return _output(model(*inputs)).detach().clone()


def _layers(model: nn.Module, count: int) -> list[str]:
    kinds: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)
    try:
        from transformers.pytorch_utils import Conv1D
        kinds += (Conv1D,)
    except ImportError:
        pass
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    step = max(1, len(names) // count)
    return names[::step][:count]


def _edit(model: nn.Module, inputs: tuple[torch.Tensor, ...], layer: str, op: str) -> None:
    if op == "deepen":
        neuroexapt.deepen(model, layer, example_inputs=inputs, verify=True)
        return
    group = neuroexapt.trace(model, inputs).group_of(layer)
    if op == "narrow":
        # one unit (one head, for attention) of each segment (grouped convs)
        per = group.size // group.segments
        neuroexapt.narrow(model, layer, remove=[s * per + t for s in range(group.segments)
                                                for t in range(group.atom)],
                          example_inputs=inputs)
    else:
        by = group.size if group.normalizers else 2 * group.segments * group.atom
        neuroexapt.widen(model, layer, by, example_inputs=inputs, verify=True,
                         allow_approximate=bool(group.sums))


def _case(build: Callable[[], Built], layer: str, op: str) -> tuple[str, str]:
    model, inputs = build()
    before = _run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _edit(model, inputs, layer, op)
    except NeuroExaptError as e:
        after = model.state_dict()
        same = state.keys() == after.keys() and all(torch.equal(state[k], after[k])
                                                     for k in state)
        if same and torch.equal(_run(model, inputs), before):
            return "refused", f"{type(e).__name__}: {e}"
        return "FAILED", f"refused ({type(e).__name__}) but the model changed: {e}"
    except Exception as e:  # a raw error is what the zoo is for
        return "FAILED", f"raw {type(e).__name__}: {e}"
    try:
        out = _run(model, inputs)
    except Exception as e:
        return "FAILED", f"the edited model does not run: {type(e).__name__}: {e}"
    if out.shape != before.shape:
        return "FAILED", f"output shape {tuple(before.shape)} -> {tuple(out.shape)}"
    return "ok", ""


def _batches(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    out = _run(model, inputs)
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=gen)
    return [(inputs, target)] * 2


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    logits = _output(out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _prune_ours(build: Callable[[], Built]) -> tuple[str, str]:
    model, inputs = build()
    before = _run(model, inputs)
    params = sum(p.numel() for p in model.parameters())
    try:
        neuroexapt.prune_to(model, _batches(model, inputs), 0.3, by="macs", score="norm",
                            loss_fn=_loss, batches=2, steps=2)
        out = _run(model, inputs)
    except NeuroExaptError as e:
        return "refused", f"{type(e).__name__}: {e}"
    except Exception as e:
        return "FAILED", f"raw {type(e).__name__}: {e}"
    if out.shape != before.shape or sum(p.numel() for p in model.parameters()) >= params:
        return "FAILED", "the pruned model has other outputs or as many parameters"
    return "ok", ""


def _isolated(fn: Callable[[], tuple[str, str]], gib: float, seconds: float
              ) -> tuple[str, str]:
    """``fn()`` in a forked process limited to ``gib`` GiB of address space and ``seconds``
    (Torch-Pruning exhausted 24 GiB on Swin-T): a MemoryError, a crash or the time running
    out there is its result."""
    import multiprocessing
    import resource

    def child(conn: Any) -> None:
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            conn.send(fn())
        except BaseException as e:  # MemoryError included
            conn.send(("FAILED", f"{type(e).__name__}: {e}"))

    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(there,))
    proc.start()
    there.close()
    result: tuple[str, str]
    if not here.poll(seconds):
        proc.kill()
        result = ("FAILED", f"did not finish in {seconds:.0f} s")
    else:
        try:
            result = here.recv()
        except EOFError:
            result = ("FAILED", f"the process died (exit code {proc.exitcode})")
    proc.join()
    return result


def _prune_theirs(build: Callable[[], Built]) -> tuple[str, str]:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return "n/a", "torch-pruning is not installed"
    return _isolated(lambda: _tp_prune(build), 16.0, 600.0)


def _tp_prune(build: Callable[[], Built]) -> tuple[str, str]:
    import torch_pruning as tp

    model, inputs = build()
    before = _run(model, inputs)
    params = sum(p.numel() for p in model.parameters())
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    try:
        pruner = tp.pruner.MetaPruner(
            model, inputs[0] if len(inputs) == 1 else inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.3,
            ignored_layers=last, output_transform=_output)
        pruner.step()
        out = _run(model, inputs)
    except Exception as e:
        return "FAILED", f"{type(e).__name__}: {e}"
    if out.shape != before.shape or sum(p.numel() for p in model.parameters()) >= params:
        return "FAILED", "the pruned model has other outputs or as many parameters"
    return "ok", ""


def run_model(name: str, build: Callable[[], Built], layers: int) -> dict[str, Any]:
    start = time.perf_counter()
    model, inputs = build()
    try:
        graph = neuroexapt.trace(model, inputs)
        groups = (sum(g.resizable for g in graph.groups), len(graph.groups))
    except NeuroExaptError as e:
        groups = (0, 0)
        print(f"{name}: not traced: {e}", flush=True)
    cases = [{"layer": layer, "edit": op, **dict(zip(("result", "detail"), _case(build, layer,
                                                                               op), strict=True))}
             for layer in _layers(model, layers) for op in EDITS]
    ours, theirs = _prune_ours(build), _prune_theirs(build)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
           "groups_resizable": groups[0], "groups": groups[1], "cases": cases,
           "prune_to": ours[0], "prune_to_detail": ours[1], "torch_pruning": theirs[0],
           "torch_pruning_detail": theirs[1], "seconds": time.perf_counter() - start}
    counts = {k: sum(c["result"] == k for c in cases) for k in ("ok", "refused", "FAILED")}
    print(f"{name}: groups {groups[0]}/{groups[1]} resizable; edits {counts}; prune_to "
          f"{ours[0]}; torch-pruning {theirs[0]} ({row['seconds']:.0f} s)", flush=True)
    for c in cases:
        if c["result"] == "FAILED":
            print(f"    FAILED {c['edit']} {c['layer']}: {c['detail'][:200]}", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | params | resizable groups | edits ok | refused | FAILED | prune_to | "
             "Torch-Pruning |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        counts = [sum(c["result"] == k for c in r["cases"]) for k in ("ok", "refused", "FAILED")]
        lines.append(f"| {r['model']} | {r['params']:,} | {r['groups_resizable']}/{r['groups']} "
                     f"| {counts[0]} | {counts[1]} | {counts[2]} | {r['prune_to']} | "
                     f"{r['torch_pruning']} |")
    cases = [c for r in rows for c in r["cases"]]
    ok = sum(c["result"] == "ok" for c in cases)
    failed = sum(c["result"] == "FAILED" for c in cases)
    lines.append("")
    lines.append(f"{ok} of {len(cases)} (model, layer, edit) cases succeeded "
                 f"({100 * ok / max(1, len(cases)):.0f}%; goal 90%), {failed} failed (goal 0); "
                 f"prune_to ok on {sum(r['prune_to'] == 'ok' for r in rows)} of {len(rows)} "
                 f"models, Torch-Pruning on {sum(r['torch_pruning'] == 'ok' for r in rows)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6, help="layers tried per model")
    p.add_argument("--models", nargs="*", default=None,
                   help="names as printed (torchvision/resnet18, hf/bert); default: all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    zoo = {**torchvision_models(), **hf_models()}
    missing = [lib for lib, found in (("torchvision", any(k.startswith("torchvision/")
                                                          for k in zoo)),
                                      ("transformers", any(k.startswith("hf/") for k in zoo)))
               if not found]
    for lib in missing:
        print(f"{lib} is not installed: its models are skipped", flush=True)
    names = args.models if args.models is not None else list(zoo)
    unknown = [n for n in names if n not in zoo]
    if unknown:
        p.error(f"unknown or unavailable models {unknown}; available: {', '.join(zoo)}")
    start = time.perf_counter()
    rows = [run_model(n, zoo[n], args.layers) for n in names]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "machine": machine(), "versions": _versions(), "args": vars(args),
                       "skipped": missing, "rows": rows,
                       "wall_s": time.perf_counter() - start}, f, indent=2)
    return 0


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for lib in ("torchvision", "transformers", "torch_pruning"):
        with contextlib.suppress(ImportError):
            out[lib] = __import__(lib).__version__
    return out


if __name__ == "__main__":
    sys.exit(main())
