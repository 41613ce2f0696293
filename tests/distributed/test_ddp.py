"""DNM under DistributedDataParallel: two processes on the CPU (gloo) (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import neuroexapt
import neuroexapt.distributed
from neuroexapt.core import DNMFramework
from neuroexapt.errors import ConfigError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


def test_every_rank_grows_the_same_architecture_with_the_same_weights(tmp_path: Path) -> None:
    from helpers import ddp_worker

    epochs = 3
    mp.spawn(ddp_worker.run, args=(2, str(tmp_path / "pg"), str(tmp_path), epochs), nprocs=2,
             join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == epochs
    grew = 0
    for a, b in zip(*ranks, strict=True):
        assert a["digest"] == b["digest"], a["epoch"]
        assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-6, abs=1e-6), a["epoch"]
        assert a["events"] == b["events"] and a["optimizer_complete"] and b["optimizer_complete"]
        if a["events"]:
            grew += 1
            assert a["stale_refused"] and a["wrapper_is_new"]
    assert grew > 0, "nothing grew: the test tests nothing"


def test_a_ddp_model_without_a_process_group_is_refused() -> None:
    class Fake(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module: torch.nn.Module) -> None:  # no process group needed
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(ConfigError, match="init_process_group"):
        DNMFramework(Fake(torch.nn.Linear(2, 2)))
    assert neuroexapt.distributed.rank() == 0 and not neuroexapt.distributed.is_distributed()


def test_the_torchrun_example_grows_and_saves_from_rank_0(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", str(root / "examples" / "dnm_ddp.py"), "--epochs", "2",
         "--save", str(tmp_path / "m.pt")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "epoch 2: 1 changes" in out.stdout and out.stdout.count("validation accuracy") == 2
    loaded, _ = neuroexapt.load(tmp_path / "m.pt", lambda: __import__(
        "neuroexapt.train.digits", fromlist=["DigitsCNN"]).DigitsCNN(width=4))
    assert sum(p.numel() for p in loaded.parameters()) > 4818


def test_the_trainer_prunes_the_same_units_on_every_rank(tmp_path: Path) -> None:
    from helpers import ddp_worker

    mp.spawn(ddp_worker.run_trainer, args=(2, str(tmp_path / "pg"), str(tmp_path), 12),
             nprocs=2, join=True)
    a, b = (json.loads((tmp_path / f"trainer{r}.json").read_text()) for r in range(2))
    assert sum(a["pruned"]) > 0, "nothing was pruned: the test tests nothing"
    assert a["parameters"] == b["parameters"] and a["pruned"] == b["pruned"]
    assert a["digest"] == b["digest"]
    assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-6, abs=1e-6)
    assert a["optimizer_complete"] and b["optimizer_complete"]


def test_two_processes_follow_one_process_at_the_same_global_batch(tmp_path: Path) -> None:
    """DDP averages the gradients of the two halves of each batch of 64. The CNN's BatchNorm
    normalises each rank's 32 samples instead of the 64, so until the first change the losses
    match one process's within 0.5%; the change is the same (parameters), and after it they
    stay within 5% (the statistics that choose which units to split are sampled from each
    rank's half of the recorded batches, so the chosen units may differ)."""
    from helpers import ddp_worker

    ddp_worker.trajectory(0, 1, "", str(tmp_path), 3)
    mp.spawn(ddp_worker.trajectory, args=(2, str(tmp_path / "pg"), str(tmp_path), 3),
             nprocs=2, join=True)
    one, two = (json.loads((tmp_path / f"trajectory{w}.json").read_text()) for w in (1, 2))
    assert one["params"] == two["params"] and one["params"][-1] > 4818  # it grew
    first_epoch = 8  # 512 samples in batches of 64; the first change follows epoch 1
    assert two["losses"][:first_epoch] == pytest.approx(one["losses"][:first_epoch], rel=5e-3)
    assert two["losses"] == pytest.approx(one["losses"], rel=0.05)
