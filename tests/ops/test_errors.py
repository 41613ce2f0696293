"""Error messages of the edits, pinned; after every failed edit the model is exactly unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers.asserts import assert_model_unchanged, snapshot_model
from helpers.zoo import ZOO
from torch import nn

import neuroexapt
from neuroexapt import errors
from neuroexapt.errors import (
    CheckpointError,
    ConfigError,
    FunctionPreservationError,
    LayerNotFoundError,
    NeuroExaptError,
    SurgeryError,
    TraceError,
    UnsupportedModuleError,
)

MLP_X = ZOO["mlp"].inputs(2)  # mlp: 0 Linear(16,32), 1 LayerNorm, 2 GELU, 3 Dropout,
#                               4 Linear(32,24), 5 ReLU, 6 Linear(24,5)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return ZOO["mlp"].build().eval()


def fails(
    model: nn.Module, exc: type[Exception], match: str, edit: Callable[..., Any],
    *args: Any, **kwargs: Any,
) -> pytest.ExceptionInfo[Exception]:
    """Assert ``edit(model, *args, **kwargs)`` raises ``exc`` matching ``match`` and changes
    nothing: not the model, not its history."""
    snap, history = snapshot_model(model), neuroexapt.get_history(model)
    with pytest.raises(exc, match=match) as info:
        edit(model, *args, **kwargs)
    assert_model_unchanged(model, snap)
    assert neuroexapt.get_history(model) == history
    return info


# ----------------------------------------------------------------------------- layer names


def test_unknown_layer_lists_close_matches() -> None:
    model = ZOO["vgg"].build().eval()
    info = fails(model, LayerNotFoundError,
                 r"VGG has no layer 'clasifier\.0'; did you mean 'classifier\.0'",
                 neuroexapt.widen, "clasifier.0", example_inputs=ZOO["vgg"].inputs(2))
    assert "named_modules" in str(info.value)
    assert not str(info.value).startswith('"')  # KeyError's quoting is undone


@pytest.mark.parametrize(
    ("edit", "kwargs"),
    [
        (neuroexapt.widen, {}),
        (neuroexapt.narrow, {"remove": 1}),
        (neuroexapt.deepen, {}),
        (neuroexapt.remove_block, {}),
    ],
    ids=["widen", "narrow", "deepen", "remove_block"],
)
def test_every_edit_rejects_unknown_layer(edit: Callable[..., Any], kwargs: dict) -> None:
    fails(mlp(), LayerNotFoundError, r"has no layer 'nope'", edit, "nope",
          example_inputs=MLP_X, **kwargs)


def test_layer_name_must_be_a_string() -> None:
    fails(mlp(), LayerNotFoundError, r"layer names are strings.*got 4", neuroexapt.widen, 4,
          example_inputs=MLP_X)


def test_add_skip_unknown_layer() -> None:
    fails(mlp(), LayerNotFoundError, r"no layer '7'", neuroexapt.add_skip, "0", "7",
          example_inputs=MLP_X)


# ----------------------------------------------------------------------------- tracing


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = -h
        return self.fc2(h)


class TensorsOnly(DataDependent):
    """Refuses anything that is not a real tensor: no tracer gets through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or type(x) is not torch.Tensor:
            raise TypeError("tensors only")
        return self.fc2(self.fc1(x))


def test_data_dependent_control_flow_follows_the_example() -> None:
    model = DataDependent().eval()
    x = torch.randn(3, 4)
    before = model(x)
    neuroexapt.widen(model, "fc1", 4, example_inputs=x)  # traced with concrete values
    assert torch.allclose(model(x), before, atol=1e-6)


def test_untraceable_model_mentions_leaf_modules() -> None:
    model = TensorsOnly().eval()
    x = torch.randn(3, 4)
    fails(model, TraceError, r"cannot trace TensorsOnly.*tensors only.*leaf_modules=",
          neuroexapt.widen, "fc1", example_inputs=x)
    with pytest.raises(TraceError, match=r"leaf_modules=.*register_handler"):
        neuroexapt.trace(model, x)


def test_inputs_the_model_rejects() -> None:
    fails(mlp(), TraceError, r"running (the traced )?Sequential on example_inputs failed",
          neuroexapt.widen, "4", example_inputs=torch.randn(2, 7))


