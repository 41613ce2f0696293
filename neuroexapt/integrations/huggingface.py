"""DNM growth inside ``transformers.Trainer``: a ``TrainerCallback`` (the ``hf`` extra).

    >>> trainer = transformers.Trainer(model=model, args=TrainingArguments(
    ...     ..., eval_strategy="epoch"), train_dataset=train, eval_dataset=val,
    ...     callbacks=[DNMTrainerCallback({"morphogenesis_interval": 2})])
    >>> trainer.train()

After every evaluation the callback measures the model (statistics recorded by its hooks on
the training batches), records the monitored metric (``eval_loss`` by default, lower is
better), and grows the model when the policy says so (see
:class:`neuroexapt.core.DNMFramework`). A ``transformers.Trainer`` builds its optimizer and
scheduler once and gives callbacks no way to replace them, so the callback migrates the
Trainer's optimizer **in place** (new parameters join their layer's parameter group, with
fresh state; removed ones leave it); the scheduler, which holds the same parameter groups,
keeps working. The model is traced on the first training batch's main input (the tensor
passed as the forward's first argument that the batch holds, such as ``input_ids`` or
``pixel_values``).

Not supported: several processes (refused: the Trainer's DDP wrapper cannot be rebuilt from
a callback); resuming a Trainer checkpoint of a grown model (``save_pretrained`` writes
the grown weights, but the model's ``config`` still describes the original sizes); save with
``neuroexapt.save(trainer.model, path)`` and rebuild with ``neuroexapt.load``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError
from neuroexapt.integrations.policy import GrowthStep

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError("neuroexapt.integrations.huggingface needs transformers: "
                      "pip install 'neuroexapt[hf]'") from e

logger = logging.getLogger(__name__)

__all__ = ["DNMTrainerCallback"]


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (the same parameter groups)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise ConfigError(f"DNMTrainerCallback needs a torch optimizer, got "
                          f"{type(optimizer).__name__}")
    return inner


def _main_input(model: nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
    """The tensor of ``batch`` that the model's forward takes first (two samples)."""
    if isinstance(batch, torch.Tensor):
        return (batch[:2],)
    if isinstance(batch, dict):
        for name in inspect.signature(model.forward).parameters:
            value = batch.get(name)
            if isinstance(value, torch.Tensor):
                return (value[:2],)
    raise ConfigError("DNMTrainerCallback cannot find the model's first input in the training "
                      "batch (a dict with input_ids, pixel_values or the forward's first "
                      "argument); pass DNMTrainerCallback(..., example_inputs=batch)")


class DNMTrainerCallback(TrainerCallback):
    """Grows the model of a ``transformers.Trainer`` with DNM after evaluations.

    Args:
        config: the DNM configuration (the first design document's keys).
        monitor: the evaluation metric the policy watches (``eval_loss``, or an
            ``eval_<name>`` that ``compute_metrics`` returns).
        mode: ``"min"`` (default, for a loss) or ``"max"``.
        **dnm_options: further :class:`~neuroexapt.core.DNMFramework` arguments
            (``example_inputs``, ``layers``, ``seed``, ``events_path``, ...).
    """

    def __init__(self, config: Any = None, *, monitor: str = "eval_loss", mode: str = "min",
                 **dnm_options: Any) -> None:
        self.growth = GrowthStep(config, monitor, mode, dnm_options)  # checks config and mode
        self.monitor = monitor
        self.results: list[dict[str, Any]] = []

    @property
    def dnm(self) -> Any:
        """The :class:`~neuroexapt.core.DNMFramework` while training runs."""
        return self.growth.dnm

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        if str(getattr(args, "eval_strategy", "no")).lower().endswith("no"):
            raise ConfigError("DNMTrainerCallback decides after evaluations: set "
                              "TrainingArguments(eval_strategy='epoch') (or 'steps') and an "
                              "eval_dataset")
        if int(getattr(args, "world_size", 1) or 1) > 1:
            raise ConfigError("DNMTrainerCallback runs on one process: transformers.Trainer "
                              "keeps its DistributedDataParallel wrapper out of the callbacks' "
                              "reach, so grown units would never be synchronised across the "
                              "processes. Train on one process, or use DNMFramework in your own "
                              "loop or the Lightning callback under DDP (docs/distributed.md)")
        assert model is not None
        extra: dict[str, Any] = {"optimizer": _torch_optimizer(optimizer)}
        if "example_inputs" not in self.growth.options and train_dataloader is not None:
            extra["example_inputs"] = _main_input(model, next(iter(train_dataloader)))
        self.growth.start(model, **extra)

    def on_evaluate(self, args: Any, state: Any, control: Any,
                    metrics: dict[str, float] | None = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if self.dnm is None or not metrics:
            return
        if self.monitor not in metrics:
            raise ConfigError(f"DNMTrainerCallback monitors '{self.monitor}', which the "
                              f"evaluation does not report; reported: {sorted(metrics)}")
        epoch = round(state.epoch or 0) or len(self.results) + 1
        result = self.growth.after_evaluation(epoch, float(metrics[self.monitor]),
                                              _torch_optimizer(optimizer))
        if result is not None:
            self.results.append(result)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.growth.close()
