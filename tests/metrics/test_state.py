"""Accumulators as plain data (neuroexapt.metrics.state): stored and rebuilt exactly, read with
weights_only, and nothing outside the fixed list of classes is ever rebuilt."""

from __future__ import annotations

import io

import pytest
import torch

from neuroexapt.errors import CheckpointError
from neuroexapt.metrics.collector import LayerStats
from neuroexapt.metrics.state import from_plain, to_plain


def test_layer_statistics_round_trip_through_a_weights_only_file() -> None:
    stats = LayerStats("fc", reservoir=8, seed=3, saturation=None)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        values = torch.randn(16, 5, 4, generator=gen)
        stats.record(values, values.mean(2), torch.randint(0, 3, (16,), generator=gen))
    buffer = io.BytesIO()
    torch.save({"s": to_plain({"fc": stats, "pair": ("a", 1)})}, buffer)
    buffer.seek(0)
    back = from_plain(torch.load(buffer, weights_only=True)["s"])
    copy = back["fc"]
    assert back["pair"] == ("a", 1) and isinstance(copy, LayerStats)
    torch.testing.assert_close(copy.activation.mean, stats.activation.mean, rtol=0, atol=0)
    torch.testing.assert_close(copy.dead_fraction, stats.dead_fraction, rtol=0, atol=0)
    x, y = copy.reservoir.samples()
    x0, y0 = stats.reservoir.samples()
    assert torch.equal(x, x0) and torch.equal(y, y0) and copy.reservoir.seen == 48
    values = torch.randn(16, 5, 4, generator=gen)  # both go on identically
    labels = torch.randint(0, 3, (16,), generator=gen)
    for s in (stats, copy):
        s.record(values, values.mean(2), labels)
    assert torch.equal(copy.reservoir.samples()[0], stats.reservoir.samples()[0])


def test_other_classes_are_neither_stored_nor_rebuilt() -> None:
    with pytest.raises(CheckpointError, match="Linear"):
        to_plain(torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="unknown class 'Linear'"):
        from_plain({"~": "object", "class": "Linear", "state": {}})
    with pytest.raises(CheckpointError, match="unknown dtype"):
        from_plain({"~": "dtype", "name": "manual_seed"})
