"""``neuroexapt.trace``: the exact groups of coupled dimensions of small hand-written models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.errors import NeuroExaptError, TraceError
from neuroexapt.graph import Group, Member, ModelGraph

IMAGE = (torch.randn(2, 3, 8, 8),)


def trace(model: nn.Module, *inputs: torch.Tensor) -> ModelGraph:
    """Trace ``model`` (in eval mode) on ``inputs``, default a [2, 3, 8, 8] image batch."""
    return neuroexapt.trace(model.eval(), inputs or IMAGE)


def members(group: Group) -> set[Member]:
    return set(group.members)


def out(module: str, tensor: str = "weight") -> Member:
    """A producer's tensor computing the units (dim 0)."""
    return Member(module, tensor, 0, "out")


def read(module: str, dim: int = 1, offset: int = 0, block: int = 1) -> Member:
    """A consumer's weight reading the units."""
    return Member(module, "weight", dim, "in", offset, block)


def passing(module: str, tensor: str, dim: int = 0, block: int = 1) -> Member:
    return Member(module, tensor, dim, "pass", 0, block)


def size_attr(module: str) -> Member:
    """The tensor-less member a per-unit layer records for its size attribute."""
    return Member(module, "", 0, "pass")


def bn_members(module: str) -> set[Member]:
    stats = ("weight", "bias", "running_mean", "running_var")
    return {passing(module, t) for t in stats} | {size_attr(module)}


# ----------------------------------------------------------------------------- models


class ConvBNConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn(self.conv1(x))))


class Depthwise(nn.Module):
    def __init__(self, groups: int, multiplier: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=groups)
        self.conv2 = nn.Conv2d(8 * multiplier, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.dw(torch.relu(self.conv1(x)))))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        return self.conv3(a + self.conv2(a))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(3 + 4 + 6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([x, self.a(x), self.b(x)], 1))


