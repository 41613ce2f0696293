"""Edited models export: torch.export and ONNX (checked with onnxruntime) (issue 14)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers.asserts import assert_same_function
from torch import nn

import neuroexapt
from neuroexapt.relax import discretize, kernel_candidates, relax


def _edited() -> tuple[nn.Module, torch.Tensor]:
    """A CNN after every kind of edit: widen, narrow, deepen, a skip connection, relaxation
    discretised (the containers the edits insert are in it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 8, 8)
    neuroexapt.widen(model, "0", 4, example_inputs=x)
    neuroexapt.narrow(model, "3", remove=[0, 1], example_inputs=x)
    neuroexapt.deepen(model, "5", example_inputs=x)
    neuroexapt.add_skip(model, "0", "5", example_inputs=x)
    relax(model, {"3": kernel_candidates(model[3], (3, 5))}, example_inputs=x)
    with torch.no_grad():
        model[3].alpha[1] = 2.0  # the 5x5 kernel
    discretize(model)
    return model.eval(), x


def test_torch_export_of_an_edited_model_computes_the_same() -> None:
    model, x = _edited()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip source keeps its last output
        program = torch.export.export(model, (x,))
    assert_same_function(model(x), program.module()(x), x)


def test_onnx_export_of_an_edited_model_runs_in_onnxruntime(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    model, x = _edited()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert_same_function(model(x), torch.from_numpy(out), x)
