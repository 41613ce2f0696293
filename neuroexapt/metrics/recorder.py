"""Statistics from the training batches themselves: sampled hooks that stay on while a model trains.

:class:`TrainingRecorder` is what lets ``DNMFramework(model, config)`` measure a model without
a probe and without extra forward passes. Every ``every``-th forward pass in training mode with
gradients enabled is recorded; nothing else (evaluation passes, ``torch.no_grad()``) is
touched. For a recorded pass it folds into bounded accumulators:

* per layer, the :class:`~neuroexapt.metrics.collector.LayerStats` the analysis engine reads
  (activation and gradient moments, dead fractions, a reservoir of pooled activations);
* the labels of the batch, recovered from the gradient of the loss with respect to the model's
  output when the loss is a softmax cross-entropy: that gradient is ``softmax - target`` (times
  the reduction's scale), whose rows sum to zero and whose most negative entry is the label.
  When the rows do not sum to zero (another loss) no labels are inferred and the
  label-dependent metrics are left out (``labels_inferred`` says which);
* per growable layer, the *bypass gradient* ``M = sum_n sum_p g_c(n, :, p) a(n, :, p)^T``:
  the gradient of the loss with respect to a direct linear connection from the layer's input
  patches ``a`` (unfolded with the layer's own kernel, stride and padding, pooled to the
  consumer's resolution) to the output of the layer ``c`` that reads its units. Its singular
  values bound the loss decrease that new units can buy (GradMax, Evci et al., 2022), and its
  right singular vectors are the fan-in that buys it (:mod:`neuroexapt.policy.growth`). For a
  conv producer and consumer it is a convolution's weight gradient, computed by PyTorch's
  convolution backward, in float32 (float64 for float64 models), summed in float64.

Memory is bounded independently of the run's length: ``12 D`` float64 and a reservoir per layer,
one ``[outputs of c, inputs of l * k * k]`` float64 matrix per growable layer, and one batch of
detached references between a recorded forward and its backward.

Hooks are callables that become inert copies under ``copy.deepcopy`` and pickling, so
snapshots, ``torch.save(model)`` and rollbacks never carry a recorder along; :meth:`close`
removes every hook the recorder installed. ``seconds`` is the wall time spent inside the
hooks so far (measured around each call), the recorder's whole share of a training loop.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from neuroexapt.errors import CheckpointError, ConfigError, NeuroExaptError
from neuroexapt.metrics.collector import (
    CHANNELS_FIRST,
    LayerSpec,
    LayerStats,
    _first_tensor,
    _select_layers,
    _units_view,
    sample_positions,
)
from neuroexapt.metrics.state import from_plain, to_plain

logger = logging.getLogger(__name__)

__all__ = ["BypassGradient", "TrainingRecorder", "infer_labels"]


def infer_labels(grad: torch.Tensor) -> torch.Tensor | None:
    """Labels [N] from the gradient of a softmax cross-entropy w.r.t. logits [N, K], or None.

    The gradient is ``scale * (softmax(z) - t)`` with ``t`` a distribution, so each row sums
    to zero; the label is the most negative entry. Any other loss leaves rows that do not sum
    to zero, and None is returned.
    """
    if grad.ndim != 2 or grad.shape[1] < 2 or not grad.is_floating_point():
        return None
    g = grad.detach().double()
    mass = g.abs().sum(1)
    top = float(mass.max())
    if not top > 0 or not math.isfinite(top):
        return None
    # rows of a confident prediction are ~0: judge every row against the batch's largest
    if not bool((g.sum(1).abs() <= 1e-3 * top).all()):
        return None
    if float((g.min(1).values < 0).double().mean()) < 0.5:
        return None
    return g.argmin(1)


@dataclass
class BypassGradient:
    """The accumulated bypass gradient of one growable layer (see the module docstring).

    Attributes:
        layer: the layer whose units would grow.
        consumers: the layers reading those units, whose output gradients form the rows.
        kernel: the layer's kernel size (1 for Linear), so a fan-in row reshapes to it.
        matrix: ``sum over recorded batches`` of M, float64 ``[sum of consumer outputs,
            in_features * prod(kernel)]``; None before the first recorded backward.
        batches: recorded batches folded in.
    """

    layer: str
    consumers: tuple[str, ...]
    kernel: tuple[int, ...]
    matrix: torch.Tensor | None = None
    batches: int = 0
    _blocks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def mean(self) -> torch.Tensor:
        """The mean bypass gradient over the recorded batches."""
        if self.matrix is None or not self.batches:
            raise NeuroExaptError(f"no bypass gradient recorded for '{self.layer}' yet")
        return self.matrix / self.batches


_NOT_INPUTS = {"labels", "label", "return_loss"}


def _positional(module: nn.Module, kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The tensors of ``kwargs`` that fill the forward's first parameters in order (up to the
    first one missing, and never the labels): a call ``model(**batch)`` replayed as
    ``model(*inputs)``."""
    out = []
    for name in _forward_names(module.forward):
        value = kwargs.get(name)
        if name in _NOT_INPUTS or not isinstance(value, torch.Tensor):
            break
        out.append(value)
    return tuple(out)


