"""``relax`` and ``discretize``: turn chosen layers of a model into choices, and back.

Example:
    >>> model = relax(model, {"features.3": kernel_candidates(model.features[3], (3, 5)),
    ...                       "features.0": "width", "features.6": "depth"},
    ...               example_inputs=x)
    >>> weights = torch.optim.SGD(weight_parameters(model), lr=0.05)
    >>> arch = torch.optim.Adam(arch_parameters(model), lr=3e-3)
    >>> ...  # weight steps on training batches, arch steps on held-out ones (search())
    >>> model = discretize(model, optimizer=weights)  # plain layers, the chosen options

A spec maps a layer name to:

* a list of candidate modules (:class:`OpChoice`): each must map the layer's input to an
  output of the layer's shape; one of the layer's own type is initialised from the layer where
  shapes allow (same weights; a smaller kernel zero-padded into a larger one, so the function
  is unchanged);
* ``"width"`` or ``{"widths": [...]}`` (:class:`WidthChoice`): how many of the units the layer
  produces stay, as masks over the first units on shared weights. The default widths are a
  quarter, a half, three quarters and all of the units, at multiples of 8 (of 4 below 32
  units). Only groups that nothing normalises or reduces over can be masked exactly;
* ``"depth"`` (:class:`DepthChoice`): the layer (a block whose output has its input's shape)
  or its shortcut.

:func:`discretize` returns the plain model with every choice at its most probable option and
no relaxation left (no extra module, parameter or hook): an operation choice is replaced by the
chosen candidate (recorded in the edit history as ``choose``), a width choice narrows the group
with :func:`neuroexapt.narrow` (recorded as ``narrow``). Its outputs equal the relaxed model's
in evaluation mode, verified, and the optimizer follows.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from neuroexapt.errors import ConfigError, LayerNotFoundError
from neuroexapt.graph import resolve_layer, trace
from neuroexapt.graph.groups import Member
from neuroexapt.graph.trace import RELAXED_ATTR
from neuroexapt.metrics.cost import count_macs, measure_latency
from neuroexapt.ops.edit import run_edit
from neuroexapt.ops.history import inputs_for, remember_inputs
from neuroexapt.ops.resize import narrow
from neuroexapt.ops.transaction import (
    check_same_function,
    edited_outputs,
    reference_outputs,
    transaction,
)
from neuroexapt.optim import migrate
from neuroexapt.optim.parammap import ParamMap
from neuroexapt.policy.pruning import unit_cost, weight_positions
from neuroexapt.relax.choices import Choice, DepthChoice, InputMask, OpChoice, WidthChoice
from neuroexapt.relax.specs import module_spec, replace_module

logger = logging.getLogger(__name__)

__all__ = ["arch_parameters", "choices", "discretize", "expected_cost", "kernel_candidates",
           "relax",
           "set_temperature", "weight_parameters"]

_HOOK_ATTR = RELAXED_ATTR  # the resampling hook's handle marks a relaxed model


def relax(model: nn.Module, spec: Mapping[str, Any], *, example_inputs: Any = None,
          mode: str = "gumbel", tau: float = 1.0) -> nn.Module:
    """Turn the layers named in ``spec`` into choices (see the module docstring), in place.

    Args:
        model: the model; returned, edited in place.
        spec: ``{layer: [candidates] | "width" | {"widths": [...]} | "depth"}``.
        example_inputs: a batch the model accepts (to check shapes and find the groups).
        mode: ``"softmax"``, ``"gumbel"`` or ``"hard"`` (see :mod:`neuroexapt.relax.choices`).
        tau: the Gumbel temperature (:func:`set_temperature` changes it).

    Raises:
        ConfigError: an unknown layer, an empty or shape-incompatible candidate list, a width
            choice on units that cannot be masked exactly, a depth choice on a layer that
            changes its input's shape; nothing is changed then.
    """
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError("relax needs a non-empty {layer: candidates | 'width' | 'depth'} "
                          "mapping")
    inputs = inputs_for(model, example_inputs, "relax")
    names = {}
    for layer in spec:
        try:
            names[layer] = resolve_layer(model, layer)
        except LayerNotFoundError as e:
            raise ConfigError(f"relax: {e.args[0] if e.args else e}") from e
    if choices(model):
        raise ConfigError("relax: the model already has choices; discretize it first")
    io = _record_io(model, inputs, list(names.values()))
    plans = [(names[layer], _plan(model, inputs, names[layer], value, io, mode, tau))
             for layer, value in spec.items()]  # every check before any change
    ops = {n: p for n, p in plans if isinstance(p, _OpPlan)}
    replaced = [n for n, p in plans if not isinstance(p, _WidthPlan)]
    for name, plan in plans:
        if isinstance(plan, _WidthPlan):
            for member in plan.readers:
                if member.module in ops:  # every candidate reads the units the same way
                    plan.also_mask(member, ops[member.module].candidates, name)
                elif any(member.module.startswith(n + ".") or member.module == n
                         for n in replaced):
                    raise ConfigError(f"relax: the width of '{name}' is read by "
                                      f"'{member.module}', inside a choice; choose one of "
                                      "the two")
    # masks first: they follow the modules they are registered on when choices move them
    for name, plan in sorted(plans, key=lambda p: not isinstance(p[1], _WidthPlan)):
        plan()
        logger.info("relax: '%s' is a choice", name)
    _install_hook(model)
    remember_inputs(model, inputs)
    return model


def discretize(model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
               example_inputs: Any = None) -> nn.Module:
    """The plain model with every choice at its most probable option (in place; returned).

    All or nothing: if any choice cannot be discretised with the function kept, the model,
    the optimizer and the history are as before and the error is raised.
    """
    inputs = inputs_for(model, example_inputs, "discretize")
    found = list(choices(model).items())
    if not found:
        raise ConfigError("discretize: the model has no relaxed choice (call relax first)")
    with transaction(model, optimizer):
        classes = {m: type(m) for m in model.modules()}
        _remove_hook(model)  # the model is edited as a plain one from here
        try:  # operations and depths first: a width choice's narrow traces a plain model
            for name, choice in found:
                if not isinstance(choice, WidthChoice):
                    _discretize_module(model, name, choice, inputs, optimizer)
            widths = [c for _, c in found if isinstance(c, WidthChoice)]
            if widths:
                _discretize_widths(model, widths, inputs, optimizer)
        except BaseException:
            for module, cls in classes.items():  # parametrize changes classes
                module.__class__ = cls
            _install_hook(model)
            raise
    return model


def choices(model: nn.Module) -> dict[str, Choice]:
    """Every choice of the model by name (a width choice under its layer's name)."""
    out: dict[str, Choice] = {}
    for name, module in model.named_modules(remove_duplicate=True):
        if isinstance(module, WidthChoice):
            out.setdefault(module.layer, module)
        elif isinstance(module, OpChoice | DepthChoice):
            out[name] = module
    return out


def arch_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The architecture parameters (each choice's ``alpha``), for their own optimizer."""
    for choice in choices(model).values():
        yield choice.alpha


def weight_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every parameter but the architecture ones."""
    arch = {id(p) for p in arch_parameters(model)}
    for p in model.parameters():
        if id(p) not in arch:
            yield p


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the Gumbel temperature of every choice."""
    if not isinstance(tau, int | float) or isinstance(tau, bool) or not tau > 0:
        raise ConfigError(f"tau must be a positive number, got {tau!r}")
    for choice in choices(model).values():
        choice.tau = float(tau)


def kernel_candidates(conv: nn.Module, sizes: Sequence[int]) -> list[nn.Module]:
    """Copies of ``conv`` with each kernel size in ``sizes`` ("same" padding kept), for an
    :class:`OpChoice`; :func:`relax` initialises them from ``conv`` (zero-padded kernels)."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or isinstance(
            conv, nn.modules.conv._ConvTransposeNd):
        raise ConfigError(f"kernel_candidates needs a convolution, got {type(conv).__name__}")
    out = []
    for k in sizes:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ConfigError(f"kernel sizes must be odd positive ints, got {k!r}")
        dim = len(conv.kernel_size)
        padding = tuple(d * (k - 1) // 2 for d in conv.dilation)
        out.append(type(conv)(conv.in_channels, conv.out_channels, (k,) * dim, conv.stride,
                              padding, conv.dilation, conv.groups, conv.bias is not None,
                              conv.padding_mode))
    return out


# ----------------------------------------------------------------------------- relax
def _record_io(model: nn.Module, inputs: tuple[Any, ...], names: list[str]
               ) -> dict[str, tuple[tuple[Any, ...], Any]]:
    """Each named module's (positional inputs, output) on ``inputs`` (its last call)."""
    seen: dict[str, tuple[tuple[Any, ...], Any]] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, (a, o))) for n in names]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    for n in names:
        if n not in seen:
            raise ConfigError(f"relax: layer '{n}' is never called in forward")
    return seen


