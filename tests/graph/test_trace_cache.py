"""``neuroexapt.graph_cache``: one trace per decision, never a stale graph after a change."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError, FunctionPreservationError, SurgeryError
from neuroexapt.graph import ModelGraph, get_handler, graph_cache, invalidate, register_handler
from neuroexapt.graph.trace import _Tracer
from neuroexapt.ops import deepen, narrow, widen
from neuroexapt.policy import Snapshot

X = torch.randn(4, 3, 8, 8)


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the real torch.fx traces (``traces[0]``) made by neuroexapt while the test runs."""
    count = [0]
    real = _Tracer.trace

    def counting(self: _Tracer, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_Tracer, "trace", counting)
    return count


def cnn(width: int = 8) -> nn.Sequential:
    """conv-bn-relu, conv-bn-relu, pool, linear head: two resizable groups, one output."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5),
    ).eval()


class Flagged(nn.Module):
    """A residual addition that a plain Python flag switches off: no module changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)
        self.skip = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        y = self.conv2(h)
        return self.head(y + h if self.skip else y)


def coupled(graph: ModelGraph) -> bool:
    """Whether the skip couples conv1 and conv2 into one group."""
    return graph.group_of("conv1") is graph.group_of("conv2")


def sizes(graph: ModelGraph) -> dict[str, int]:
    return {layer: graph.group_of(layer).size for layer in ("0", "3")}


def test_two_traces_in_a_scope_trace_once_and_share_the_graph(traces: list[int]) -> None:
    model = cnn()
    with graph_cache(model):
        first = neuroexapt.trace(model, X)
        second = neuroexapt.trace(model, (X.clone(),))  # same shapes, other values
    assert traces[0] == 1
    assert second is first


@pytest.mark.parametrize("change", ["inputs", "leaf_modules", "registry", "mode", "other model"])
def test_whatever_shapes_the_trace_is_part_of_the_key(traces: list[int], change: str) -> None:
    model = cnn()
    other = cnn()

    def reregistered() -> ModelGraph:
        relu = get_handler(nn.ReLU())
        assert relu is not None
        register_handler(nn.ReLU, relu)  # the same handler again: a new registry version
        return neuroexapt.trace(model, X)

    again: dict[str, Callable[[], ModelGraph]] = {
        "inputs": lambda: neuroexapt.trace(model, torch.randn(2, 3, 6, 6)),
        "leaf_modules": lambda: neuroexapt.trace(model, X, leaf_modules=["0"]),
        "registry": reregistered,
        "mode": lambda: neuroexapt.trace(model.train(), X),
        "other model": lambda: neuroexapt.trace(other, X),
    }
    with graph_cache(model):
        first = neuroexapt.trace(model, X)
        second = again[change]()
        if change == "other model":
            neuroexapt.trace(other, X)  # only the scope's model is cached
    assert second is not first
    assert traces[0] == (3 if change == "other model" else 2)


def test_a_widen_invalidates_and_reuses_the_trace_before_it(traces: list[int]) -> None:
    model = cnn()
    with graph_cache(model):
        before = sizes(neuroexapt.trace(model, X))
        widen(model, "0", 3, example_inputs=X)  # its own trace is the cached one
        assert traces[0] == 1
        after = sizes(neuroexapt.trace(model, X))
    assert before == {"0": 8, "3": 8}
    assert after == {"0": 11, "3": 8}
    assert traces[0] == 2


def test_a_snapshot_restore_invalidates(traces: list[int]) -> None:
    model = cnn()
    with graph_cache(model):
        snapshot = Snapshot.take(model, None)
        narrow(model, "3", remove=[0, 1], example_inputs=X)
        assert sizes(neuroexapt.trace(model, X)) == {"0": 8, "3": 6}
        snapshot.restore(model, None)
        restored = neuroexapt.trace(model, X)
        assert sizes(restored) == {"0": 8, "3": 8}
        assert restored.model.get_submodule("3") is model.get_submodule("3")
        assert neuroexapt.trace(model, X) is restored
    assert traces[0] == 3  # narrow, after it, after the restore


def test_outside_a_scope_a_python_flag_is_always_seen(traces: list[int]) -> None:
    model = Flagged()
    assert coupled(neuroexapt.trace(model, X))
    model.skip = False
    assert not coupled(neuroexapt.trace(model, X))
    assert traces[0] == 2


