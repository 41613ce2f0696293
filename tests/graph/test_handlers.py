"""Handlers for user-defined layers: the error without one, and edits once one is registered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers.asserts import assert_model_unchanged, assert_same_function, snapshot_model
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError, UnsupportedModuleError
from neuroexapt.graph import Member, handlers

X = torch.randn(2, 3, 8, 8)


class Scale(nn.Module):
    """A learned per-channel gain on NCHW inputs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.view(1, -1, 1, 1)


class Swish(nn.Module):
    """A parameter-free activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Dense(nn.Module):
    """A hand-written linear layer (weight [out, in])."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = Scale(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.scale(self.conv1(x))))


@pytest.fixture(autouse=True)
def registry() -> Iterator[None]:
    """Restore the handler registry after each test."""
    saved = dict(handlers._REGISTRY)
    try:
        yield
    finally:
        handlers._REGISTRY.clear()
        handlers._REGISTRY.update(saved)


def scale_handler() -> handlers.PerUnitHandler:
    return neuroexapt.PerUnitHandler([("gain", 0)], size_attr="channels", feature_dim=1)


def built(cls: type[nn.Module] = ScaledNet) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def test_trace_with_unregistered_leaf_freezes_naming_it() -> None:
    g = neuroexapt.trace(built(), X, leaf_modules=[Scale])
    group = g.group_of("conv1")
    assert not group.resizable
    assert group.frozen == ["no handler for Scale 'scale'"]
    assert group.frozen_modules == ["scale"]
    with pytest.raises(UnsupportedModuleError, match=r"Scale 'scale'.*register_handler"):
        g.group_of("scale")


def test_leaf_modules_by_name() -> None:
    g = neuroexapt.trace(built(), X, leaf_modules=["scale"])
    assert g.group_of("conv1").frozen_modules == ["scale"]


def test_widen_before_unregistered_layer_names_it() -> None:
    model = built()
    snap = snapshot_model(model)
    with pytest.raises(UnsupportedModuleError, match=r"(?s)'scale'.*register_handler"):
        neuroexapt.widen(model, "conv1", 2, example_inputs=X)
    assert_model_unchanged(model, snap)
    assert neuroexapt.get_history(model) == []


def test_registered_per_unit_handler_widens_and_preserves_outputs() -> None:
    neuroexapt.register_handler(Scale, scale_handler())
    assert "Scale" in neuroexapt.list_handlers()
    model = built()
    y = model(X).detach()
    old_gain = model.scale.gain.detach().clone()
    record = neuroexapt.widen(model, "conv1", 2, example_inputs=X)
    assert_same_function(y, model, X)
    assert model.scale.gain.shape == (10,)
    assert model.scale.channels == 10
    assert torch.equal(model.scale.gain[:8], old_gain)
    copies = record.args["units"]
    assert torch.equal(model.scale.gain[8:], old_gain[sorted(copies)])
    assert model.conv1.out_channels == 10 and model.conv2.in_channels == 10


def test_registered_type_is_traced_as_leaf() -> None:
    neuroexapt.register_handler(Scale, scale_handler())
    g = neuroexapt.trace(built(), X)  # no leaf_modules
    assert "scale" in g.calls
    assert Member("scale", "gain", 0, "pass") in g.group_of("conv1").members
    assert g.group_of("scale") is g.group_of("conv1")


def test_registered_handler_narrows() -> None:
    neuroexapt.register_handler(Scale, scale_handler())
    model = built()
    old_gain = model.scale.gain.detach().clone()
    neuroexapt.narrow(model, "conv1", keep=[0, 3, 5], example_inputs=X)
    assert torch.equal(model.scale.gain.detach(), old_gain[[0, 3, 5]])
    assert model.scale.channels == 3
    assert model(X).shape == (2, 4, 8, 8)


def test_elementwise_and_producer_handlers() -> None:
    neuroexapt.register_handler(Swish, neuroexapt.ElementwiseHandler())
    neuroexapt.register_handler(
        Dense,
        neuroexapt.ProducerHandler(
            [("weight", 1)], [("weight", 0), ("bias", 0)], "n_in", "n_out", -1
        ),
    )
    torch.manual_seed(0)
    model = nn.Sequential(Dense(4, 6), Swish(), Dense(6, 3)).eval()
    x = torch.randn(5, 4)
    y = model(x).detach()
    neuroexapt.widen(model, "0", 3, example_inputs=x)
    assert_same_function(y, model, x)
    assert (model[0].n_out, model[2].n_in) == (9, 9)
    assert model[0].weight.shape == (9, 4) and model[2].weight.shape == (3, 9)


@pytest.mark.parametrize(
    ("module_type", "handler"),
    [
        (int, "per-unit"),
        ("Scale", "per-unit"),
        (Scale(4), "per-unit"),
        (Scale, object()),
        (Scale, neuroexapt.PerUnitHandler),  # the class, not an instance
        (Scale, None),
    ],
    ids=["not-a-module", "a-string", "an-instance", "object", "handler-class", "none"],
)
def test_register_handler_rejects_bad_arguments(module_type: object, handler: object) -> None:
    if handler == "per-unit":
        handler = scale_handler()
    before = dict(handlers._REGISTRY)
    with pytest.raises(ConfigError, match=r"register_handler expects"):
        neuroexapt.register_handler(module_type, handler)  # type: ignore[arg-type]
    now = dict(handlers._REGISTRY)
    assert now == before


def test_registry_fixture_restored_previous_test() -> None:
    assert "Scale" not in neuroexapt.list_handlers()
    assert "Conv2d" in neuroexapt.list_handlers()
