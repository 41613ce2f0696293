"""DNM growth inside ``lightning.Trainer.fit``: a callback (the ``lightning`` extra).

    >>> trainer = lightning.Trainer(callbacks=[DNMCallback({"morphogenesis_interval": 3},
    ...                                                     monitor="val_acc")])
    >>> trainer.fit(module, train_loader, val_loader)

At the end of every validation the callback measures the model (statistics recorded by its
hooks on the training batches), records the monitored metric, and grows the model when the
policy says so (see :class:`neuroexapt.core.DNMFramework`). The edits happen in place on the
LightningModule (or its ``attr`` submodule), and the optimizer Lightning built in
``configure_optimizers`` is migrated in place: its learning-rate schedulers keep working. The
events are logged through the trainer's logger (``dnm/parameters``, ``dnm/changes``).

Checkpoints: the edit history and the policy's state go into every Lightning checkpoint
(``checkpoint["neuroexapt"]``, plain data). Resuming with ``trainer.fit(..., ckpt_path=...)``
replays the history on the freshly built module when Lightning hands the module the checkpoint
(``on_load_checkpoint``, which the callback extends during ``fit``: Lightning loads the weights
and the optimizer state right after), so the checkpoint's tensors fit, and restores the
policy's state.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from neuroexapt.errors import ConfigError
from neuroexapt.integrations.policy import GrowthStep

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError("neuroexapt.integrations.lightning needs Lightning: "
                      "pip install 'neuroexapt[lightning]'") from e

logger = logging.getLogger(__name__)

__all__ = ["DNMCallback"]

_KEY = "neuroexapt"


class DNMCallback(Callback):
    """Grows the LightningModule's model with DNM at validation ends.

    Args:
        config: the DNM configuration (the first design document's keys).
        monitor: the logged validation metric the policy watches (higher is better, or
            ``mode="min"``).
        mode: ``"max"`` or ``"min"``.
        attr: the attribute of the LightningModule holding the model to grow (default: the
            LightningModule itself).
        **dnm_options: further :class:`~neuroexapt.core.DNMFramework` arguments (``probe``,
            ``task_type``, ``loss_fn``, ``layers``, ``seed``, ``events_path``).
    """

    def __init__(self, config: Any = None, *, monitor: str = "val_acc", mode: str = "max",
                 attr: str | None = None, **dnm_options: Any) -> None:
        self.growth = GrowthStep(config, monitor, mode, dnm_options)  # checks config and mode
        self.monitor, self.attr = monitor, attr
        self._restore: tuple[LightningModule, Any] | None = None

    @property
    def dnm(self) -> Any:
        """The :class:`~neuroexapt.core.DNMFramework` while ``fit`` runs."""
        return self.growth.dnm

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = self._model(pl_module)
        # resuming: Lightning calls the module's on_load_checkpoint just before it loads the
        # weights (callbacks hear of the checkpoint only afterwards), so the history is
        # replayed from there; the module's own hook still runs
        own = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self._replay(model, checkpoint)
            own(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        self._restore = (pl_module, own)
        self.growth.start(model)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.dnm is None or \
                trainer.state.fn != TrainerFn.FITTING:  # not in trainer.validate()
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ConfigError(f"DNMCallback monitors '{self.monitor}', which the module does not "
                              f"log; logged: {sorted(trainer.callback_metrics)}. Log it with "
                              f"self.log('{self.monitor}', ...) in validation_step")
        params = [id(p) for p in pl_module.parameters()]
        result = self.growth.after_evaluation(trainer.current_epoch + 1, float(value),
                                              self._optimizer(trainer))
        if [id(p) for p in pl_module.parameters()] != params:  # a change, or a rollback
            self._rewrap(trainer)
        if result is None:
            return
        for lg in trainer.loggers:
            lg.log_metrics({"dnm/parameters": float(result["parameters_after"]),
                            "dnm/changes": float(len(result["events"]))},
                           step=trainer.global_step)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        from neuroexapt.ops.history import get_history

        model = self._model(pl_module)
        checkpoint[_KEY] = {
            "history": [r.to_dict() for r in get_history(model)],
            "policy": self.dnm.state_dict() if self.dnm is not None else None,
        }

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._restore is not None:
            module = self._restore[0]
            module.__dict__.pop("on_load_checkpoint", None)  # back to the class's method
            self._restore = None
        self.growth.close()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        if trainer.world_size <= 1:
            return
        if not isinstance(trainer.strategy, DDPStrategy):
            raise ConfigError(f"DNMCallback under several processes needs strategy='ddp', got "
                              f"{type(trainer.strategy).__name__}: its wrapper is rebuilt "
                              "around the grown module")
        if getattr(trainer.strategy, "_start_method", "popen") != "popen":
            raise ConfigError("DNMCallback cannot grow under strategy='ddp_spawn' (or 'ddp_fork'): "
                              "Lightning loads the workers' weights into the main process's "
                              "module, which did not grow; use strategy='ddp' (it launches the "
                              "other processes itself, or run under torchrun)")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _rewrap(trainer: Trainer) -> None:
        """Under DDP: a new wrapper around the edited module (DDP's gradient buckets only know
        the parameters it was built with; :func:`neuroexapt.distributed.rewrap`)."""
        from neuroexapt.distributed import DDP, rewrap

        wrapper = trainer.strategy.model
        if isinstance(wrapper, DDP):
            trainer.strategy.model = rewrap(wrapper, wrapper.module)
            register = getattr(trainer.strategy, "_register_ddp_hooks", None)
            if register is not None:  # the strategy's communication hook, if it has one
                register()

    def _model(self, pl_module: LightningModule) -> nn.Module:
        model = getattr(pl_module, self.attr, None) if self.attr else pl_module
        if not isinstance(model, nn.Module):
            raise ConfigError(f"DNMCallback(attr={self.attr!r}): the LightningModule has no "
                              "such submodule")
        return model

    @staticmethod
    def _optimizer(trainer: Trainer) -> torch.optim.Optimizer:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ConfigError(f"DNMCallback needs exactly one optimizer over the grown model; "
                              f"configure_optimizers returned {len(optimizers)}. Return one "
                              "optimizer (with parameter groups if needed)")
        return optimizers[0]

    def _replay(self, model: nn.Module, checkpoint: dict[str, Any]) -> None:
        from neuroexapt.ops.checkpoint import replay
        from neuroexapt.ops.history import EditRecord, get_history

        saved = checkpoint.get(_KEY)
        if not saved:
            return
        records = [EditRecord.from_dict(r) for r in saved["history"]]
        done = len(get_history(model))
        if done > len(records):
            raise ConfigError(f"the model has {done} edits but the checkpoint only "
                              f"{len(records)}: build a fresh module to resume from it")
        replay(model, records[done:])
        if saved.get("policy") is not None and self.dnm is not None:
            self.dnm.load_state_dict(saved["policy"])