def _plan(model: nn.Module, inputs: tuple[Any, ...], name: str, value: Any,
          io: dict[str, tuple[tuple[Any, ...], Any]], mode: str, tau: float) -> Any:
    """Check ``value`` for layer ``name`` and return the function that installs it."""
    layer = model.get_submodule(name)
    args, out = io[name]
    if isinstance(value, str) and value == "depth":
        if not isinstance(out, torch.Tensor) or len(args) != 1 or \
                not isinstance(args[0], torch.Tensor) or args[0].shape != out.shape:
            raise ConfigError(f"relax: a depth choice needs a layer whose output has its "
                              f"input's shape; '{name}' maps {_shape(args)} to {_shape(out)}")
        depth = DepthChoice(layer, mode, tau)
        depth.costs = _module_costs([nn.Identity(), layer], args)
        return lambda: replace_module(model, name, depth)
    if (isinstance(value, str) and value == "width") or isinstance(value, Mapping):
        return _plan_width(model, inputs, name, value, mode, tau, args)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"relax: '{name}' needs a list of candidate modules, 'width' or "
                          f"'depth', got {value!r}")
    if not value:
        raise ConfigError(f"relax: the candidate list of '{name}' is empty")
    candidates = []
    for i, cand in enumerate(value):
        if not isinstance(cand, nn.Module):
            raise ConfigError(f"relax: candidate {i} of '{name}' is not an nn.Module: {cand!r}")
        cand = copy.deepcopy(cand).to(_device(layer))
        _init_from(layer, cand)
        _check_candidate(cand, args, out, name, i)
        candidates.append(cand)
    choice = OpChoice(candidates, mode, tau).train(layer.training)
    choice.costs = _module_costs(candidates, args)
    return _OpPlan(lambda: replace_module(model, name, choice), candidates)


