"""A process of the two-process DDP tests: DNM growing a DistributedDataParallel model.

Each rank trains on its half of the digits, grows with DNMFramework every epoch, and writes
after every epoch its architecture digest, a checksum of its parameters and optimizer state,
and the events, to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neuroexapt.core import DNMFramework
from neuroexapt.distributed import architecture_digest
from neuroexapt.train.digits import DigitsCNN, load_digits


def _checksum(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    total = sum(float(p.detach().double().sum()) for p in model.parameters())
    for state in opt.state.values():
        total += sum(float(v.double().sum()) for v in state.values()
                     if isinstance(v, torch.Tensor))
    return total


def _in_group(body: Callable[..., None], rank: int, world: int, init_file: str,
              *args: Any) -> None:
    """Run ``body(rank, world, *args)`` inside a gloo process group of ``world`` processes.

    The teardown frees every wrapper before the group goes (a DDP wrapper in a reference cycle
    would otherwise be collected while the interpreter shuts down, with gloo's threads still
    holding its group) and waits for every rank, so that no rank closes its connections while
    another still talks to it.
    """
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
    done = False
    try:
        body(rank, world, *args)
        done = True
    finally:
        gc.collect()
        if world > 1:
            if done:
                dist.barrier()
            dist.destroy_process_group()


def run(rank: int, world: int, init_file: str, out: str, epochs: int) -> None:
    _in_group(_grow, rank, world, init_file, out, epochs)


def _grow(rank: int, world: int, out: str, epochs: int) -> None:
    torch.manual_seed(0)
    x, y, x_val, y_val = load_digits(0)
    module = DigitsCNN(width=4)
    model = torch.nn.parallel.DistributedDataParallel(module)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = [(x[-128:-64], y[-128:-64]), (x[-64:], y[-64:])]
    dnm = DNMFramework(model, {"morphogenesis_interval": 1, "trigger_on_bottleneck": True},
                       optimizer=opt, probe=probe)
    shard_x, shard_y = x[:512][rank::world], y[:512][rank::world]
    rows = []
    for epoch in range(1, epochs + 1):
        net = dnm.model
        net.train()
        order = torch.randperm(len(shard_y), generator=torch.Generator().manual_seed(epoch))
        for idx in order.split(32):
            opt.zero_grad()
            F.cross_entropy(net(shard_x[idx]), shard_y[idx]).backward()
            opt.step()
        dnm.update_caches()
        with torch.no_grad():  # each rank validates on its own share: ranks disagree
            acc = float((module(x_val[rank::world]).argmax(1) ==
                         y_val[rank::world]).float().mean())
        dnm.record_performance(acc)
        go, _ = dnm.should_trigger_morphogenesis(epoch)
        events = dnm.execute_morphogenesis(epoch)["events"] if go else []
        stale = False
        if events:
            try:
                net(shard_x[:2])
            except Exception:
                stale = True
        rows.append({"epoch": epoch, "digest": architecture_digest(module),
                     "checksum": _checksum(module, opt), "events": len(events),
                     "stale_refused": stale, "wrapper_is_new": dnm.model is not net,
                     "optimizer_complete": {id(p) for g in opt.param_groups
                                            for p in g["params"]}
                     == {id(p) for p in module.parameters()}})
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))


def run_trainer(rank: int, world: int, init_file: str, out: str, epochs: int) -> None:
    """The information-theoretic Trainer on a DDP model: every rank writes its history, the
    final architecture digest and checksum."""
    _in_group(_train, rank, world, init_file, out, epochs)


def _train(rank: int, world: int, out: str, epochs: int) -> None:
    import neuroexapt

    torch.manual_seed(0)
    x, y, x_val, y_val = load_digits(0)
    module = DigitsCNN(width=16)
    model = torch.nn.parallel.DistributedDataParallel(module)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    trainer = neuroexapt.Trainer(model=model, optimizer=opt, info_weight=0.3,
                                 entropy_threshold=0.5, progress=False)
    train = [(x[i : i + 64], y[i : i + 64])  # as many batches on every rank (as DDP needs)
             for i in range(rank * 64, 1280, 64 * world)]
    val = [(x_val[i : i + 128], y_val[i : i + 128])
           for i in range(rank * 128, len(y_val), 128 * world)]  # ranks disagree
    history = trainer.fit(train, val, epochs=epochs)
    Path(out, f"trainer{rank}.json").write_text(json.dumps({
        "parameters": history["parameters"], "pruned": history["pruned_units"],
        "digest": architecture_digest(module), "checksum": _checksum(module, opt),
        "optimizer_complete": {id(p) for g in opt.param_groups for p in g["params"]}
        == {id(p) for p in module.parameters()}}))


def trajectory(rank: int, world: int, init_file: str, out: str, epochs: int) -> None:
    """DNM with a probe on ``world`` processes (1: no DDP), each global batch of 64 split
    among the ranks: the per-step loss of the global batch and the parameter counts."""
    _in_group(_trajectory, rank, world, init_file, out, epochs)


def _trajectory(rank: int, world: int, out: str, epochs: int) -> None:
    torch.manual_seed(0)
    x, y, x_val, y_val = load_digits(0)
    module = DigitsCNN(width=4)
    model = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = [(x[-128:-64], y[-128:-64]), (x[-64:], y[-64:])]
    dnm = DNMFramework(model, {"morphogenesis_interval": 1, "trigger_on_bottleneck": True},
                       optimizer=opt, probe=probe)
    losses, params = [], []
    for epoch in range(1, epochs + 1):
        net = dnm.model
        net.train()
        order = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))
        for idx in order.split(64):
            mine = idx[rank::world]
            opt.zero_grad()
            loss = F.cross_entropy(net(x[mine]), y[mine])
            loss.backward()
            opt.step()
            total = loss.detach().clone()
            if world > 1:
                dist.all_reduce(total)
            losses.append(float(total) / world)
        dnm.update_caches()
        with torch.no_grad():
            acc = float((module(x_val).argmax(1) == y_val).float().mean())
        dnm.record_performance(acc)
        go, _ = dnm.should_trigger_morphogenesis(epoch)
        if go:
            dnm.execute_morphogenesis(epoch)
        params.append(sum(p.numel() for p in module.parameters()))
    if rank == 0:
        Path(out, f"trajectory{world}.json").write_text(json.dumps(
            {"losses": losses, "params": params}))