def test_inside_a_scope_invalidate_announces_a_python_flag(traces: list[int]) -> None:
    model = Flagged()
    with graph_cache(model):
        assert coupled(neuroexapt.trace(model, X))
        model.skip = False
        assert coupled(neuroexapt.trace(model, X)), "documented: the key sees no Python flag"
        invalidate(model.conv1)  # a submodule's change invalidates the models containing it
        assert not coupled(neuroexapt.trace(model, X))
    assert traces[0] == 2


def test_nested_scopes_keep_the_cache_until_the_outermost_exits(traces: list[int]) -> None:
    model = cnn()
    with graph_cache(model):
        with graph_cache(model):
            first = neuroexapt.trace(model, X)
        assert neuroexapt.trace(model, X) is first
    assert neuroexapt.trace(model, X) is not first
    assert traces[0] == 2


def test_nothing_is_kept_alive_after_the_scope() -> None:
    model, x = cnn(), X.clone()
    with graph_cache(model):
        graph = neuroexapt.trace(model, x)
        widen(model, "0", 2, example_inputs=x)
        neuroexapt.trace(model, x)
    refs = [weakref.ref(obj) for obj in (model, graph, x, graph.graph)]
    del model, graph, x
    gc.collect()
    assert [r() for r in refs] == [None] * 4


def test_a_failed_edit_leaves_the_cache_consistent(traces: list[int]) -> None:
    model = cnn()
    with graph_cache(model):
        graph = neuroexapt.trace(model, X)
        with pytest.raises(SurgeryError, match="model's output"):
            narrow(model, "8", remove=[0], example_inputs=X)
        assert neuroexapt.trace(model, X).group_of("8").size == 5
        narrow(model, "0", remove=[0], example_inputs=X)
        assert sizes(neuroexapt.trace(model, X)) == {"0": 7, "3": 8}
    assert graph.group_of("0").size == 8  # the shared graph was not edited by the edit


def test_an_edit_that_fails_after_tracing_the_half_edited_model_is_not_cached(
    traces: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = cnn()

    def trace_then_fail(*args: Any) -> float:
        neuroexapt.trace(model, X)  # caches the widened model, about to be restored
        raise FunctionPreservationError("injected")

    monkeypatch.setattr("neuroexapt.ops.edit.check_same_function", trace_then_fail)
    with graph_cache(model):
        neuroexapt.trace(model, X)
        with pytest.raises(FunctionPreservationError, match="injected"):
            widen(model, "0", 2, example_inputs=X, verify=True)
        assert sizes(neuroexapt.trace(model, X)) == {"0": 8, "3": 8}
    assert model(X).shape == (4, 5)


def test_edits_do_not_mutate_the_shared_graph() -> None:
    model = cnn()

    def state(graph: ModelGraph) -> list[Any]:
        return [dict(graph.calls)] + [
            (g.size, list(g.members), list(g.producers), list(g.frozen), g.output, g.segments)
            for g in graph.groups
        ]

    with graph_cache(model):
        graph = neuroexapt.trace(model, X)
        before = state(graph)
        widen(model, "3", 2, example_inputs=X)
        assert neuroexapt.trace(model, X) is not graph
        graph = neuroexapt.trace(model, X)
        before = state(graph)
        deepen(model, "3", example_inputs=X)
    assert state(graph) == before


def test_graph_cache_rejects_what_is_not_a_module() -> None:
    scope = graph_cache("model")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"graph_cache expects an nn\.Module, got str"):
        scope.__enter__()


def _pruning_cnn() -> nn.Sequential:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU()]
    return nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                         *block(32, 32), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


@pytest.mark.parametrize("by", ["parameters", "macs"])
def test_prune_to_traces_once_per_narrow(traces: list[int], by: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 16, 16, generator=gen),
             torch.randint(0, 10, (16,), generator=gen)) for _ in range(3)]
    model = _pruning_cnn()
    result = neuroexapt.prune_to(model, data, 0.6, by=by)
    narrows = len(result.records)
    assert narrows >= result.rounds > 1
    # without the cache: one trace per round, then one per narrow (16 and 17 traces here)
    assert traces[0] <= narrows + 1 < result.rounds + narrows
    assert F.cross_entropy(model(data[0][0]), data[0][1]).isfinite()