class Flattening(nn.Module):
    """Conv [B, 16, 4, 4] -> flatten by ``how`` -> Linear(256, 5)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.how == "flatten":  # fixed at construction: traceable
            x = x.flatten(1)
        elif self.how == "module":
            x = self.flatten(x)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.view(-1, 256)
        return self.fc(x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.pos = nn.Parameter(torch.zeros(8, 1, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) + self.pos)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(torch.relu(self.fc1(x)))
        return self.head(self.shared(torch.relu(x)))


# ----------------------------------------------------------------------------- tests


def test_conv_bn_relu_conv_groups() -> None:
    g = trace(ConvBNConv())
    assert len(g.groups) == 2
    hidden, final = g.group_of("conv1"), g.group_of("conv2")
    assert hidden.size == 8 and hidden.producers == ["conv1"] and hidden.resizable
    assert members(hidden) == {out("conv1"), out("conv1", "bias"), read("conv2")} | bn_members(
        "bn"
    )
    assert members(final) == {out("conv2"), out("conv2", "bias")}
    assert g.group_of("bn") is hidden and g.group_of("relu") is hidden
    assert hidden.members_of("conv2") == [read("conv2")]


def test_depthwise_conv_passes_its_input_group() -> None:
    g = trace(Depthwise(groups=8))
    assert len(g.groups) == 2
    group = g.group_of("conv1")
    assert g.group_of("dw") is group and group.resizable
    assert group.producers == ["conv1"]
    assert members(group) == {
        out("conv1"), out("conv1", "bias"), passing("dw", "weight"), passing("dw", "bias"),
        read("conv2"),
    }


def test_depthwise_multiplier_gives_blocks() -> None:
    g = trace(Depthwise(groups=8, multiplier=2))
    group = g.group_of("conv1")
    assert g.group_of("dw") is group
    assert passing("dw", "weight", block=2) in group.members
    assert read("conv2", block=2) in group.members


def test_grouped_conv_freezes_its_inputs_and_segments_its_outputs() -> None:
    g = trace(Depthwise(groups=2))
    before, after = g.group_of("conv1"), g.group_of("dw")
    assert before is not after
    assert not before.resizable
    assert any("groups=2" in r and "'dw'" in r for r in before.frozen), before.frozen
    assert "dw" in before.frozen_modules
    assert after.segments == 2


def test_residual_add_merges_producers() -> None:
    g = trace(Residual())
    group = g.group_of("conv1")
    assert g.group_of("conv2") is group
    assert group.producers == ["conv1", "conv2"]
    assert group.resizable and group.size == 8
    assert members(group) == {
        out("conv1"), out("conv1", "bias"), read("conv2"), out("conv2"), read("conv3"),
    }
    assert len(g.groups) == 2


def test_cat_offsets_consumer_members() -> None:
    g = trace(Concat())
    a, b = g.group_of("a"), g.group_of("b")
    assert a is not b
    assert a.members_of("c") == [read("c", offset=3)]
    assert b.members_of("c") == [read("c", offset=3 + 4)]
    assert a.resizable and b.resizable
    # the concatenated model input is a fixed-size segment, in no group
    readers = [m for grp in g.groups for m in grp.members if m.role == "in"]
    assert sorted(m.offset for m in readers) == [3, 7]


@pytest.mark.parametrize("how", ["flatten", "module", "view"])
def test_flatten_into_linear_has_block(how: str) -> None:
    g = trace(Flattening(how), torch.randn(2, 3, 4, 4))
    group = g.group_of("conv")
    assert group.resizable
    assert group.members_of("fc") == [Member("fc", "weight", 1, "in", 0, 16)]


def test_hard_coded_view_freezes_and_suggests_flatten() -> None:
    g = trace(Flattening("hard-coded"), torch.randn(2, 3, 4, 4))
    group = g.group_of("conv")
    assert not group.resizable
    reason = " ".join(group.frozen)
    assert "256" in reason and "flatten" in reason, group.frozen
    assert not group.members_of("fc")


def test_model_output_group_is_frozen() -> None:
    g = trace(ConvBNConv())
    final = g.group_of("conv2")
    assert not final.resizable
    assert any("model's output" in r for r in final.frozen)
    assert g.group_of("conv1").resizable


def test_model_inputs_are_in_no_group() -> None:
    g = trace(ConvBNConv())
    placeholders = [n for n in g.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1 and g.layouts.get(placeholders[0]) is None
    conv1_in = Member("conv1", "weight", 1, "in")
    assert all(conv1_in not in grp.members for grp in g.groups)
    assert all(grp.producers for grp in g.groups)


def test_attention_couples_query_and_output() -> None:
    g = trace(Attention(), torch.randint(0, 10, (2, 5)))
    group = g.group_of("embed")
    assert g.group_of("attn") is group
    assert group.producers == ["embed"] and group.size == 8 and group.resizable
    assert members(group) == {
        Member("embed", "weight", 1, "out"), Member("attn", "attention", 2, "custom"),
        read("head"),
    }


def test_embedding_produces_a_group() -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 2))
    g = trace(model, torch.randint(0, 10, (2, 5)))
    assert members(g.group_of("0")) == {Member("0", "weight", 1, "out"), read("1")}


def test_layernorm_marks_normalizers() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    g = trace(model, torch.randn(2, 4))
    group = g.group_of("0")
    assert group.normalizers == ["1"]
    assert group.segments == 1
    assert {passing("1", "weight"), passing("1", "bias")} <= members(group)
    assert g.group_of("2").normalizers == []


def test_groupnorm_sets_segments() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 2, 1))
    g = trace(model)
    group = g.group_of("0")
    assert group.segments == 4 and group.normalizers == ["1"]
    assert group.resizable


def test_parameter_added_elementwise_is_pass_member() -> None:
    g = trace(Positional())
    group = g.group_of("conv")
    assert Member("", "pos", 0, "pass") in group.members
    assert group.resizable
    assert members(group) == {
        out("conv"), out("conv", "bias"), Member("", "pos", 0, "pass"), read("head"),
    }


def test_module_called_twice_couples_its_groups() -> None:
    g = trace(Shared(), torch.randn(2, 4))
    group = g.group_of("fc1")
    assert set(group.producers) == {"fc1", "shared"}
    assert {out("shared"), out("shared", "bias"), read("shared")} <= members(group)
    assert read("head") in group.members
    assert len(g.groups) == 2  # the coupled hidden group and the output
    with pytest.raises(TraceError, match=r"'shared' is called 2 times"):
        g.group_of("shared")


def test_describe_lists_groups() -> None:
    g = trace(ConvBNConv())
    text = g.describe()
    lines = text.splitlines()
    assert len(lines) == 1 + len(g.groups)
    assert "resizable" in lines[1] and "conv1" in lines[1]
    assert "frozen" in lines[2] and "model's output" in lines[2]


def test_group_of_never_called_layer_raises() -> None:
    g = trace(Shared(), torch.randn(2, 4))
    with pytest.raises(TraceError, match=r"'unused' is never called in forward"):
        g.group_of("unused")


def test_group_of_unknown_layer_raises_naming_it() -> None:
    g = trace(Shared(), torch.randn(2, 4))
    with pytest.raises(NeuroExaptError, match=r"'fc9'"):
        g.group_of("fc9")
