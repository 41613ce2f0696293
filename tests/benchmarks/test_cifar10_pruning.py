"""benchmarks/cifar10_pruning.py runs end to end on a tiny fake CIFAR-10 with both methods."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

import neuroexapt


def test_both_methods_reach_equal_macs_on_both_models(
        bench: Callable[[str], ModuleType], cifar_dir: Path, tmp_path: Path) -> None:
    module = bench("cifar10_pruning")
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    code = module.main(["--data-dir", str(cifar_dir), "--subset", "256", "--epochs", "1",
                        "--finetune-epochs", "1", "--targets", "0.5", "--width", "8",
                        "--resnet-width", "8",
                        "--repeats", "3", "--threads", "1", "--score-batches", "1",
                        "--latency-arm", "--json", str(out), "--plot", str(png),
                        "--dense-cache", str(tmp_path / "dense")])
    assert code == 0 and png.stat().st_size > 0
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"wide_cnn", "resnet20"}
    for name, res in result["models"].items():
        dense = res["dense"]
        rows = {r["method"]: r for r in res["rows"]}
        assert set(rows) == {"neuroexapt", "neuroexapt-latency", "torch-pruning",
                             "torch-pruning-latency"}, name
        for method in ("neuroexapt-latency", "torch-pruning-latency"):
            fast = rows.pop(method)  # pruned to a measured latency, not to MACs
            assert fast["macs"] < dense["macs"] and fast["params"] < dense["params"]
            assert fast["prune_s"] > 0 and fast["speedup_b64"] > 0
        for method, row in rows.items():
            # pruned for real, to (about) the MAC target, measured
            assert row["macs"] <= 0.5 * dense["macs"] * 1.001, (name, method)
            assert row["macs"] >= 0.5 * dense["macs"] * 0.6, (name, method)  # 8 channels
            assert row["params"] < dense["params"]
            assert 0.0 <= row["acc"] <= 100.0
            assert row["b1_ms"] > 0 and row["b64_ms"] > 0 and row["speedup_b64"] > 0
    assert len(result["goals"]) == 6
    # the dense models were saved; a second run loads them instead of training
    assert len(list((tmp_path / "dense").glob("*.pt"))) == 2
    again = module.main(["--data-dir", str(cifar_dir), "--subset", "256", "--epochs", "1",
                         "--finetune-epochs", "1", "--targets", "0.5", "--width", "8",
                         "--models", "wide_cnn", "--repeats", "3", "--threads", "1",
                         "--score-batches", "1", "--json", str(out),
                         "--dense-cache", str(tmp_path / "dense")])
    assert again == 0
    reloaded = json.loads(out.read_text())["models"]["wide_cnn"]["dense"]
    assert reloaded["acc"] == result["models"]["wide_cnn"]["dense"]["acc"]


def test_torch_pruning_bisection_hits_the_macs(bench: Callable[[str], ModuleType]) -> None:
    module = bench("cifar10_pruning")
    torch.manual_seed(0)
    dense = module.wide_cnn(8)
    x = torch.randn(1, 3, 32, 32)
    macs = neuroexapt.count_macs(dense, x)
    pruned, ratio = module.prune_torch_pruning(dense, 0.7 * macs, x)
    got = neuroexapt.count_macs(pruned, x)
    assert 0.6 * macs <= got <= 0.7 * macs and 0 < ratio < 1
    assert neuroexapt.count_macs(dense, x) == macs  # the dense model is untouched
