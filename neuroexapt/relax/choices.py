"""Choice modules: discrete architectural choices relaxed into differentiable ones.

Each choice holds its architecture parameters ``alpha`` (logits over its options), apart from
the weights. In training mode the options are mixed by weights drawn from ``alpha``:

* ``mode="softmax"``: ``softmax(alpha)``, every option runs (DARTS, Liu et al., ICLR 2019);
* ``mode="gumbel"``: a Gumbel-softmax sample at temperature ``tau``, every option runs
  (SNAS, Xie et al., ICLR 2019);
* ``mode="hard"``: a one-hot Gumbel sample with the soft sample's gradient (straight-through):
  only the sampled option runs, so a step costs one candidate (GDAS, Dong and Yang, CVPR 2019).

In evaluation mode every choice takes its most probable option (``argmax(alpha)``): that is
the model :func:`neuroexapt.relax.discretize` returns, with the choices removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroexapt.errors import ConfigError

__all__ = ["MODES", "Choice", "DepthChoice", "OpChoice", "WidthChoice"]

MODES = ("softmax", "gumbel", "hard")


class Choice(nn.Module):
    """Base class: ``alpha`` over ``options`` and how a forward pass mixes them."""

    def __init__(self, options: int, mode: str = "gumbel", tau: float = 1.0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"unknown relaxation mode {mode!r}; valid: {', '.join(MODES)}")
        if options < 1:
            raise ConfigError("a choice needs at least one option")
        self.alpha = nn.Parameter(torch.zeros(options))
        self.mode = mode
        self.tau = float(tau)
        # what each option costs ("parameters", "macs", "latency" in seconds), set by relax
        self.costs: dict[str, list[float]] = {}

    def expected_cost(self, by: str) -> torch.Tensor:
        """``sum_k p_k cost_k``: differentiable in ``alpha``."""
        if by not in self.costs:
            raise ConfigError(f"this choice has no '{by}' cost (known: "
                              f"{', '.join(self.costs) or 'none'}); relax measures them")
        cost = torch.tensor(self.costs[by], dtype=self.alpha.dtype, device=self.alpha.device)
        return self.probabilities() @ cost

    @property
    def index(self) -> int:
        """The most probable option."""
        return int(self.alpha.detach().argmax())

    def probabilities(self) -> torch.Tensor:
        """``softmax(alpha)``: the options' probabilities (differentiable)."""
        return self.alpha.softmax(0)

    def sample(self) -> torch.Tensor:
        """Mixing weights for one forward pass (one-hot on the argmax in eval mode)."""
        if not self.training:
            return F.one_hot(self.alpha.detach().argmax(), self.alpha.numel()).to(self.alpha)
        if self.mode == "softmax":
            return self.alpha.softmax(0)
        return F.gumbel_softmax(self.alpha, tau=self.tau, hard=self.mode == "hard")

    def extra_repr(self) -> str:
        probs = ", ".join(f"{p:.2f}" for p in self.probabilities().tolist())
        return f"mode={self.mode}, tau={self.tau:g}, p=[{probs}]"


def _mix(weights: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    out = weights[0] * outputs[0]
    for w, o in zip(weights[1:], outputs[1:], strict=True):
        out = out + w * o
    return out


def _active(weights: torch.Tensor) -> list[int]:
    """Options a pass must run: those with a non-zero weight (one under ``mode="hard"``)."""
    return [i for i, w in enumerate(weights.detach().tolist()) if w != 0.0]


class OpChoice(Choice):
    """A choice among candidate modules that map the same inputs to the same shapes."""

    def __init__(self, candidates: Sequence[nn.Module], mode: str = "gumbel",
                 tau: float = 1.0) -> None:
        super().__init__(len(candidates), mode, tau)
        self.candidates = nn.ModuleList(candidates)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights = self.sample()
        active = _active(weights)
        return _mix(weights[active], [self.candidates[i](*args, **kwargs) for i in active])


class DepthChoice(Choice):
    """A block or its shortcut: option 0 skips the block (identity), option 1 runs it."""

    def __init__(self, block: nn.Module, mode: str = "gumbel", tau: float = 1.0) -> None:
        super().__init__(2, mode, tau)
        self.block = block
        with torch.no_grad():
            self.alpha[1] = 1.0  # start with the block kept (p = 0.73)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.sample()
        active = _active(weights)
        outputs = [x if i == 0 else self.block(x) for i in active]
        return _mix(weights[active], outputs)


class WidthChoice(Choice):
    """How many units of a group stay: a mask over the first ``widths[k]`` units.

    The mask multiplies the weights that read the units (the group's ``"in"`` members), so a
    masked unit is exactly a removed one (FBNetV2, Wan et al., CVPR 2020, masks over shared
    weights). One sample serves a whole forward pass (:meth:`resample` runs before it).
    """

    masks: torch.Tensor

    def __init__(self, layer: str, size: int, widths: Sequence[int], mode: str = "gumbel",
                 tau: float = 1.0) -> None:
        super().__init__(len(widths), mode, tau)
        self.layer, self.size, self.widths = layer, int(size), [int(w) for w in widths]
        masks = torch.zeros(len(widths), size)
        for k, w in enumerate(self.widths):
            masks[k, :w] = 1.0
        self.register_buffer("masks", masks, persistent=False)
        with torch.no_grad():
            self.alpha[-1] = 1.0  # start nearer the full width
        self._weights: torch.Tensor | None = None

    def resample(self) -> None:
        """Forget the last sample: the next :meth:`mask` draws a new one."""
        self._weights = None

    def mask(self) -> torch.Tensor:
        """The expected (or sampled) mask over the group's units, ``[size]``."""
        if self._weights is None or not self.training:
            self._weights = self.sample()
        return self._weights.to(self.masks) @ self.masks

    def forward(self) -> torch.Tensor:
        return self.mask()


class InputMask(nn.Module):
    """Parametrization of a weight that reads a :class:`WidthChoice`'s units along ``dim``
    (entries ``offset .. offset + size * block``)."""

    def __init__(self, choice: WidthChoice, dim: int, offset: int, block: int) -> None:
        super().__init__()
        self.choice, self.dim, self.offset, self.block = choice, dim, offset, block

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.choice.mask().to(weight.dtype).repeat_interleave(self.block)
        full = torch.ones(weight.shape[self.dim], dtype=weight.dtype, device=weight.device)
        full = torch.cat([full[: self.offset], mask.to(weight.device),
                          full[self.offset + mask.numel():]])
        shape = [1] * weight.dim()
        shape[self.dim] = -1
        return weight * full.view(shape)
