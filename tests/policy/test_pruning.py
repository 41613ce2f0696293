"""``neuroexapt.prune_to``: pruning to a parameter or MAC target, for real, on any zoo model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.zoo import get_case, list_cases
from torch import nn

import neuroexapt
from neuroexapt.errors import AnalysisError, ConfigError


def _cnn(width: int = 16) -> nn.Sequential:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU()]
    return nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * 4 * 4, 10))


def _batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,),
                                                                      generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("by", ["parameters", "macs"])
@pytest.mark.parametrize("amount", [0.3, 0.7])
def test_reaches_the_target_with_smaller_tensors(by: str, amount: float) -> None:
    torch.manual_seed(0)
    model = _cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _batches()
    x = data[0][0]
    before_shapes = {n: p.shape for n, p in model.named_parameters()}
    result = neuroexapt.prune_to(model, data, amount, by=by, optimizer=optimizer,
                                 round_to=None)  # unit granularity: the target is met closely
    measured = (neuroexapt.count_macs(model, x[:1]) if by == "macs"
                else sum(p.numel() for p in model.parameters()))
    base = result.macs_before if by == "macs" else result.parameters_before
    assert measured <= base * (1 - amount) + 1e-9
    assert measured >= base * (1 - amount) * 0.8, "overshot the target by more than 20%"
    assert result.parameters_after == sum(p.numel() for p in model.parameters())
    assert result.units_removed > 0 and result.records
    shrunk = [n for n, p in model.named_parameters() if p.shape != before_shapes[n]]
    assert "0.weight" in shrunk or "4.weight" in shrunk
    assert model(x).shape == (16, 10)  # the output keeps its size
    # the optimizer follows: one step on the pruned model works and changes the weights
    w = model[0].weight.detach().clone()
    F.cross_entropy(model(x), data[0][1]).backward()
    optimizer.step()
    assert not torch.equal(w, model[0].weight)


def test_units_that_nothing_reads_go_first() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    dead = [1, 4, 9, 12]
    with torch.no_grad():
        model[2].weight[:, dead] = 0.0  # units 1, 4, 9, 12 of layer 0 are read by nobody
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen))
            for _ in range(2)]
    before = model[0].weight.detach().clone()
    neuroexapt.prune_to(model, data, 0.2, by="parameters", steps=1,
                        round_to=None)  # 4 units of 25
    assert model[0].out_features == 12
    kept = [u for u in range(16) if u not in dead]
    assert torch.equal(model[0].weight, before[kept])


def test_scoring_restores_grads_and_mode() -> None:
    model = _cnn()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    neuroexapt.prune_to(model, _batches(), 0.3)
    assert model.training
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())
    assert torch.equal(model[-1].bias.grad, torch.full((10,), 7.0))  # never resized


def test_norm_and_information_disagree_on_a_loud_unit_nobody_reads() -> None:
    kept = {}
    for score in ("information", "norm"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            model[0].weight[5] *= 50.0  # the largest incoming weights ...
            model[2].weight[:, 5] = 0.0  # ... of a unit that nobody reads
        gen = torch.Generator().manual_seed(1)
        data = [(torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen))]
        neuroexapt.prune_to(model, data, 0.05, steps=1, score=score)
        marker = model[0].weight.abs().sum(1).max() > 20.0
        kept[score] = bool(marker)
    assert kept == {"information": False, "norm": True}


@pytest.mark.parametrize("name", [n for n in list_cases() if n not in ("transformer",)])
def test_every_zoo_model_prunes_and_still_runs(name: str) -> None:
    case = get_case(name)
    torch.manual_seed(0)
    model = case.build()
    x = case.inputs(8)
    data = [(x if len(x) > 1 else x[0], case.target(8))]
    result = neuroexapt.prune_to(model, data, 0.3, steps=2)
    out = model(*x)
    assert out.shape[0] == 8
    if result.records:
        assert result.parameters_after < result.parameters_before
    else:  # nothing prunable must be explained by frozen groups, not silently ignored
        pytest.fail(f"{name}: prune_to removed nothing")


def test_transformer_prunes_hidden_units() -> None:
    case = get_case("transformer")
    torch.manual_seed(0)
    model = case.build()
    x = case.inputs(8)
    result = neuroexapt.prune_to(model, [(x[0], case.target(8))], 0.2, steps=2)
    assert result.parameters_after <= 0.8 * result.parameters_before
    assert model(*x).shape[0] == 8


def test_facade_prune_to_follows_the_task() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    data = [(x, x[:, :1] * 2.0)]
    ne = neuroexapt.NeuroExapt(task_type="regression")
    ne.wrap_model(model)
    ne.measure(data)
    result = ne.prune_to(0.5, data=data)
    assert result.parameters_after <= 0.5 * result.parameters_before
    assert ne.report is not None and model(x).shape == (64, 1)


def test_bad_arguments_are_named() -> None:
    model, data = _cnn(), _batches(1)
    for kwargs, word in (({"amount": 1.0}, "amount"), ({"amount": 0.5, "by": "flops"}, "by"),
                         ({"amount": 0.5, "score": "magic"}, "score"),
                         ({"amount": 0.5, "steps": 0}, "steps")):
        with pytest.raises(ConfigError, match=word):
            neuroexapt.prune_to(model, data, **kwargs)
    with pytest.raises(AnalysisError, match="no batch"):
        neuroexapt.prune_to(model, [], 0.5)
    bad = [(torch.full((4, 3, 16, 16), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(AnalysisError, match="NaN"):
        neuroexapt.prune_to(model, bad, 0.5)


def test_count_macs_matches_the_formula() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 5))
    macs = neuroexapt.count_macs(model, torch.randn(2, 3, 4, 4))
    assert macs == 2 * (8 * 3 * 9 * 16 + 8 * 16 * 5)
    with pytest.raises(ConfigError, match="example_inputs"):
        neuroexapt.count_macs(model, [1, 2])


def test_round_to_keeps_pruned_layers_at_multiples() -> None:
    """Groups larger than round_to end at multiples of it; smaller ones at any size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 44, 3),
                          nn.ReLU(), nn.Conv2d(44, 6, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 12 * 12, 10))
    result = neuroexapt.prune_to(model, _batches(), 0.4, by="macs")
    assert result.macs_after <= 0.6 * result.macs_before
    sizes = [(model[0].out_channels, 20), (model[2].out_channels, 44)]
    assert any(now < was for now, was in sizes)
    assert all(now == was or (now % 8 == 0 and now >= 8) for now, was in sizes), sizes
    model = _cnn(width=12)
    neuroexapt.prune_to(model, _batches(), 0.3, round_to=4)
    sizes = [(model[0].out_channels, 12), (model[4].out_channels, 24)]
    assert any(now < was for now, was in sizes)
    assert all(now == was or now % 4 == 0 for now, was in sizes), sizes