def test_non_tensor_example_inputs() -> None:
    fails(mlp(), ConfigError, r"example_inputs must be tensors, got int", neuroexapt.widen, "4",
          example_inputs=[1, 2])


def test_first_edit_needs_example_inputs() -> None:
    for edit, kwargs in ((neuroexapt.widen, {}), (neuroexapt.narrow, {"remove": 1}),
                         (neuroexapt.deepen, {})):
        fails(mlp(), ConfigError, r"needs example_inputs=.*the first time", edit, "4", **kwargs)
    fails(mlp(), ConfigError, r"add_skip needs example_inputs=", neuroexapt.add_skip, "0", "4")


def test_later_edits_reuse_example_inputs() -> None:
    model = mlp()
    neuroexapt.widen(model, "4", 2, example_inputs=MLP_X)
    neuroexapt.widen(model, "4", 2)  # no example_inputs: those of the last edit
    assert model[4].out_features == 28


# ----------------------------------------------------------------------------- output layer


def test_resizing_the_output_layer() -> None:
    model = mlp()
    for edit, kwargs in ((neuroexapt.widen, {}), (neuroexapt.narrow, {"remove": 1})):
        fails(model, SurgeryError, r"cannot resize the units of '6'.*model's output.*inner layer",
              edit, "6", example_inputs=MLP_X, **kwargs)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"by": 0}, r"by must be a positive int, got 0"),
        ({"by": -2}, r"by must be a positive int, got -2"),
        ({"by": True}, r"by must be a positive int, got True"),
        ({"by": 1.5}, r"by must be a positive int, got 1\.5"),
        ({"strategy": "foo"}, r"strategy must be 'split' or 'zero', got 'foo'"),
        ({"noise": -1}, r"noise must be a float >= 0 \(finite\), got -1"),
        ({"noise": "0.1"}, r"noise must be a float >= 0"),
        ({"noise": float("nan")}, r"noise"),
        ({"noise": float("inf")}, r"noise"),
        ({"units": [99, 0]}, r"units has unit 99, outside 0\.\.23"),
        ({"units": [-1, 0]}, r"units has unit -1, outside 0\.\.23"),
        ({"units": [0.5, 1]}, r"units must be unit indices \(ints\), got 0\.5"),
        ({"units": [True, 1]}, r"units must be unit indices"),
        ({"units": [0]}, r"units lists 1 units but by=2"),
        ({"units": 5}, r"units"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_widen_bad_arguments(kwargs: dict, match: str) -> None:
    kwargs = {"by": 2, **kwargs}
    fails(mlp(), ConfigError, match, neuroexapt.widen, "4", example_inputs=MLP_X, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"narrow needs exactly one of remove= or keep="),
        ({"remove": 1, "keep": [0]}, r"narrow needs exactly one of remove= or keep="),
        ({"remove": 0}, r"remove=0 must be between 1 and 23"),
        ({"remove": 24}, r"remove=24 must be between 1 and 23"),
        ({"remove": [24]}, r"remove has unit 24, outside 0\.\.23"),
        ({"keep": [0, 30]}, r"keep has unit 30, outside 0\.\.23"),
        ({"keep": list(range(24))}, r"narrow of '4' removes no unit"),
        ({"remove": []}, r"narrow of '4' removes no unit"),
        ({"remove": True}, r"remove"),
        ({"remove": 1.5}, r"remove"),
        ({"keep": 5}, r"keep"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_narrow_bad_arguments(kwargs: dict, match: str) -> None:
    fails(mlp(), ConfigError, match, neuroexapt.narrow, "4", example_inputs=MLP_X, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"keep": []}, {"remove": list(range(24))}], ids=["keep-none", "remove-all"]
)
def test_narrow_removing_every_unit(kwargs: dict) -> None:
    fails(mlp(), SurgeryError, r"narrow would remove all 24 units of '4'", neuroexapt.narrow,
          "4", example_inputs=MLP_X, **kwargs)


def test_optimizer_must_be_an_optimizer() -> None:
    fails(mlp(), NeuroExaptError, r"optimizer= must be a torch\.optim\.Optimizer, got 'sgd'",
          neuroexapt.widen, "4", example_inputs=MLP_X, optimizer="sgd")