_FORWARD_NAMES: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _forward_names(forward: Any) -> tuple[str, ...]:
    """A forward's parameter names, read once per function for bound methods (the hot path:
    every ``model(**batch)`` call)."""
    func = getattr(forward, "__func__", None)
    if func is None:
        return tuple(inspect.signature(forward).parameters)
    names = _FORWARD_NAMES.get(func)
    if names is None:
        names = _FORWARD_NAMES[func] = tuple(inspect.signature(forward).parameters)
    return names


class _Hook:
    """A hook that forwards to a recorder; copies and unpickled copies are inert."""

    def __init__(self, owner: TrainingRecorder | None, method: str, *bound: Any) -> None:
        self.owner, self.method, self.bound = owner, method, bound

    def __call__(self, *args: Any) -> Any:
        owner = self.owner
        if owner is None or owner.error is not None:
            return None
        start = time.perf_counter()
        try:
            getattr(owner, self.method)(*self.bound, *args)
        except Exception as e:  # never break the user's training step: report it later
            owner.error = f"{type(e).__name__}: {e}"
            logger.warning("statistics recording stopped: %s", owner.error, exc_info=True)
        owner.seconds += time.perf_counter() - start
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> _Hook:
        return _Hook(None, "")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_Hook, (None, ""))


class TrainingRecorder:
    """Records sampled statistics from a model's own training steps (see the module docstring).

    Args:
        model: the model; hooks are installed at construction (or by :meth:`attach`).
        layers: layers to record (names or types); default every Conv and Linear.
        every: record every ``every``-th training forward pass.
        max_positions: positions sampled per sample for the per-unit moments.
        reservoir: pooled samples kept per layer for the information estimators.
        max_samples: samples of a recorded batch used for the bypass gradients.
        seed: seed of the position sampling.
        modes: ``"train"`` records training-mode passes only; ``"any"`` records every pass with
            gradients enabled (for measuring a model in eval mode on given batches).

    Example:
        >>> recorder = TrainingRecorder(model, every=10)
        >>> for x, y in loader:          # the user's own loop, unchanged
        ...     loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
        >>> recorder.stats["features.0"].grad_var
        >>> recorder.close()
    """

    def __init__(self, model: nn.Module, layers: LayerSpec = None, *, every: int = 10,
                 max_positions: int = 64, reservoir: int = 512, max_samples: int = 32,
                 seed: int = 0, modes: str = "train") -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, value in (("every", every), ("max_positions", max_positions),
                            ("max_samples", max_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if modes not in ("train", "any"):
            raise ConfigError(f"modes must be 'train' or 'any', got {modes!r}")
        self.model, self.layer_spec, self.modes = model, layers, modes
        self.every, self.max_positions, self.max_samples = every, max_positions, max_samples
        self.reservoir, self.seed = reservoir, seed
        self._handles: list[RemovableHandle] = []
        self._busy = False
        self.error: str | None = None  # why recording stopped (a hook raised), if it did
        self.seconds = 0.0  # wall time spent inside this recorder's hooks, all told
        self.record_growth = True  # bypass gradients too (off once no growth can follow)
        self.layers: list[str] = []
        self.example_inputs: tuple[torch.Tensor, ...] | None = None
        self.last_batch: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None
        self.growth: dict[str, BypassGradient] = {}
        self._pairs_resolved = False
        self._gen = torch.Generator().manual_seed(seed)
        self.reset()
        self.attach()

    # ---------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Start new statistics (after an architecture change); hooks stay installed."""
        self.steps = 0
        self.recorded = 0  # recorded forward passes whose backward ran
        self.labels_inferred: bool | None = None  # None: no recorded backward yet
        self.stats: dict[str, LayerStats] = {
            n: LayerStats(n, reservoir=self.reservoir, seed=self.seed + i, saturation=None)
            for i, n in enumerate(self.layers)}
        self.growth = {name: BypassGradient(e.layer, e.consumers, e.kernel)
                       for name, e in self.growth.items()}  # same pairs, nothing recorded
        self._recording = False
        self._due = False  # a sampled pass is owed: the last one chosen had no backward
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        self._batch: tuple[torch.Tensor, ...] | None = None

    def attach(self) -> None:
        """(Re)install the hooks on the model's current modules (after edits or a rollback)."""
        self.detach()
        modules = dict(self.model.named_modules())
        names = _select_layers(self.model, self.layer_spec, modules)
        self._pairs_resolved = False  # the architecture may have changed: trace again
        self.growth = {}
        self.layers = names
        self.reset()
        root = self.model
        self._handles.append(root.register_forward_pre_hook(_Hook(self, "_on_start"),
                                                            with_kwargs=True))
        self._handles.append(root.register_forward_hook(_Hook(self, "_on_end")))
        for name in names:
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(_Hook(self, "_on_input", name)))
            self._handles.append(module.register_forward_hook(_Hook(self, "_on_output", name)))

    def detach(self) -> None:
        """Remove every hook this recorder installed (and inert copies left by a rollback)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.model.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in [k for k, h in hooks.items() if isinstance(h, _Hook)]:
                    del hooks[key]

    close = detach

    def __enter__(self) -> TrainingRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- hooks
    def _on_start(self, module: nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any] | None = None) -> None:
        self._stash.clear()
        self._inputs.clear()
        self._recording = False
        if self._busy or not torch.is_grad_enabled() or (
                self.modes == "train" and not module.training):
            return
        if not args and kwargs:  # model(**batch): the inputs in the forward's order
            args = _positional(module, kwargs)
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        if not tensors or len(tensors) != len(args):
            return  # inputs that are not all tensors: nothing to replay later
        self.steps += 1
        if (self.steps - 1) % self.every == 0:
            self._due = True
        if not self._due:
            return  # (a pass chosen but never backpropagated passes its turn to the next)
        self._recording = True
        self._batch = tuple(t.detach()[: self.max_samples] for t in args)
        if self.example_inputs is None:
            self.example_inputs = tuple(t.detach()[:8].clone() for t in args)
        if not self._pairs_resolved:
            self._resolve_pairs()

    def _on_input(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if (self._recording and self.record_growth and name in self.growth and args
                and isinstance(args[0], torch.Tensor)):
            self._inputs[name] = args[0].detach()[: self.max_samples]

    def _on_output(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not self._recording:
            return
        out = _first_tensor(output)
        if out is None or not out.is_floating_point():
            return
        unit_dim = 1 if isinstance(module, CHANNELS_FIRST) or out.ndim >= 4 else -1
        values = _units_view(out.detach(), unit_dim)
        self._stash[name] = (values, self._sample(values))
        if out.requires_grad:
            out.register_hook(_Hook(self, "_on_grad", name, unit_dim))

    def _on_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._recording:
            return
        out = _first_tensor(output)
        if out is None or not out.requires_grad:
            self._recording = False
            return
        out.register_hook(_Hook(self, "_on_output_grad"))

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        """First hook of the backward: infer labels, then record the forward's activations."""
        self._due = False
        labels = infer_labels(grad)
        if self.labels_inferred is None:  # the first recorded batch decides, for the reservoir
            self.labels_inferred = labels is not None
        elif not self.labels_inferred:
            labels = None
        elif labels is None:  # a batch whose labels cannot be read: left out
            self._stash.clear()
            return
        self.recorded += 1
        with torch.no_grad():
            for name, (values, sampled) in self._stash.items():
                self.stats[name].calls += 1
                self.stats[name].record(values, sampled, labels)
        self._stash.clear()
        if labels is not None and self._batch is not None:
            self.last_batch = (self._batch, labels[: self.max_samples])

    def _on_grad(self, name: str, unit_dim: int, grad: torch.Tensor) -> None:
        with torch.no_grad():
            values = _units_view(grad.detach(), unit_dim)
            self.stats[name].record_gradient(values, self._sample(values))
            for producer in self._consumed_by.get(name, ()):
                self._fold_bypass(producer, name, grad.detach())

    # ---------------------------------------------------------------- bypass gradients
    def _resolve_pairs(self) -> None:
        """Find each growable layer and the dense layers reading its units (one trace)."""
        from neuroexapt.policy.growth import bypass_pairs  # the policy owns the rule

        self._pairs_resolved = True
        self._consumed_by: dict[str, list[str]] = {}
        assert self.example_inputs is not None
        self._busy = True
        try:
            pairs = bypass_pairs(self.model, self.example_inputs, self.layers)
        except NeuroExaptError as e:
            logger.info("no growth statistics: %s", e)
            pairs = {}
        finally:
            self._busy = False
        modules = dict(self.model.named_modules())
        self.growth = {}
        for layer, consumers in pairs.items():
            kernel = tuple(getattr(modules[layer], "kernel_size", (1,)))
            self.growth[layer] = BypassGradient(layer, tuple(consumers), kernel)
            for c in consumers:
                self._consumed_by.setdefault(c, []).append(layer)

    def _fold_bypass(self, producer: str, consumer: str, grad: torch.Tensor) -> None:
        a = self._inputs.get(producer)
        if a is None:
            return
        entry = self.growth[producer]
        module = self.model.get_submodule(producer)
        # computed in float32 (float64 inputs stay float64), summed over batches in float64:
        # 5x faster than float64 convolutions, 2e-6 relative error on one batch
        work = torch.promote_types(a.dtype, torch.float32)
        g, a = grad[: a.shape[0]].to(work), a.to(work)
        part = _conv_bypass(module, a, g)
        if part is not None:
            self._add_bypass(entry, consumer, part.double())
            return
        patches = _patches(module, a)  # [S, F, *spatial of the producer's output]
        if g.ndim > 2:  # a conv consumer: [S, C, *spatial]
            if patches.ndim != g.ndim:
                return
            patches = _pool_to(patches, g.shape[2:])
            part = torch.einsum("ncp,nfp->cf", g.flatten(2), patches.flatten(2))
        else:  # a Linear consumer of pooled / flattened features: [S, C]
            pooled = patches.flatten(2).mean(2) if patches.ndim > 2 else patches
            part = g.transpose(0, 1) @ pooled
        self._add_bypass(entry, consumer, part.double())

    @staticmethod
    def _add_bypass(entry: BypassGradient, consumer: str, part: torch.Tensor) -> None:
        blocks = entry._blocks
        blocks[consumer] = blocks[consumer] + part if consumer in blocks else part
        if len(blocks) == len(entry.consumers):  # every consumer of this batch folded in
            stacked = torch.cat([blocks[c] for c in entry.consumers], 0)
            entry.matrix = stacked if entry.matrix is None else entry.matrix + stacked
            entry.batches += 1
            blocks.clear()

    def _sample(self, values: torch.Tensor) -> torch.Tensor:
        return sample_positions(values, self.max_positions, self._gen)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything recorded since the last :meth:`reset`, and the sampling state, as plain
        data (:mod:`neuroexapt.metrics.state`): a run resumed from it records and decides
        what an uninterrupted run would."""
        state = {"steps": self.steps, "due": self._due, "generator": self._gen.get_state(),
                 "recorded": self.recorded, "labels_inferred": self.labels_inferred,
                 "stats": to_plain(self.stats), "layers": list(self.layers),
                 "example_inputs": to_plain(self.example_inputs),
                 "last_batch": to_plain(self.last_batch)}
        if self._pairs_resolved:
            state["growth"] = to_plain(self.growth)
            state["consumed_by"] = to_plain(self._consumed_by)
        return state

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` unless ``state`` was recorded on this recorder's
        layers (callers check before they change anything)."""
        if list(state.get("layers", [])) != self.layers:
            raise CheckpointError(f"the recorder's state is of layers {state.get('layers')}, "
                                  f"this recorder watches {self.layers}: load it where the "
                                  "same layers are watched (the same layers= option)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on a recorder attached to the same layers.

        Raises:
            CheckpointError: a state of other layers, or not a recorder's.
        """
        self.check_state(state)
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        try:
            stats = from_plain(state["stats"], device)
            growth = from_plain(state["growth"], device) if "growth" in state else None
            consumed = from_plain(state["consumed_by"]) if "consumed_by" in state else None
            self.example_inputs = from_plain(state["example_inputs"], device)
            self.last_batch = from_plain(state["last_batch"], device)
            self.recorded = int(state["recorded"])
            self.labels_inferred = state["labels_inferred"]
        except KeyError as e:
            raise CheckpointError(f"not a recorder's state: {e!r} is missing") from e
        self.stats = stats
        if growth is not None:
            self.growth, self._consumed_by, self._pairs_resolved = growth, consumed, True
        self.steps, self._due = int(state["steps"]), bool(state["due"])
        self._gen.set_state(state["generator"])

    def memory_bytes(self) -> int:
        """Bytes held by the accumulators (statistics and bypass gradients)."""
        total = sum(s.memory_bytes() for s in self.stats.values())
        return total + sum(e.matrix.numel() * 8 for e in self.growth.values()
                           if e.matrix is not None)

    def __repr__(self) -> str:
        return (f"TrainingRecorder(layers={len(self.stats)}, every={self.every}, "
                f"steps={self.steps}, recorded={self.recorded})")


def _conv_bypass(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
    """``sum_n,p g(n, :, p) patches(n, :, p)^T`` for a Conv2d producer and a conv consumer.

    It is the weight gradient of a convolution with the producer's kernel geometry from the
    producer's input to the consumer's output gradient, so PyTorch's own convolution backward
    computes it (about 3x faster than unfolding the patches, same result). A consumer
    at a resolution an integer factor ``r`` lower reads average-pooled patches: the same as the
    gradient repeated over each ``r x r`` window and divided by ``r * r``. Other cases: None.
    """
    if not isinstance(module, nn.Conv2d) or g.ndim != 4 or a.ndim != 4:
        return None
    h, w = _conv_out_size(module, a.shape[2:])
    gh, gw = g.shape[2:]
    if h % gh or w % gw:
        return None
    rh, rw = h // gh, w // gw
    if rh > 1 or rw > 1:
        g = g.repeat_interleave(rh, 2).repeat_interleave(rw, 3) / (rh * rw)
    shape = (g.shape[1], a.shape[1], *module.kernel_size)
    return torch.nn.grad.conv2d_weight(a, shape, g, module.stride, module.padding,
                                       module.dilation).flatten(1)


def _patches(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The producer's input as the patches its kernel reads: [S, C_in * k * k, H_out, W_out]
    for a Conv2d (zero padding, see :func:`neuroexapt.policy.growth.bypass_pairs`), and the
    input itself, tokens moved to positions, for a Linear layer."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.view(a.shape[0], cols.shape[1], *_conv_out_size(module, a.shape[2:]))
    return a.movedim(-1, 1) if a.ndim > 2 else a  # [S, T..., F]: tokens as positions


def _conv_out_size(module: nn.Conv2d, spatial: Sequence[int]) -> tuple[int, ...]:
    """Output height and width of ``module`` on inputs of ``spatial`` size."""
    return tuple(math.floor((n + 2 * p - d * (k - 1) - 1) / s + 1)
                 for n, k, s, d, p in zip(spatial, module.kernel_size, module.stride,
                                          module.dilation, module.padding, strict=True))


def _pool_to(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Average-pool the trailing spatial dims of ``t`` to ``size``."""
    size = tuple(size)
    if tuple(t.shape[2:]) == size:
        return t
    if len(size) == 1:
        return F.adaptive_avg_pool1d(t, size)
    if len(size) == 2:
        return F.adaptive_avg_pool2d(t, size)
    return F.adaptive_avg_pool3d(t, size)
