"""Properties of the edits on random tiny CNNs and MLPs (hypothesis).

Each example is a fresh random architecture from :mod:`helpers.random_arch`; a failure prints
its spec. Function-preserving edits are compared in eval mode at the float32 tolerance.
"""

from __future__ import annotations

import torch
from helpers.asserts import assert_same_function
from helpers.random_arch import RandomCase, random_cnns, random_mlps
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import neuroexapt as nx
from neuroexapt.graph import resolve_layer

CASES = st.one_of(random_cnns(), random_mlps())
SETTINGS = settings(max_examples=25, deadline=None)


def size_of(model: nn.Module, layer: str, x: tuple[torch.Tensor, ...]) -> int:
    """Number of units ``layer`` produces now."""
    return nx.trace(model, x).group_of(resolve_layer(model, layer)).size


def count(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())


def draw_widen(data: st.DataObject, case: RandomCase) -> tuple[str, int]:
    """A layer to widen and by how much (every unit once when a LayerNorm follows)."""
    layer = data.draw(st.sampled_from(case.widen), label="widen layer")
    if layer in case.widen_uniform_only:
        return layer, size_of(case.model, layer, case.inputs)
    return layer, data.draw(st.integers(1, 3), label="by")


def output_of(model: nn.Module, batch: int, like: torch.Tensor) -> torch.Tensor:
    """The model's output on a random batch shaped like ``like`` with ``batch`` rows."""
    with torch.no_grad():
        return model(torch.randn(batch, *like.shape[1:]))


@SETTINGS
@given(case=CASES, data=st.data())
def test_widen_preserves_outputs(case: RandomCase, data: st.DataObject) -> None:
    assume(case.widen)
    model = case.model.eval()
    layer, by = draw_widen(data, case)
    size = size_of(model, layer, case.inputs)
    with torch.no_grad():
        reference = model(*case.inputs)
    record = nx.widen(model, layer, by, example_inputs=case.inputs, strategy="split")
    assert_same_function(reference, model, case.inputs)
    assert record.params_after > record.params_before
    assert size_of(model, layer, case.inputs) == size + by


@SETTINGS
@given(case=CASES, data=st.data())
def test_narrow_keeps_model_runnable(case: RandomCase, data: st.DataObject) -> None:
    assume(case.narrow)
    model = case.model.eval()
    layer = data.draw(st.sampled_from(case.narrow), label="narrow layer")
    size = size_of(model, layer, case.inputs)
    remove = data.draw(st.integers(1, size - 1), label="remove")
    shape = model(*case.inputs).shape
    before = count(model)
    record = nx.narrow(model, layer, remove=remove, example_inputs=case.inputs)
    assert count(model) == record.params_after < before
    assert size_of(model, layer, case.inputs) == size - remove
    for batch in (1, 5):
        assert output_of(model, batch, case.inputs[0]).shape == (batch, *shape[1:])


@SETTINGS
@given(case=CASES, data=st.data())
def test_deepen_preserves_outputs(case: RandomCase, data: st.DataObject) -> None:
    assume(case.deepen)
    model = case.model.eval()
    layer = data.draw(st.sampled_from(case.deepen), label="deepen layer")
    with torch.no_grad():
        reference = model(*case.inputs)
    record = nx.deepen(model, layer, example_inputs=case.inputs)
    assert_same_function(reference, model, case.inputs)
    assert record.params_after > record.params_before
    assert record.args["modules"], "deepen inserted no module"


@SETTINGS
@given(case=CASES, data=st.data())
def test_chained_edits_keep_model_runnable_and_traceable(
    case: RandomCase, data: st.DataObject
) -> None:
    assume(case.widen and case.deepen)
    model = case.model.eval()
    shape = model(*case.inputs).shape
    layer, by = draw_widen(data, case)
    nx.widen(model, layer, by, example_inputs=case.inputs)
    target = data.draw(st.sampled_from(case.narrow), label="narrow layer")
    size = size_of(model, target, case.inputs)
    remove = data.draw(st.integers(1, size - 1), label="remove")
    nx.narrow(model, target, remove=remove)  # example inputs come from the history
    deepened = data.draw(st.sampled_from(case.deepen), label="deepen layer")
    nx.deepen(model, deepened)
    assert [r.op for r in nx.get_history(model)] == ["widen", "narrow", "deepen"]
    assert size_of(model, target, case.inputs) == size - remove
    graph = nx.trace(model, case.inputs)
    assert graph.group_of(resolve_layer(model, deepened)).size > 0
    for batch in (1, 5):
        assert output_of(model, batch, case.inputs[0]).shape == (batch, *shape[1:])
