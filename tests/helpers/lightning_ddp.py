"""Two CPU processes (Lightning's ``ddp``, gloo) growing a LightningModule with
DNMCallback; each rank writes, after every validation, its architecture digest and a checksum
of its parameters to ``<out>/lightning<rank>.json``. Run as a script: ``python
lightning_ddp.py OUT [STRATEGY]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F

from neuroexapt.distributed import architecture_digest
from neuroexapt.integrations.lightning import DNMCallback
from neuroexapt.train.digits import DigitsCNN, load_digits


class Digits(L.LightningModule):
    """A LightningModule around the digits CNN; ``optimizers > 1`` configures several (for the
    refusal test), else one SGD with a StepLR scheduler."""

    def __init__(self, optimizers: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = DigitsCNN(width=4)
        self.optimizers_count = optimizers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        opts = [torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
                for _ in range(self.optimizers_count)]
        if self.optimizers_count > 1:
            self.automatic_optimization = False
            return opts
        sched = torch.optim.lr_scheduler.StepLR(opts[0], step_size=1, gamma=0.9)
        return {"optimizer": opts[0], "lr_scheduler": sched}


class Record(L.Callback):
    """After DNMCallback (it comes later in the list): what each rank holds."""

    def __init__(self, out: str) -> None:
        self.out, self.rows = out, []

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        wrapper = trainer.strategy.model
        self.rows.append({
            "digest": architecture_digest(module),
            "checksum": sum(float(p.detach().double().sum()) for p in module.parameters()),
            "parameters": sum(p.numel() for p in module.parameters()),
            "wrapper_params": sorted(id(p) for p in wrapper.parameters()) ==
            sorted(id(p) for p in module.parameters())})
        Path(self.out, f"lightning{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def main(out: str, strategy: str = "ddp") -> None:
    x, y, xv, yv = load_digits(0)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:512], y[:512]),
                                        batch_size=32)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv[:128], yv[:128]),
                                      batch_size=64)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy=strategy,
                        callbacks=[DNMCallback({"morphogenesis_interval": 1,
                                                "trigger_on_bottleneck": True},
                                               monitor="val_acc", attr="net"), Record(out)],
                        enable_progress_bar=False, enable_model_summary=False, logger=False,
                        enable_checkpointing=False, num_sanity_val_steps=0,
                        default_root_dir=out)
    trainer.fit(Digits(), train, val)


if __name__ == "__main__":
    main(*sys.argv[1:3])
