"""A group that meets a concatenation element-wise is split into the concatenation's parts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuroexapt
from neuroexapt.errors import SurgeryError, TraceError


class ConcatThenResidual(nn.Module):
    """cat([x, c0(x)]) feeds a residual block whose branch output c1 meets the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 2, 3, padding=1)
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, self.c0(x)], 1)
        h = self.bn(self.c1(h)) + h
        return self.fc(self.c2(h).mean((2, 3)))


def test_branch_rows_follow_the_concatenated_part() -> None:
    torch.manual_seed(0)
    model, x = ConcatThenResidual().eval(), torch.randn(2, 1, 8, 8)
    group = neuroexapt.trace(model, x).group_of("c0")
    by_path = {(m.path, m.dim): m for m in group.members}
    # the residual branch's output channels 1..2 (after the raw input's channel 0) are c0's
    assert by_path[("c1.weight", 0)].offset == 1 and by_path[("c1.weight", 0)].role == "out"
    assert by_path[("bn.running_var", 0)].offset == 1
    assert by_path[("c2.weight", 1)].offset == 1
    assert set(group.producers) >= {"c0", "c1"}


def test_widening_the_part_widens_the_branch_and_keeps_the_function() -> None:
    torch.manual_seed(0)
    model, x = ConcatThenResidual().eval(), torch.randn(2, 1, 8, 8)
    before = model(x)
    neuroexapt.widen(model, "c0", 2, example_inputs=x, verify=True)
    assert model.c1.weight.shape[:2] == (5, 5) and model.bn.num_features == 5
    assert model.c2.weight.shape[1] == 5
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_the_split_group_itself_cannot_be_edited() -> None:
    model, x = ConcatThenResidual().eval(), torch.randn(2, 1, 8, 8)
    with pytest.raises(TraceError, match="spans several groups"):
        neuroexapt.widen(model, "c1", 1, example_inputs=x)


def test_the_fixed_input_part_is_never_resized() -> None:
    model, x = ConcatThenResidual().eval(), torch.randn(2, 1, 8, 8)
    graph = neuroexapt.trace(model, x)
    c1_rows = [m for g in graph.groups for m in g.members if m.path == "c1.weight" and m.dim == 0]
    assert all(m.offset >= 1 for m in c1_rows)  # channel 0 mirrors the raw input
    with pytest.raises((SurgeryError, TraceError)):
        neuroexapt.narrow(model, "bn", remove=[0], example_inputs=x)


class SplitGroupAtOutput(nn.Module):
    """The split group reaches the model's output: every piece of it must stay frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Linear(3, 2)
        self.c1 = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, self.c0(x)], 1)
        return self.c1(h) + h


def test_freezing_a_split_group_freezes_its_pieces() -> None:
    model, x = SplitGroupAtOutput().eval(), torch.randn(4, 3)
    graph = neuroexapt.trace(model, x)
    group = graph.group_of("c0")
    assert group.output and not group.resizable
    assert graph.produces_output("c0")
    with pytest.raises(SurgeryError, match="model's output"):
        neuroexapt.widen(model, "c0", 1, example_inputs=x)
