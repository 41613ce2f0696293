"""Variational information bottleneck with multiplicative Gaussian gates per unit.

After Dai, Zhu, Guo and Wipf, "Compressing Neural Networks using the Variational Information
Bottleneck" (ICML 2018). Each unit ``i`` of a named layer's output ``h`` is gated:

    training:  z_i = h_i * (mu_i + sigma_i * eps_i),   eps_i ~ N(0, 1)
    eval:      z_i = h_i * mu_i

``eps`` is drawn per sample and unit and shared over the other dims (the spatial positions of
a channel of a Conv output, whose units are dim 1; the middle dims of a Linear output, whose
units are the last dim). A gate on an affine BatchNorm draws one ``eps`` per unit and batch
instead and is folded into the BatchNorm's scale and shift for the duration of its forward
(``weight * g``, ``bias * g``), so it costs no pass over the activations: the gated output is
the same function of ``g``, each sample's gate has the same N(mu, sigma^2) distribution and
the expected loss is the same; only samples of one batch share their draw. The regulariser, in
nats, is

    R = info_weight * sum_layers sum_units 0.5 * log(1 + mu_i**2 / sigma_i**2)

with ``sigma_i**2 = exp(log_sigma2_i)``. Each term is the capacity of a Gaussian channel with
signal-to-noise ratio ``mu_i**2 / sigma_i**2``, and the paper's variational upper bound on the
information a unit's gate passes (its KL term with the prior variance optimised out; the paper
drops the factor 0.5 into its weight gamma, we keep it so that terms read in nats). Not scaled by
the spatial size: one gate and one noise draw per channel, so a unit costs the same in a Linear
and a Conv layer; ``info_weight`` prices a nat against one unit of the task loss.

Initialisation: ``mu = 1`` and ``log_sigma2 = -9`` (the paper's), so the eval-mode function is
exactly the model's and the training-mode output is perturbed by ``sigma = exp(-4.5) = 0.011``
of each unit's value; each unit then starts at 4.5 nats.

Pruning: ``0.5 * log(1 + 1 / alpha) < t`` with ``alpha = sigma**2 / mu**2`` is the paper's
criterion ``log alpha > -log(exp(2 t) - 1)``: the default ``t = 0.01`` means ``log alpha > 3.9``
(the paper's ``log alpha > 3`` is ``t = 0.024``). Such units are removed with
:func:`neuroexapt.narrow` after :meth:`InformationBottleneck.absorb`, never masked.

Example:
    >>> ib = InformationBottleneck(model, ["fc1"], info_weight=0.1)
    >>> opt = torch.optim.Adam([*model.parameters(), *ib.parameters()], lr=1e-2)
    >>> loss = F.cross_entropy(model(x), y) + ib.regularizer()
    >>> ib.absorb()                       # fold mu into fc1, remove the hooks
    >>> narrow(model, "fc1", remove=ib.prunable()["fc1"], example_inputs=x)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from neuroexapt.errors import ConfigError, UnsupportedModuleError
from neuroexapt.graph import resolve_layer

__all__ = ["InformationBottleneck"]

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED = (nn.Linear, *_CONVS, _BatchNorm)


def _unit_count(name: str, module: nn.Module) -> int:
    """Units of ``module``'s output; raises for modules whose gate cannot be folded."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _CONVS):
        return module.out_channels
    if isinstance(module, _BatchNorm) and module.affine:
        return module.num_features
    why = "has affine=False, no weight to fold the gate into" if isinstance(
        module, _BatchNorm) else "is not supported"
    raise UnsupportedModuleError(
        f"layer '{name}' ({type(module).__name__}) {why}; gates attach to "
        f"{', '.join(t.__name__ for t in SUPPORTED)} (affine) outputs"
    )


def _unit_dim(module: nn.Module, ndim: int) -> int:
    """The output dim that holds the units (batched or not)."""
    if isinstance(module, nn.Linear):
        return ndim - 1
    if isinstance(module, _CONVS):
        return ndim - len(module.kernel_size) - 1
    return 1


_SAVED = "_neuroexapt_gate_saved"  # a gated BatchNorm's own weight and bias during its forward


