"""benchmarks/cifar10_growth.py runs end to end on a tiny fake CIFAR-10 and reports every arm.

The fake archives (``cifar_dir`` of ``tests/benchmarks/conftest.py``: 320 training and 100 test
random images) follow the layout that ``benchmarks/data.py`` reads. The numbers are meaningless;
the test checks that each arm's fields are there and were measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch


def test_smoke_profile_reports_the_measured_arms(
        bench: Callable[[str], ModuleType], cifar_dir: Path, tmp_path: Path) -> None:
    growth = bench("cifar10_growth")
    out, png = tmp_path / "growth.json", tmp_path / "growth.png"
    code = growth.main(["--data-dir", str(cifar_dir), "--profile", "smoke", "--width", "4",
                        "--large-width", "8", "--json", str(out), "--plot", str(png),
                        "--arms", "small,large,dnm,uniform", "--uniform-epoch", "1"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["partial"] is False
    assert set(result["runs"]) == {"small", "large", "dnm", "uniform"}
    for name, runs in result["runs"].items():
        assert len(runs) == 1  # the smoke profile: one seed
        run = runs[0]
        assert 0.0 <= run["test_acc"] <= 100.0
        assert run["params"] > 0 and run["train_macs"] > 0 and run["wall_s"] > 0
        assert len(run["history"]) == 2  # two epochs
        for h in run["history"]:
            assert h["train_s"] > 0 and h["forward_macs"] > 0 and 0 <= h["val_acc"] <= 100
            assert h["all_params_in_optimizer"]
        # training MACs = forward MACs of the model of each epoch x training images
        assert run["train_macs"] == sum(h["forward_macs"] for h in run["history"]) * (256 - 64)
        stats = result["summary"][name]["test_acc"]
        assert stats["mean"] == stats["min"] == stats["max"] == run["test_acc"]
        assert stats["std"] is None  # one seed: no spread
    small, large = result["runs"]["small"][0], result["runs"]["large"][0]
    assert small["widths"] == [4, 4, 8, 8, 16, 16] and large["widths"] == [8, 8, 16, 16, 32, 32]
    assert large["params"] > small["params"]
    # the smoke run grows (seeded): the new parameters are in the optimizer (checked above)
    dnm = result["runs"]["dnm"][0]
    assert dnm["events"] and dnm["params"] > small["params"]
    assert dnm["events"][0]["params_after"] > dnm["events"][0]["params_before"]
    # the same cosine schedule in every arm, edits or not
    lrs = {name: [h["lr"] for h in runs[0]["history"]] for name, runs in result["runs"].items()}
    assert lrs["small"] == lrs["large"] == lrs["dnm"] == lrs["uniform"]
    # the uniform ablation is the large architecture after its epoch
    uniform = result["runs"]["uniform"][0]
    assert uniform["widths"] == large["widths"] and uniform["params"] == large["params"]
    assert [g["goal"] for g in result["goals"]][-1] == "dnm > uniform"
    assert all(g["met"] in (True, False) for g in result["goals"]) and len(result["goals"]) == 5
    assert result["full_profile_estimate_s"]["all"] > 0
    assert png.stat().st_size > 0


def test_cnn_widths_and_parameters(bench: Callable[[str], ModuleType]) -> None:
    growth = bench("cifar10_growth")
    model = growth.cnn(4)
    assert growth.conv_widths(model) == [4, 4, 8, 8, 16, 16]
    convs = [(3, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]
    expected = sum(9 * i * o + 2 * o for i, o in convs) + 16 * 10 + 10  # conv, BN, linear
    assert growth.params(model) == expected
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