# ----------------------------------------------------------------------------- layer constraints


class HeadsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_attention_heads_divisibility() -> None:
    model = HeadsNet().eval()
    tokens = torch.randint(0, 10, (2, 5))
    fails(model, SurgeryError, r"MultiheadAttention 'attn' has 4 heads.*divisible by 4, got 10",
          neuroexapt.widen, "embed", 2, example_inputs=tokens)
    fails(model, SurgeryError, r"divisible by 4, got 7", neuroexapt.narrow, "embed", remove=1,
          example_inputs=tokens)
    neuroexapt.widen(model, "embed", 4, example_inputs=tokens)  # a multiple of the heads works
    assert model.attn.embed_dim == 12 and model.attn.head_dim == 3


def test_layernorm_widening_needs_uniform_split() -> None:
    model = mlp()
    fails(model, SurgeryError, r"'1' normalise over these 32 units.*multiple of 32.*"
          r"allow_approximate=True", neuroexapt.widen, "0", 2, example_inputs=MLP_X)
    fails(model, SurgeryError, r"allow_approximate", neuroexapt.widen, "0", 32,
          units=[0] * 32, example_inputs=MLP_X)
    neuroexapt.widen(model, "0", 2, example_inputs=MLP_X, allow_approximate=True)
    assert model[1].normalized_shape == (34,)


def test_groupnorm_needs_equal_segments() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    fails(model, SurgeryError, r"units in 4 equal segments; widen by a multiple of 4",
          neuroexapt.widen, "0", 2, example_inputs=x, allow_approximate=True)
    fails(model, SurgeryError, r"narrow '0'.*4 equal segments", neuroexapt.narrow, "0",
          remove=[0, 1, 2, 3], example_inputs=x)


def test_grouped_conv_cannot_be_resized() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1))
    fails(model.eval(), SurgeryError, r"cannot resize the units of '0'.*groups=2",
          neuroexapt.widen, "0", 2, example_inputs=torch.randn(2, 3, 6, 6))


def test_deepen_unsupported_layer() -> None:
    fails(mlp(), SurgeryError,
          r"deepen supports Linear, Embedding, transformers. Conv1D and Conv.*got LayerNorm",
          neuroexapt.deepen, "1", example_inputs=MLP_X)


def test_remove_block_of_non_residual_block() -> None:
    case = ZOO["vgg"]
    fails(case.build().eval(), SurgeryError, r"'features' ends in .*not in a residual addition",
          neuroexapt.remove_block, "features", example_inputs=case.inputs(2))


def test_remove_block_of_the_model_itself() -> None:
    fails(mlp(), SurgeryError, r"not the model itself", neuroexapt.remove_block, "",
          example_inputs=MLP_X)


def test_add_skip_dst_before_src() -> None:
    fails(mlp(), SurgeryError, r"'4' does not run before '0' in forward; swap them",
          neuroexapt.add_skip, "4", "0", example_inputs=MLP_X)


def test_add_skip_to_itself() -> None:
    fails(mlp(), ConfigError, r"add_skip needs two different layers, got '4' twice",
          neuroexapt.add_skip, "4", "4", example_inputs=MLP_X)


def test_verify_failure_restores_the_model() -> None:
    """A widening with noise does not preserve the function: verify=True raises, rolls back."""
    fails(mlp(), FunctionPreservationError, r"widen '4' changed the model's outputs",
          neuroexapt.widen, "4", 2, noise=0.5, example_inputs=MLP_X, verify=True)


# ----------------------------------------------------------------------------- hierarchy


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ConfigError, ValueError),
        (TraceError, RuntimeError),
        (UnsupportedModuleError, TypeError),
        (LayerNotFoundError, KeyError),
        (SurgeryError, RuntimeError),
        (FunctionPreservationError, SurgeryError),
        (CheckpointError, RuntimeError),
    ],
)
def test_error_hierarchy(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, NeuroExaptError)
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("message")


def test_every_exported_error_derives_from_the_root() -> None:
    exported = [getattr(errors, name) for name in errors.__all__]
    assert len(exported) == 8
    assert all(issubclass(cls, NeuroExaptError) for cls in exported)
    assert str(LayerNotFoundError("no layer 'x'")) == "no layer 'x'"
