"""DNM inside lightning.Trainer.fit: growth, optimizer and scheduler, checkpoints (issue 14)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import neuroexapt
from neuroexapt.errors import ConfigError
from neuroexapt.train.digits import DigitsCNN, load_digits

L = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
from helpers.lightning_ddp import Digits  # noqa: E402

from neuroexapt.integrations.lightning import DNMCallback  # noqa: E402

EAGER = {"morphogenesis_interval": 1, "trigger_on_bottleneck": True}


def _loaders() -> tuple[Any, Any]:
    x, y, xv, yv = load_digits(0)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:512], y[:512]),
                                        batch_size=64)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv[:128], yv[:128]),
                                      batch_size=128)
    return train, val


def _trainer(tmp_path: Path, epochs: int, callback: DNMCallback) -> Any:
    return L.Trainer(max_epochs=epochs, callbacks=[callback], default_root_dir=str(tmp_path),
                     enable_progress_bar=False, enable_model_summary=False, logger=False,
                     num_sanity_val_steps=0, accelerator="cpu", devices=1)


def test_the_callback_grows_the_module_and_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    train, val = _loaders()
    module = Digits()
    start = sum(p.numel() for p in module.parameters())
    trainer = _trainer(tmp_path, 3, DNMCallback(EAGER, monitor="val_acc", attr="net"))
    trainer.fit(module, train, val)
    grown = sum(p.numel() for p in module.parameters())
    assert grown > start and neuroexapt.get_history(module.net)
    opt = trainer.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in module.parameters()}
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] < 0.05  # the scheduler kept stepping
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert len(saved["neuroexapt"]["history"]) == len(neuroexapt.get_history(module.net))
    # a fresh module resumes: the history is replayed before the weights are loaded
    fresh = Digits()
    resumed = _trainer(tmp_path / "resume", 4, DNMCallback(EAGER, attr="net"))
    resumed.fit(fresh, train, val, ckpt_path=str(ckpt))
    assert sum(p.numel() for p in fresh.parameters()) >= grown

    def shape(records: list[Any]) -> list[tuple[str, str, int]]:
        return [(r.op, r.target, r.params_after) for r in records]

    n = len(saved["neuroexapt"]["history"])
    assert shape(neuroexapt.get_history(fresh.net)[:n]) == \
        shape(neuroexapt.get_history(module.net)[:n])
    assert "on_load_checkpoint" not in fresh.__dict__  # the callback's wrapper is gone


def test_a_metric_the_module_does_not_log_is_named(tmp_path: Path) -> None:
    train, val = _loaders()
    trainer = _trainer(tmp_path, 1, DNMCallback(EAGER, monitor="val_f1", attr="net"))
    with pytest.raises(ConfigError, match=r"val_f1.*val_acc"):
        trainer.fit(Digits(), train, val)


def test_bad_configuration_fails_when_the_callback_is_built() -> None:
    with pytest.raises(ConfigError, match="morphogenesis_intervall"):
        DNMCallback({"morphogenesis_intervall": 3})
    with pytest.raises(ConfigError, match="mode"):
        DNMCallback(EAGER, mode="up")


def test_several_optimizers_over_the_grown_model_are_refused(tmp_path: Path) -> None:
    train, val = _loaders()
    module = Digits(optimizers=2)
    trainer = _trainer(tmp_path, 1, DNMCallback(EAGER, attr="net"))
    with pytest.raises(ConfigError, match="exactly one optimizer"):
        trainer.fit(module, train, val)
    assert neuroexapt.get_history(module.net) == []


def test_two_processes_grow_alike_and_train_the_new_units_together(tmp_path: Path) -> None:
    """strategy='ddp' on two CPU processes (gloo): after every validation both ranks hold the
    same architecture and the same weights, and Lightning's DDP wrapper holds the grown
    module's parameters (a stale wrapper would leave the new units unsynchronised)."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "helpers" / "lightning_ddp.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"lightning{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    for a, b in zip(*ranks, strict=True):
        assert a["digest"] == b["digest"] and a["wrapper_params"] and b["wrapper_params"]
        assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-6, abs=1e-6)
    assert ranks[0][-1]["parameters"] > sum(p.numel() for p in DigitsCNN(width=4).parameters())
    spawned = subprocess.run([sys.executable, str(script), str(tmp_path), "ddp_spawn"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert spawned.returncode != 0 and "use strategy='ddp'" in spawned.stderr