def _module_costs(modules: Sequence[nn.Module], args: tuple[Any, ...]) -> dict[str, list[float]]:
    """Parameters, MACs (per sample) and measured seconds of each module on ``args``."""
    batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and \
        args[0].dim() else 1
    return {
        "parameters": [float(sum(p.numel() for p in m.parameters())) for m in modules],
        "macs": [count_macs(m, args) / batch for m in modules],
        "latency": [measure_latency(m, args, repeats=3, warmup=1)[0] for m in modules],
    }


def expected_cost(model: nn.Module, by: str = "parameters") -> torch.Tensor:
    """The choices' expected cost (``by``: ``"parameters"``, ``"macs"`` per sample or
    ``"latency"`` in seconds), differentiable in the architecture parameters: add
    ``weight * expected_cost(model) / reference`` to the architecture loss to ask for a
    smaller or faster model. A width's cost is its units times the mean cost of one unit of
    its group (the layers it reads from and writes to), an operation's the candidate's own."""
    if by not in ("parameters", "macs", "latency"):
        raise ConfigError(f"unknown cost {by!r}; valid: parameters, macs, latency")
    found = list(choices(model).values())
    if not found:
        raise ConfigError("expected_cost: the model has no relaxed choice (call relax first)")
    return torch.stack([c.expected_cost(by) for c in found]).sum()


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(list(value.shape))
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    return type(value).__name__


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def _check_candidate(cand: nn.Module, args: tuple[Any, ...], out: Any, name: str,
                     index: int) -> None:
    try:
        was = cand.training
        cand.eval()
        with torch.no_grad():
            got = cand(*args)
        cand.train(was)
    except Exception as e:
        raise ConfigError(f"relax: candidate {index} of '{name}' ({type(cand).__name__}) "
                          f"fails on the layer's input {_shape(args)}: {type(e).__name__}: "
                          f"{e}") from e
    if _shape(got) != _shape(out):
        raise ConfigError(f"relax: candidate {index} of '{name}' ({type(cand).__name__}) "
                          f"outputs {_shape(got)} where the layer outputs {_shape(out)}")