def test_round_to_larger_than_every_layer_is_named() -> None:
    model = _cnn(width=16)  # groups of 16 and 32 units
    with pytest.raises(ConfigError, match="round_to=32 is larger than every prunable layer "
                                          r"\(the largest has 32 units\).*round_to=None"):
        neuroexapt.prune_to(model, _batches(1), 0.3, round_to=32)
    for bad in (0, 2.5, True, "eight"):
        with pytest.raises(ConfigError, match="round_to must be a positive int, 'auto' or None"):
            neuroexapt.prune_to(model, _batches(1), 0.3, round_to=bad)
    assert model[0].out_channels == 16  # nothing was done


def _work(model: nn.Module, example: object, *, modules: list[str] | None = None,
          **_: object) -> tuple[float, dict[str, float]]:
    """A deterministic stand-in for measure_latency: each module's "seconds" are its output
    elements times its input channels (a conv), or its output elements (anything else)."""
    inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    names = modules if modules is not None else [n for n, m in model.named_modules()
                                                 if not list(m.children())]
    spent: dict[str, float] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: spent.__setitem__(n, spent.get(n, 0.0) + 1e-9 * o.numel() * (
            m.in_channels * m.kernel_size[0] ** 2 if isinstance(m, nn.Conv2d) else 1)))
        for n in names]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return sum(spent.values()), spent


