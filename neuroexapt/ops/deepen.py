"""``deepen``: insert an identity-initialised layer after a layer (Net2DeeperNet)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from neuroexapt.errors import SurgeryError
from neuroexapt.graph import resolve_layer, trace
from neuroexapt.graph.trace import ModelGraph
from neuroexapt.graph.wrappers import accepts_wrapped
from neuroexapt.ops.edit import run_edit
from neuroexapt.ops.history import EditRecord, inputs_for
from neuroexapt.ops.modules import Chain
from neuroexapt.optim.parammap import ParamMap

__all__ = ["deepen", "identity_like"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_IDEMPOTENT = (nn.ReLU, nn.ReLU6, nn.Hardtanh)  # act(act(x)) == act(x)


def identity_like(layer: nn.Module) -> nn.Module:
    """A new layer of ``layer``'s kind that maps its output space to itself as the identity."""
    weight = getattr(layer, "weight", None)
    kw: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype} if weight is not None \
        else {}
    conv1d = _is_transformers_conv1d(layer)  # GPT-2's Linear with a transposed weight
    if isinstance(layer, nn.Linear | nn.Embedding) or conv1d:
        n = layer.out_features if isinstance(layer, nn.Linear) else \
            int(layer.nf) if conv1d else layer.embedding_dim  # type: ignore[union-attr]
        bias = getattr(layer, "bias", None) is not None
        new = nn.Linear(n, n, bias=bias, **kw)
        with torch.no_grad():
            new.weight.copy_(torch.eye(n, **kw))
            if new.bias is not None:
                new.bias.zero_()
        return new
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return _identity_conv(layer, kw)
    raise SurgeryError(
        f"deepen supports Linear, Embedding, transformers' Conv1D and Conv1d/2d/3d layers, got "
        f"{type(layer).__name__}"
    )


def _is_transformers_conv1d(layer: nn.Module) -> bool:
    cls = type(layer)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and \
        isinstance(getattr(layer, "nf", None), int)


def _identity_conv(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d, kw: dict[str, Any]) -> nn.Module:
    n = layer.out_channels
    depthwise = layer.groups == layer.in_channels and layer.groups > 1
    if layer.groups > 1 and not depthwise:
        raise SurgeryError("deepen does not support grouped (non-depthwise) convolutions")
    ks = tuple(k if k % 2 == 1 else 1 for k in layer.kernel_size)
    groups = n if depthwise else 1
    # the built-in class: a subclass's own __init__ may take other arguments
    base = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(layer, c))
    new = base(n, n, ks, padding=tuple(k // 2 for k in ks), groups=groups,
               bias=layer.bias is not None, **kw)
    with torch.no_grad():
        new.weight.zero_()
        centre = tuple(k // 2 for k in ks)
        for c in range(n):
            new.weight[(c, 0 if depthwise else c, *centre)] = 1.0
        if new.bias is not None:
            new.bias.zero_()
    return new


def _identity_norm(norm: nn.Module) -> nn.Module | None:
    """A copy of a BatchNorm that is the identity in eval mode; None for other norms."""
    if not isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        return None  # LayerNorm/GroupNorm cannot start as the identity
    new = copy.deepcopy(norm)
    with torch.no_grad():
        if new.affine:
            new.weight.fill_(1.0)
            new.bias.zero_()
        if new.running_mean is not None:
            new.running_mean.zero_()
            new.running_var.fill_(1.0 - new.eps)
            new.num_batches_tracked.zero_()
    return new


def _single_user_module(graph: ModelGraph, node: fx.Node, kinds: tuple[type, ...]) -> str | None:
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    name = str(users[0].target)
    module = graph.model.get_submodule(name)
    return name if isinstance(module, kinds) and len(graph.calls.get(name, ())) == 1 \
        else None


def _plan(graph: ModelGraph, name: str) -> tuple[str, list[nn.Module]]:
    """Where to insert and what: after ``layer -> [norm] -> [idempotent activation]``."""
    node = graph.node_of(name)
    layer = graph.model.get_submodule(name)
    norm_name = _single_user_module(graph, node, _NORMS)
    after_norm = graph.node_of(norm_name) if norm_name else node
    act_name = _single_user_module(graph, after_norm, _IDEMPOTENT)
    new: list[nn.Module] = [identity_like(layer)]
    if norm_name:
        norm = _identity_norm(graph.model.get_submodule(norm_name))
        if norm is not None:
            new.append(norm)
    if act_name:
        new.append(copy.deepcopy(graph.model.get_submodule(act_name)))
        return act_name, new
    return name, new


def _insert(model: nn.Module, site: str, new: list[nn.Module]) -> list[str]:
    parent_name, _, attr = site.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    current = parent.get_submodule(attr)
    chain = current if isinstance(current, Chain) else Chain(current)
    start = len(chain)
    for module in new:
        chain.append(module.train(current.training))
    chain.training = current.training
    if chain is not current:
        setattr(parent, attr, chain)
    return [f"{site}.{i}" for i in range(start, len(chain))]


@accepts_wrapped
def deepen(
    model: nn.Module,
    layer: str,
    *,
    example_inputs: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    verify: bool = False,
) -> EditRecord:
    """Insert after ``layer`` a new layer of the same kind initialised to the identity.

    When ``layer`` feeds a BatchNorm and then a ReLU-like activation (each a module called
    once), the new block ``[layer copy as identity, BatchNorm as identity, activation]`` goes
    after that activation, so the network gains a non-linearity; otherwise the identity layer
    goes right after ``layer``. The site becomes a :class:`~neuroexapt.ops.modules.Chain`
    (``site.0`` is the original module). Outputs are unchanged in eval mode, and in train mode
    too unless a BatchNorm was inserted (it then normalises with batch statistics).

    Args:
        model: the model, edited in place.
        layer: a Linear, Embedding or Conv1d/2d/3d module name.
        example_inputs: a batch the model accepts (needed the first time a model is edited).
        optimizer: receives the new parameters (in the group of ``layer``'s weight).
        verify: compare outputs before and after (eval mode).

    Returns:
        The :class:`EditRecord`.
    """
    name = resolve_layer(model, layer)
    inputs = inputs_for(model, example_inputs, "deepen")

    def body() -> tuple[ParamMap, dict[str, Any]]:
        graph = trace(model, inputs)
        site, new = _plan(graph, name)
        graph.node_of(site)
        reference = getattr(model.get_submodule(name), "weight", None)
        names = _insert(model, site, new)
        added = [(p, reference) for m in new for p in m.parameters()]
        return ParamMap(added=added), {"layer": name, "site": site, "modules": names}

    return run_edit(model, optimizer, inputs, "deepen", name, verify, body)