def _fold_out(module: nn.Module, args: Any, output: Any) -> None:
    """After a gated BatchNorm's forward (also when it raised): its own weight and bias back."""
    saved = module.__dict__.pop(_SAVED, None)
    if saved is not None:
        module._parameters["weight"], module._parameters["bias"] = saved


def _key(name: str) -> str:
    """A ParameterDict key for a module name ('.' is not allowed in parameter names)."""
    return name.replace(".", "/") or "<model>"


class InformationBottleneck(nn.Module):
    """Gaussian gates on the outputs of named layers and their information regulariser.

    The model's class and forward are untouched: the gates are forward hooks, removed by
    :meth:`remove`, on leaving a ``with`` block, or by :meth:`absorb`, which first folds
    ``mu`` into the layers. The gate parameters live here (``self.mu`` and
    ``self.log_sigma2``, ParameterDicts keyed by layer name with '.' written '/', ``'<model>'``
    for the model itself), on each layer's device and dtype; pass
    :meth:`parameters` to the optimizer with the model's, and move both with ``.to``.

    Args:
        model: The model to gate.
        layers: Names of Linear, Conv1d/2d/3d or affine BatchNorm modules of ``model``.
        info_weight: Price of one nat of gated information, >= 0.
        init_log_sigma2: Initial ``log sigma**2`` of every gate (see the module docstring).

    Raises:
        LayerNotFoundError: A name is not a module of ``model``.
        UnsupportedModuleError: A named module is of another type.
        ConfigError: No layers, a layer named twice, or a bad weight.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], info_weight: float = 0.1,
                 init_log_sigma2: float = -9.0) -> None:
        super().__init__()
        for what, value, low in (("info_weight", info_weight, 0.0),
                                 ("init_log_sigma2", init_log_sigma2, -math.inf)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value >= low):
                raise ConfigError(f"{what} must be a finite number"
                                  f"{' >= 0' if low == 0 else ''}, got {value!r}")
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ConfigError(f"layers must be a non-empty list of layer names, got {layers!r}")
        names = [resolve_layer(model, n) for n in layers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"layers names {twice} more than once; give each layer once")
        self.info_weight = float(info_weight)
        self.layers = tuple(names)
        self.mu = nn.ParameterDict()
        self.log_sigma2 = nn.ParameterDict()
        self._targets = {n: model.get_submodule(n) for n in names}
        for name, module in self._targets.items():
            units = _unit_count(name, module)
            like = dict(device=module.weight.device, dtype=module.weight.dtype)
            self.mu[_key(name)] = nn.Parameter(torch.ones(units, **like))
            self.log_sigma2[_key(name)] = nn.Parameter(torch.full((units,), init_log_sigma2,
                                                                  **like))
        self._handles: list[Any] = []
        for n, m in self._targets.items():
            if isinstance(m, _BatchNorm):  # folded into its scale and shift: no extra pass
                self._handles += [m.register_forward_pre_hook(partial(self._fold_in, n)),
                                  m.register_forward_hook(_fold_out, always_call=True)]
            else:
                self._handles.append(m.register_forward_hook(partial(self._gate, n)))
        self._absorbed = False
        self._deterministic = False

    def _gate(self, name: str, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        mu, log_sigma2 = self.mu[_key(name)], self.log_sigma2[_key(name)]
        dim = _unit_dim(module, output.ndim)
        if output.shape[dim] != mu.numel():
            raise ConfigError(
                f"layer '{name}' outputs {output.shape[dim]} units but its gate has "
                f"{mu.numel()}: the layer was resized after the gates were made; absorb() "
                "before resizing and make a new InformationBottleneck"
            )
        view = [-1 if d == dim else 1 for d in range(output.ndim)]
        if not module.training or self._deterministic:
            return output * mu.view(view)
        noise = [s if d in (0, dim) else 1 for d, s in enumerate(output.shape)]
        eps = torch.randn(noise, device=output.device, dtype=output.dtype)
        sigma = torch.exp(0.5 * log_sigma2)
        return output * (mu.view(view) + sigma.view(view) * eps)

    def _fold_in(self, name: str, module: nn.Module, args: Any) -> None:
        """Before a gated BatchNorm's forward: its weight and bias times the gate ``g``."""
        mu, log_sigma2 = self.mu[_key(name)], self.log_sigma2[_key(name)]
        if module.num_features != mu.numel():
            raise ConfigError(
                f"layer '{name}' has {module.num_features} units but its gate has "
                f"{mu.numel()}: the layer was resized after the gates were made; absorb() "
                "before resizing and make a new InformationBottleneck")
        gate = mu
        if module.training and not self._deterministic:
            eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype)
            gate = mu + torch.exp(0.5 * log_sigma2) * eps
        params = module._parameters
        weight, bias = params["weight"], params["bias"]
        module.__dict__[_SAVED] = (weight, bias)
        params["weight"] = weight * gate  # type: ignore[assignment,operator]
        params["bias"] = bias * gate if bias is not None else None  # type: ignore[assignment]

    def _information(self, name: str) -> Tensor:
        mu, log_sigma2 = self.mu[_key(name)], self.log_sigma2[_key(name)]
        return 0.5 * torch.log1p(mu.square() * torch.exp(-log_sigma2))

    def regularizer(self) -> Tensor:
        """``info_weight * sum_layers sum_units 0.5 * log(1 + mu**2 / sigma**2)`` (a tensor)."""
        total = sum(self._information(n).sum() for n in self.layers)
        return self.info_weight * total

    def unit_information(self) -> dict[str, Tensor]:
        """Per-unit ``0.5 * log(1 + mu**2 / sigma**2)`` of each layer, in nats (detached)."""
        return {n: self._information(n).detach() for n in self.layers}

    def prunable(self, threshold: float = 0.01) -> dict[str, list[int]]:
        """Units whose gate passes less than ``threshold`` nats, per layer.

        ``threshold = t`` is the paper's ``log alpha > -log(exp(2 t) - 1)``, ``3.9`` at 0.01.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not (
                math.isfinite(threshold) and threshold > 0):
            raise ConfigError(f"threshold must be a finite number > 0 (nats), got {threshold!r}")
        return {n: torch.nonzero(info < threshold).flatten().tolist()
                for n, info in self.unit_information().items()}

    @torch.no_grad()
    def absorb(self) -> None:
        """Fold ``mu`` into each layer and remove the hooks.

        The model alone then computes what the gated model computes in eval mode: Linear and
        Conv output rows (weight and bias) and BatchNorm's weight and bias are scaled by ``mu``.
        """
        if self._absorbed:
            raise ConfigError("the gates were already absorbed; folding mu twice would "
                              "scale the layers again")
        self.fold_into(None)
        self._absorbed = True
        self.remove()
        logger.debug("absorbed gates of %s", ", ".join(self.layers))

    @torch.no_grad()
    def fold_into(self, model: nn.Module | None) -> None:
        """Scale each gated layer's output rows (weight and bias) by ``mu``.

        ``model=None`` folds into the gated model itself (as :meth:`absorb` does, which also
        removes the hooks); a copy of the gated model (``copy.deepcopy``) is folded by name,
        leaving the gated model and its gates as they are.
        """
        for name, module in self._targets.items():
            target = module if model is None else model.get_submodule(name)
            mu = self.mu[_key(name)]
            weight: Tensor = target.weight
            weight.mul_(mu.view(-1, *[1] * (weight.ndim - 1)))
            if target.bias is not None:
                target.bias.mul_(mu)

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """Inside the block the gates pass ``h * mu`` even in training mode (no noise).

        For re-estimating BatchNorm statistics as the eval-mode model will see them.
        """
        previous, self._deterministic = self._deterministic, True
        try:
            yield
        finally:
            self._deterministic = previous

    def remove(self) -> None:
        """Remove the hooks; the model runs ungated (without ``mu``) from now on."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def strip(self, model: nn.Module) -> None:
        """Remove these gates' hooks from a copy of the gated model (``copy.deepcopy`` copies
        the hooks, which would gate the copy with these gates)."""
        ids = {h.id for h in self._handles}
        for name in self._targets:
            module = model.get_submodule(name)
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in ids & set(hooks):
                    del hooks[key]
            for key in ids & set(module._forward_hooks_always_called):
                del module._forward_hooks_always_called[key]

    def __enter__(self) -> InformationBottleneck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"layers={list(self.layers)}, info_weight={self.info_weight}"