def _init_from(layer: nn.Module, cand: nn.Module) -> None:
    """Copy ``layer``'s weights into ``cand`` where that keeps the function: the same type
    and shapes, or a convolution whose larger kernel takes the smaller one zero-padded."""
    if type(cand) is not type(layer):
        return
    own, other = layer.state_dict(), cand.state_dict()
    if own.keys() == other.keys() and all(own[k].shape == other[k].shape for k in own):
        cand.load_state_dict(own)
        return
    if not isinstance(layer, nn.modules.conv._ConvNd) or isinstance(
            layer, nn.modules.conv._ConvTransposeNd):
        return
    assert isinstance(cand, nn.modules.conv._ConvNd)
    small, big = layer.kernel_size, cand.kernel_size
    same = (layer.in_channels, layer.out_channels, layer.stride, layer.dilation,
            layer.groups) == (cand.in_channels, cand.out_channels, cand.stride, cand.dilation,
                              cand.groups)
    if not same or isinstance(layer.padding, str) or isinstance(cand.padding, str):
        return
    grow = [b - s for s, b in zip(small, big, strict=True)]
    if any(g < 0 or g % 2 for g in grow) or any(
            pc - pl != d * g // 2 for pl, pc, d, g in zip(layer.padding, cand.padding,
                                                         layer.dilation, grow, strict=True)):
        return
    with torch.no_grad():
        weight = torch.zeros_like(cand.weight)
        index = [slice(None), slice(None)] + [slice(g // 2, g // 2 + s)
                                              for g, s in zip(grow, small, strict=True)]
        weight[tuple(index)] = layer.weight
        cand.weight.copy_(weight)
        if cand.bias is not None and layer.bias is not None:
            cand.bias.copy_(layer.bias)


def default_widths(size: int) -> list[int]:
    """A quarter, a half, three quarters and all of ``size`` units, at multiples of 8 (4
    below 32 units), without repeats."""
    step = 8 if size >= 32 else 4 if size >= 8 else 1
    widths = {max(step, round(size * f / step) * step) for f in (0.25, 0.5, 0.75)}
    return [*sorted(w for w in widths if w < size), size]


def _plan_width(model: nn.Module, inputs: tuple[Any, ...], name: str, value: Any, mode: str,
                tau: float, io_args: tuple[Any, ...] | None) -> Any:
    group = trace(model, inputs).group_of(name)
    reason = None
    if not group.resizable:
        reason = "; ".join(dict.fromkeys(group.frozen))
    elif group.mixed:
        reason = (f"{', '.join(group.normalizers + group.extrema + group.sums)} combine the "
                  "units, so a masked unit is not a removed one")
    elif group.segments > 1:
        reason = "the units form equal segments (GroupNorm groups, grouped convolutions)"
    elif any(m.role == "custom" for m in group.members):
        reason = "a layer handler resizes these units"
    readers = [m for m in group.members if m.role == "in" and m.tensor]
    if reason is None and not readers:
        reason = "no weight reads these units"
    if reason is not None:
        raise ConfigError(f"relax: a width choice on '{name}' is not possible: {reason}")
    atom = group.atom  # attention heads: whole heads are kept or masked
    widths = [w * atom for w in default_widths(group.size // atom)] \
        if isinstance(value, str) else value.get("widths")
    if not isinstance(widths, Sequence) or not widths or any(
            isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= group.size
            for w in widths):
        raise ConfigError(f"relax: widths of '{name}' must be a non-empty list of ints in "
                          f"1..{group.size}, got {widths!r}")
    if any(w % atom for w in widths):
        raise ConfigError(f"relax: the units of '{name}' form attention heads of {atom}; "
                          f"widths must be multiples of {atom}, got {list(widths)}")
    widths = sorted(set(widths))
    for m in readers:
        owner = model.get_submodule(m.module) if m.module else model
        if parametrize.is_parametrized(owner, m.tensor):
            raise ConfigError(f"relax: '{m.path}' reads the units of '{name}' and is already "
                              "parametrized (torch.nn.utils.parametrize); a width mask would "
                              "be removed with it: remove that parametrization first")
        if not isinstance(getattr(owner, m.tensor, None), nn.Parameter):
            raise ConfigError(f"relax: '{m.path}' reads the units of '{name}' but is not a "
                              "parameter that can be masked")

    choice = WidthChoice(name, group.size, widths, mode, tau).to(
        _device(model.get_submodule(name)))
    positions = weight_positions(model, inputs)
    per_unit = {by: float(unit_cost(model, group, by, positions).mean())
                for by in ("parameters", "macs")}
    producer = model.get_submodule(name)
    seconds = measure_latency(producer, io_args)[0] if io_args is not None else 0.0
    per_unit["latency"] = seconds / group.size
    choice.costs = {by: [w * c for w in widths] for by, c in per_unit.items()}
    targets = [(model.get_submodule(m.module) if m.module else model, m) for m in readers]
    return _WidthPlan(choice, targets)


class _OpPlan:
    """How to install an operation choice, and its (checked, initialised) candidates."""

    def __init__(self, install: Any, candidates: list[nn.Module]) -> None:
        self.install, self.candidates = install, candidates

    def __call__(self) -> None:
        self.install()


class _WidthPlan:
    """A width choice and the weights it masks: (owner module, member) pairs."""

    def __init__(self, choice: WidthChoice, targets: list[tuple[nn.Module, Member]]) -> None:
        self.choice, self.targets = choice, targets

    @property
    def readers(self) -> list[Member]:
        return [m for _, m in self.targets]

    def also_mask(self, member: Member, candidates: list[nn.Module], name: str) -> None:
        """Mask ``member``'s tensor in each candidate that replaces its module as well."""
        size = self.choice.size * member.block + member.offset
        for i, cand in enumerate(candidates):
            t = getattr(cand, member.tensor, None)
            if not isinstance(t, nn.Parameter) or t.dim() <= member.dim or \
                    t.shape[member.dim] < size:
                raise ConfigError(f"relax: candidate {i} of '{member.module}' does not read "
                                  f"the units of '{name}' through '{member.tensor}' (dim "
                                  f"{member.dim}), so their width cannot be masked in it")
            self.targets.append((cand, member))

    def __call__(self) -> None:
        for owner, m in self.targets:
            parametrize.register_parametrization(
                owner, m.tensor, InputMask(self.choice, m.dim, m.offset, m.block), unsafe=True)


def _install_hook(model: nn.Module) -> None:
    """One sample of every width choice per forward pass (removed by :func:`discretize`)."""
    if getattr(model, _HOOK_ATTR, None) is not None:
        return

    widths = [c for c in choices(model).values() if isinstance(c, WidthChoice)]

    def resample(module: nn.Module, args: Any) -> None:
        for choice in widths:  # fixed until discretize: relax refuses a relaxed model
            choice.resample()

    object.__setattr__(model, _HOOK_ATTR, model.register_forward_pre_hook(resample))


def _remove_hook(model: nn.Module) -> None:
    handle = getattr(model, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        object.__delattr__(model, _HOOK_ATTR)


# ----------------------------------------------------------------------------- discretize
def _discretize_module(model: nn.Module, name: str, choice: Choice, inputs: tuple[Any, ...],
                       optimizer: torch.optim.Optimizer | None) -> None:
    index = choice.index
    if isinstance(choice, OpChoice):
        chosen: nn.Module = choice.candidates[index]
    else:
        assert isinstance(choice, DepthChoice)
        chosen = choice.block if index == 1 else nn.Identity()
    kept = {id(p) for p in chosen.parameters()}
    removed = [p for p in choice.parameters() if id(p) not in kept]
    if isinstance(choice, DepthChoice) and index == 1:  # the block stays where it was
        reference = reference_outputs(model, inputs)
        replace_module(model, name, chosen.train(choice.training))
        check_same_function(reference, edited_outputs(model, inputs, "discretize"),
                            f"discretize the depth of '{name}'")
        if optimizer is not None:
            migrate(optimizer, ParamMap(removed=removed))
        return

    def body() -> tuple[ParamMap, dict[str, Any]]:
        replace_module(model, name, chosen.train(choice.training))
        return ParamMap(removed=removed), {"layer": name, "index": index,
                                           "module": module_spec(chosen)}

    run_edit(model, optimizer, inputs, "choose", name, True, body)


def _discretize_widths(model: nn.Module, widths: list[WidthChoice], inputs: tuple[Any, ...],
                       optimizer: torch.optim.Optimizer | None) -> None:
    """Remove every width mask, then narrow each group to its most probable width; the
    outputs must equal those of the masked model in evaluation mode."""
    reference = reference_outputs(model, inputs)
    # only the tensors relax masked (it refuses tensors that hold other parametrizations)
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor, plist in list(module.parametrizations.items()):  # type: ignore[union-attr]
            if any(isinstance(p, InputMask) for p in plist):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
    for choice in widths:
        width = choice.widths[choice.index]
        try:
            resolve_layer(model, choice.layer)
        except LayerNotFoundError:
            continue  # inside a block that a depth choice removed
        if width < choice.size:
            narrow(model, choice.layer, keep=list(range(width)), example_inputs=inputs,
                   optimizer=optimizer)
        logger.info("discretize: '%s' keeps %d of %d units", choice.layer, width, choice.size)
    if optimizer is not None:
        migrate(optimizer, ParamMap(removed=[c.alpha for c in widths]))
    check_same_function(reference, edited_outputs(model, inputs, "discretize"),
                        "discretize the width choices")
