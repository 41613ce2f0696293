"""Hugging Face transformers models, built from small configs (the ``hf`` extra): traced,
edited with their function kept, and trained on (issue 12)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.asserts import assert_same_function
from helpers.hf_zoo import NAMES, build

import neuroexapt

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def _logits(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).logits


def _by(group: neuroexapt.graph.Group) -> int:
    """A widening the group's constraints allow to keep the function."""
    return group.size if group.mixed else 2 * group.segments


@pytest.mark.parametrize("name", NAMES)
def test_every_model_traces_and_its_resizable_groups_edit(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = build(name)
    graph = neuroexapt.trace(model, inputs)
    groups = [g for g in graph.groups if g.resizable]
    assert groups, graph.describe()
    assert all(not g.resizable for g in graph.groups if g.output)
    # the largest resizable group: in transformers, the residual stream or an MLP
    group = max(groups, key=lambda g: (len(g.members), g.size))
    layer = group.producers[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = _logits(model, inputs)
    widen = lambda: neuroexapt.widen(  # noqa: E731
        model, layer, _by(group), example_inputs=inputs, optimizer=opt,
        allow_approximate=bool(group.sums), verify=False)
    if name == "gpt2":  # its residual stream holds the embedding tied to the output layer
        with pytest.raises(neuroexapt.errors.SurgeryError, match="tied weights"):
            widen()
        assert_same_function(before, _logits(model, inputs), inputs)  # nothing changed
    else:
        widen()
    if not group.sums:  # every unit copied equally keeps LayerNorms and means
        assert_same_function(before, _logits(model, inputs), inputs)
    neuroexapt.narrow(model, layer, remove=[0], example_inputs=inputs, optimizer=opt)
    assert _logits(model, inputs).shape == before.shape
    model.train()
    model(*inputs).logits.float().pow(2).mean().backward()
    opt.step()  # the optimizer holds every parameter of the edited model
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()}


def test_gpt2_keeps_its_embedding_tied_to_the_output_layer() -> None:
    model, inputs = build("gpt2")
    before = _logits(model, inputs)
    neuroexapt.widen(model, "transformer.h.0.mlp.c_fc", 8, example_inputs=inputs)
    assert_same_function(before, _logits(model, inputs), inputs)  # Conv1D has a handler
    neuroexapt.narrow(model, "transformer.wte", remove=[0, 1])  # the residual stream
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.shape == (100, 30)
    assert _logits(model, inputs).shape == before.shape
