"""torchvision's classification models (random weights): every layer sampled edits with its
function kept or is refused with nothing changed (issue 12).

torchvision needs a torch build of its own, so these tests are skipped in the project's venv;
``benchmarks/model_zoo.py`` documents the venv that runs them.
"""

from __future__ import annotations

import pytest
import torch
from helpers.asserts import assert_model_unchanged, assert_same_function, snapshot_model
from torch import nn

import neuroexapt
from neuroexapt.errors import NeuroExaptError

torchvision = pytest.importorskip(
    "torchvision", reason="torchvision is not installed (it needs a torch build of its own)")

MODELS = ["resnet18", "mobilenet_v3_small", "convnext_tiny", "shufflenet_v2_x0_5",
          "regnet_x_400mf"]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _layers(model: nn.Module, count: int = 4) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return names[:: max(1, len(names) // count)][:count]


@pytest.mark.parametrize("name", MODELS)
def test_sampled_layers_edit_or_refuse_cleanly(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    for layer in _layers(model):
        before = model(X).detach()
        snap = snapshot_model(model)
        try:
            group = neuroexapt.trace(model, X).group_of(layer)
            neuroexapt.widen(model, layer, group.size if group.normalizers else
                             2 * group.segments, example_inputs=X, verify=True)
        except NeuroExaptError:
            assert_model_unchanged(model, snap)
            continue
        assert_same_function(before, model(X), X)
        group = neuroexapt.trace(model, X).group_of(layer)  # as widened
        per = group.size // group.segments  # one unit of each segment (grouped convs)
        neuroexapt.narrow(model, layer, remove=[s * per for s in range(group.segments)],
                          example_inputs=X)
        assert model(X).shape == before.shape
    result = neuroexapt.prune_to(model, [(X, torch.tensor([1, 2]))], 0.2, by="macs",
                                 score="norm", batches=1, steps=2)
    assert result.parameters_after < result.parameters_before and model(X).shape == (2, 10)
