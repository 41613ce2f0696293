"""Finding the optimizer that trains a model, from the optimizer's own steps.

PyTorch calls global step hooks (``torch.optim.optimizer.register_optimizer_step_post_hook``)
after every ``optimizer.step()`` of every optimizer. :class:`OptimizerWatch` installs one and
remembers each optimizer whose param groups hold a parameter of the watched model, so a
framework can migrate the user's optimizer without being handed it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from neuroexapt.errors import ConfigError

__all__ = ["OptimizerWatch"]


class OptimizerWatch:
    """Remembers the optimizers that step ``model``'s parameters (see the module docstring).

    The global hook holds the watch weakly and is removed by :meth:`close` or when the watch
    is garbage-collected.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self._found: list[weakref.ReferenceType[torch.optim.Optimizer]] = []
        # optimizers already looked at, with their parameter count then: a training step
        # re-checks only an optimizer whose param groups changed (add_param_group)
        self._checked: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = \
            weakref.WeakKeyDictionary()
        ref = weakref.ref(self)

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            watch = ref()
            if watch is not None:
                watch._saw(optimizer)

        self._handle = register_optimizer_step_post_hook(hook)
        self._finalizer = weakref.finalize(self, self._handle.remove)

    def _saw(self, optimizer: torch.optim.Optimizer) -> None:
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        if self._checked.get(optimizer) == count:
            return
        model = self._model()
        if model is None:
            return
        mine = {id(p) for p in model.parameters()}
        steps_mine = any(id(p) in mine for g in optimizer.param_groups for p in g["params"])
        if steps_mine and not any(r() is optimizer for r in self._found):
            self._found.append(weakref.ref(optimizer))
        self._checked[optimizer] = count

    @property
    def found(self) -> list[torch.optim.Optimizer]:
        """The optimizers seen stepping the model's parameters, oldest first."""
        return [o for o in (r() for r in self._found) if o is not None]

    def optimizer(self, what: str, fix: str = "pass DNMFramework(model, config, "
                  "optimizer=optimizer)") -> torch.optim.Optimizer:
        """The one optimizer that trains the model; :class:`ConfigError` for none or several.

        ``what`` names the caller and ``fix`` says how to hand the optimizer over instead.
        """
        found = self.found
        if len(found) == 1:
            return found[0]
        if not found:
            raise ConfigError(
                f"{what} needs the optimizer that trains the model, and none has stepped its "
                f"parameters yet: call it after optimizer.step(), or {fix}")
        names = ", ".join(type(o).__name__ for o in found)
        raise ConfigError(
            f"{what}: {len(found)} optimizers ({names}) step this model's parameters, so it "
            f"cannot tell which one to migrate; {fix} (the one to migrate)")

    def close(self) -> None:
        """Remove the global hook."""
        self._finalizer()