def test_latency_cost_prefers_high_resolution_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel of the first conv's group (computed and read at 32x32) costs more time but
    fewer parameters than one of the second conv's (read at 8x8 after pooling): pruned by
    latency, the first group shrinks and the second keeps more than when pruned by
    parameters. The timings are made deterministic (see _work)."""
    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),   # 32x32
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # 32x32
            nn.MaxPool2d(4),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # 8x8
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    monkeypatch.setattr("neuroexapt.policy.pruning.measure_latency", _work)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,),
                                                                      generator=gen))]
    fast, small = net(), net()
    result = neuroexapt.prune_to(fast, data, 0.4, by="latency", score="norm", steps=2)
    neuroexapt.prune_to(small, data, 0.4, by="parameters", score="norm", steps=2)
    assert result.latency_before is not None and result.latency_after is not None
    assert result.latency_after <= 0.6 * result.latency_before
    assert fast[0].out_channels < small[0].out_channels
    assert fast[3].out_channels > small[3].out_channels


def test_measure_latency_times_the_model_and_its_modules() -> None:
    model = _cnn()
    total, per_module = neuroexapt.measure_latency(model, torch.randn(8, 3, 16, 16), repeats=3)
    assert total > 0 and set(per_module) == {str(i) for i in range(len(model))}
    assert all(t > 0 for t in per_module.values())
    with pytest.raises(ConfigError, match="repeats must be an int >= 1"):
        neuroexapt.measure_latency(model, torch.randn(8, 3, 16, 16), repeats=0)


def test_a_failure_in_a_later_round_leaves_everything_as_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers.asserts import (
        assert_model_unchanged,
        assert_optimizer_unchanged,
        snapshot_model,
        snapshot_optimizer,
    )

    from neuroexapt.policy import pruning

    torch.manual_seed(0)
    model = _cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _batches()
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    optimizer.step()
    model.zero_grad()
    snap, opt_snap = snapshot_model(model), snapshot_optimizer(optimizer)
    history = neuroexapt.get_history(model)
    real, calls = pruning._round, []

    def failing_second(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in round 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(pruning, "_round", failing_second)
    with pytest.raises(RuntimeError, match="injected failure in round 2"):
        neuroexapt.prune_to(model, data, 0.5, by="macs", optimizer=optimizer, round_to=None)
    assert len(calls) == 2  # the first round did remove units before the failure
    assert_model_unchanged(model, snap)
    assert_optimizer_unchanged(optimizer, opt_snap)
    assert neuroexapt.get_history(model) == history


@pytest.mark.parametrize("by", ["parameters", "macs"])
def test_uniform_allocation_cuts_every_layer_by_the_same_share(by: str) -> None:
    torch.manual_seed(0)
    model = _cnn(32)
    data = _batches()
    x = data[0][0]
    before = count = neuroexapt.count_macs(model, x[:1])
    with torch.no_grad():  # a global ranking would empty the first layer: its units are weak
        model[0].weight.mul_(1e-3)
    result = neuroexapt.prune_to(model, data, 0.5, by=by, score="norm", round_to=None,
                                 allocation="uniform")
    count = neuroexapt.count_macs(model, x[:1])
    assert result.macs_after == count < before
    kept = [model[0].out_channels / 32, model[4].out_channels / 64]
    assert abs(kept[0] - kept[1]) <= 0.1, kept
    assert model(x).shape == (16, 10)
    with pytest.raises(ConfigError, match="allocation"):
        neuroexapt.prune_to(model, data, 0.3, allocation="layerwise")


def test_the_magnitude_score_counts_the_weights_that_read_a_unit() -> None:
    """Behind a BatchNorm a unit's incoming weights say nothing of its scale: units 0-3 have
    the smallest incoming weights but the largest outgoing ones, and the group magnitude
    (Torch-Pruning's, incoming and outgoing) keeps them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(8, 6) * torch.tensor([.01] * 4 + [1.0] * 4)[:, None])
        model[3].weight.copy_(torch.randn(3, 8) * torch.tensor([10.0] * 4 + [.01] * 4))
    kept = model[3].weight.detach()[:, :4].clone()
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    neuroexapt.prune_to(model, data, 0.3, by="parameters", score="norm", round_to=None,
                        steps=1, max_fraction=0.5)
    assert model[0].out_features < 8
    torch.testing.assert_close(model[3].weight.detach()[:, :4], kept)  # units 0-3 all kept
