"""benchmarks/new_units.py measures new vs old units' gradients on a tiny fake CIFAR-10."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from neuroexapt.policy.growth import GROWTH_INITS

RATIOS = ("fan_in_grad_ratio", "fan_out_grad_ratio", "fan_in_weight_ratio",
          "fan_out_weight_ratio")


def test_every_init_measured(bench: Callable[[str], ModuleType], cifar_dir: Path,
                             tmp_path: Path) -> None:
    module = bench("new_units")
    out = tmp_path / "n.json"
    code = module.main(["--data-dir", str(cifar_dir), "--subset", "320", "--val", "64",
                        "--pretrain-epochs", "1", "--epochs-after", "2", "--batch-size", "64",
                        "--bypass-batches", "2", "--threads", "1", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    arms = result["arms"]
    assert set(arms) == {"none", *GROWTH_INITS}
    assert arms["none"]["steps"] == []
    assert arms["none"]["params_after"] == arms["none"]["params_before"]
    steps_after = 2 * result["steps_per_epoch"]
    for init in GROWTH_INITS:
        arm = arms[init]
        assert arm["units"] == arm["old_units"]  # doubled
        assert arm["params_after"] > arm["params_before"]
        assert arm["all_params_in_optimizer"]
        assert arm["function_change"] < 1e-3  # grow_layer verifies the function
        assert len(arm["steps"]) == steps_after
        for rec in arm["steps"]:
            for key in RATIOS:
                assert math.isfinite(rec[key]), (init, rec["step"], key)
    for init in ("gradmax", "orthogonal"):
        first = arms[init]["steps"][0]
        # zero fan-out: no gradient reaches the new units' fan-in, but their fan-out gets one
        assert first["fan_in_grad_ratio"] == 0.0
        assert first["fan_in_grad_zero_units"] == 1.0
        assert first["fan_out_weight_ratio"] == 0.0
        assert first["fan_out_grad_ratio"] > 0.0
        assert abs(first["fan_in_weight_ratio"] - 1.0) < 1e-5  # the old units' mean norm
        assert arms[init]["steps"][1]["fan_in_grad_ratio"] > 0.0  # once the fan-out moved
    # split: the copies start as exact clones of their twins on the fan-in, but the opposite
    # noise on their fan-outs gives them different gradients, so training separates them
    # from the first step (before the first fan-in dose at the end of the epoch)
    split = arms["split"]["steps"]
    assert split[0]["twin_gap"] < 1e-6
    assert all(r["twin_gap"] > 0.0 for r in split[1:])
