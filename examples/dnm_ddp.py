"""DNM growing a model trained with DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node 2 examples/dnm_ddp.py                  # CPU (gloo)
    torchrun --nproc_per_node 4 examples/dnm_ddp.py --backend nccl   # one GPU per process

Every rank trains on its share of scikit-learn's digits; after each epoch DNM measures (the
statistics are all-reduced), rank 0 decides, every rank applies the same edits, and the
DistributedDataParallel wrapper is rebuilt around the grown module: the loop takes
``dnm.model`` at the start of every epoch. Rank 0 prints the events and saves the model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

import neuroexapt
from neuroexapt.core import DNMFramework
from neuroexapt.train.digits import DigitsCNN, load_digits


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--save", default="runs/dnm_ddp.pt")
    args = p.parse_args(argv)
    dist.init_process_group(args.backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR...
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                          if args.backend == "nccl" else "cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    x, y, x_val, y_val = (t.to(device) for t in load_digits(0))
    module = DigitsCNN(width=4).to(device)
    ids = [device.index] if device.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dnm = DNMFramework(model, {"morphogenesis_interval": 2, "trigger_on_bottleneck": True},
                       optimizer=optimizer)
    shard_x, shard_y = x[rank::world], y[rank::world]
    for epoch in range(1, args.epochs + 1):
        model = dnm.model  # a new wrapper after every change
        model.train()
        order = torch.randperm(len(shard_y), generator=torch.Generator().manual_seed(epoch))
        for idx in order.split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(shard_x[idx]), shard_y[idx]).backward()
            optimizer.step()
        dnm.update_caches()
        with torch.no_grad():
            acc = float((module(x_val).argmax(1) == y_val).float().mean())
        dnm.record_performance(acc)
        go, _ = dnm.should_trigger_morphogenesis(epoch)
        if go:
            result = dnm.execute_morphogenesis(epoch)
            if rank == 0:
                print(f"epoch {epoch}: {len(result['events'])} changes, parameters "
                      f"{result['parameters_before']} -> {result['parameters_after']}")
        if rank == 0:
            print(f"epoch {epoch}: validation accuracy {acc:.4f}")
    if rank == 0:
        os.makedirs(os.path.dirname(args.save) or ".", exist_ok=True)
        neuroexapt.save(module, args.save)  # rank 0 only: every rank holds the same model
    dnm.close()
    dist.barrier()  # every rank done before any closes its connections
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
