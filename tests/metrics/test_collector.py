"""``ActivationCollector`` and the streaming accumulators of ``neuroexapt.metrics.stats``."""

from __future__ import annotations

import copy
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.zoo import get_case, list_cases
from torch import nn

from neuroexapt.errors import ConfigError, LayerNotFoundError, NeuroExaptError
from neuroexapt.metrics.collector import ActivationCollector
from neuroexapt.metrics.stats import NonFiniteCount, Reservoir, RunningMoments
from neuroexapt.ops.modules import Chain

# float32 data: each batch's moments are summed in float32, then folded in float64
ATOL, RTOL = 1e-8, 1e-6


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3),
    )


def batches(n: int, *shape: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct per-column mean and unbiased variance in float64."""
    rows = rows.double()
    return rows.mean(0), rows.var(0)


def all_hooks(model: nn.Module) -> list[object]:
    return [h for m in model.modules()
            for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]


# ----------------------------------------------------------------------------- hooks and modes


def test_hooks_removed_after_exit() -> None:
    model = conv_net()
    with ActivationCollector(model) as c:
        assert len(all_hooks(model)) == 3  # root pre-hook + Conv2d + Linear
        out = model(torch.randn(2, 3, 5, 5))
    assert all_hooks(model) == []
    out.sum().backward()  # gradient hooks registered inside the block must not record now
    assert c["0"].grad_batches == 0 and c["0"].batches == 1


def test_hooks_removed_and_mode_restored_when_body_raises() -> None:
    model = conv_net().train()
    model[1].eval()
    with pytest.raises(RuntimeError, match="boom"), ActivationCollector(model):
        model.eval()
        model[1].train()
        raise RuntimeError("boom")
    assert all_hooks(model) == []
    assert [m.training for m in model] == [True, False, True, True, True, True, True]


def test_not_reentrant_and_reusable_with_a_new_block() -> None:
    model = conv_net()
    c = ActivationCollector(model)
    with c:
        with pytest.raises(NeuroExaptError, match="already active"):
            c.__enter__()
        model(torch.randn(2, 3, 5, 5))
    assert all_hooks(model) == []
    with c:
        model(torch.randn(2, 3, 5, 5))
    assert c["6"].batches == 2 and all_hooks(model) == []


def test_outputs_and_gradients_unchanged() -> None:
    model = conv_net().eval()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    ref = twin(x)
    ref.square().sum().backward()
    with ActivationCollector(model, max_positions=5, saturation=0.5):
        out = model(x)
        out.square().sum().backward()
    assert torch.equal(out, ref)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


# ----------------------------------------------------------------------------- sampling


def test_every_records_the_expected_batches() -> None:
    model = nn.Linear(3, 2)
    xs = batches(10, 4, 3)
    c = ActivationCollector(model, every=3, gradients=False)
    with c, torch.no_grad():
        for x in xs:
            model(x)
    assert (c.steps, c.recorded_steps) == (10, 4)
    assert (c[""].calls, c[""].batches) == (10, 4)
    with torch.no_grad():
        mean, var = moments(torch.cat([model(xs[i]) for i in (0, 3, 6, 9)]))
    torch.testing.assert_close(c[""].mean, mean, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(c[""].var, var, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("layer", "shape", "to_rows"),
    [
        (nn.Conv2d(3, 5, 3), (4, 3, 6, 6), lambda y: y.permute(0, 2, 3, 1).reshape(-1, 5)),
        (nn.Conv1d(3, 5, 3), (4, 3, 7), lambda y: y.permute(0, 2, 1).reshape(-1, 5)),
        (nn.Linear(3, 5), (4, 6, 3), lambda y: y.reshape(-1, 5)),  # [N, T, F]: units are F
        (nn.Linear(3, 5), (4, 3), lambda y: y),
    ],
    ids=["conv2d", "conv1d", "linear-3d", "linear"],
)
def test_moments_equal_direct_computation(layer: nn.Module, shape: tuple[int, ...],
                                          to_rows: object) -> None:
    model = nn.Sequential(layer)
    xs = batches(3, *shape)
    c = ActivationCollector(model, ["0"], max_positions=64, saturation=0.3)
    with c, torch.no_grad():
        for x in xs:
            model(x)
    with torch.no_grad():
        rows = torch.cat([to_rows(layer(x)) for x in xs]).double()
    mean, var = moments(rows)
    s = c["0"]
    # the collector accumulates float32 moments: float32 rounding of O(1) values, whatever
    # the weights the parametrisation happened to draw
    torch.testing.assert_close(s.mean, mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.var, var, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.dead_fraction, (rows <= 0).double().mean(0), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(s.saturated_fraction, (rows.abs() >= 0.3).double().mean(0),
                               atol=ATOL, rtol=RTOL)


def test_positions_are_subsampled_to_max_positions() -> None:
    model = nn.Conv2d(2, 3, 1)
    c = ActivationCollector(model, max_positions=5, gradients=False)
    with c, torch.no_grad():
        for x in batches(2, 4, 2, 8, 8):
            model(x)
    assert torch.equal(c[""].activation.count, torch.full((3,), 2 * 4 * 5.0, dtype=torch.float64))
    assert c[""].samples()[0].shape == (8, 3)  # the reservoir pools over all 64 positions


def test_gradient_moments_equal_direct_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
    twin = copy.deepcopy(model)
    xs = batches(3, 5, 2, 4, 4)
    c = ActivationCollector(model, max_positions=100)
    with c:
        for x in xs:
            model(x).square().sum().backward()
    conv_grads, fc_grads = [], []
    for x in xs:
        h = twin[0](x)
        h.retain_grad()
        z = twin[3](twin[2](twin[1](h)))
        z.retain_grad()
        z.square().sum().backward()
        conv_grads.append(h.grad.permute(0, 2, 3, 1).reshape(-1, 3))
        fc_grads.append(z.grad)
    for name, grads in (("0", conv_grads), ("3", fc_grads)):
        mean, var = moments(torch.cat(grads))
        torch.testing.assert_close(c[name].grad_mean, mean, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(c[name].grad_var, var, atol=ATOL, rtol=RTOL)
        assert c[name].grad_batches == 3


# ----------------------------------------------------------------------------- robustness


def test_nan_and_inf_are_counted_and_excluded() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(6, 3)
    x[0, 0], x[1, 1] = torch.nan, torch.inf  # rows 0 and 1 of the output: NaN, +-Inf/NaN
    weight = torch.ones(6, 2)
    weight[5, 1] = torch.nan  # the gradient w.r.t. the output is `weight`
    c = ActivationCollector(model, reservoir=4)
    with c:
        out = model(x)
        (out * weight).sum().backward()
    s = c[""]
    act_nan, act_inf = int(out.isnan().sum()), int(out.isinf().sum())
    assert act_nan + act_inf == 4
    assert (s.nonfinite.nan, s.nonfinite.inf) == (act_nan, act_inf)
    assert (s.grad_nonfinite.nan, s.nan_count) == (1, act_nan + 1)
    assert torch.equal(s.activation.count, torch.tensor([4.0, 4.0], dtype=torch.float64))
    for value in (s.mean, s.var, s.grad_mean, s.grad_var, s.dead_fraction):
        assert torch.isfinite(value).all()
    torch.testing.assert_close(s.mean, out[2:].detach().double().mean(0), atol=ATOL, rtol=RTOL)
    assert s.reservoir.seen == 4  # non-finite samples are not stored


def test_never_ran_layers_are_reported() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Net()
    c = ActivationCollector(model)
    assert c.never_ran() == ["used", "unused"]
    with c:
        model(torch.randn(2, 3))
    assert c.never_ran() == ["unused"]
    with pytest.raises(NeuroExaptError, match="no samples yet"):
        c["unused"].mean  # noqa: B018


def test_reading_before_any_update_raises() -> None:
    c = ActivationCollector(nn.Linear(2, 2))
    with c, torch.no_grad():
        c.model(torch.randn(3, 2))  # no gradient recorded
    with pytest.raises(NeuroExaptError, match="call backward"):
        c[""].grad_mean  # noqa: B018
    for read in (lambda: RunningMoments(3).mean, lambda: Reservoir(4, 2).samples()):
        with pytest.raises(NeuroExaptError, match="no samples yet: run a forward pass"):
            read()


def test_zoo_models_record_every_called_layer() -> None:
    for name in list_cases():
        case = get_case(name)
        model = case.build()
        c = ActivationCollector(model, reservoir=4)
        with c:
            torch.nn.functional.cross_entropy(model(*case.inputs(4)), case.target(4)).backward()
        expected = ["attn.out_proj"] if name == "transformer" else []  # MHA calls F directly
        assert c.never_ran() == expected, name
        for layer in c.layers:
            if layer not in expected:
                assert torch.isfinite(c[layer].mean).all() and c[layer].grad_batches == 1, layer
        assert all_hooks(model) == [], name


# ----------------------------------------------------------------------------- arguments


def test_unknown_layer_name_suggests_close_matches() -> None:
    model = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 3, 1), fc=nn.Linear(3, 2)))
    with pytest.raises(LayerNotFoundError, match=r"no layer 'conv'; did you mean 'conv1'"):
        ActivationCollector(model, ["fc", "conv"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every must be an integer >= 1"),
        ({"every": 1.5}, "every must be an integer"),
        ({"max_positions": 0}, "max_positions must be"),
        ({"reservoir": -1}, "reservoir must be"),
        ({"seed": True}, "seed must be"),
        ({"gradients": "yes"}, "gradients must be True or False"),
        ({"saturation": 0.0}, "saturation must be None or a threshold > 0"),
        ({"layers": []}, "non-empty list of layer names"),
        ({"layers": 3}, "layers must be None"),
        ({"layers": nn.LSTM}, "no module of type LSTM"),
        ({"layers": (int,)}, "nn.Module subclasses"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ActivationCollector(conv_net(), **kwargs)


def test_layer_selection_by_type_name_and_wrapper() -> None:
    assert ActivationCollector(conv_net()).layers == ["0", "6"]
    assert ActivationCollector(conv_net(), nn.BatchNorm2d).layers == ["1"]
    assert ActivationCollector(conv_net(), ["6", "0", "6"]).layers == ["0", "6"]
    wrapped = nn.Sequential(Chain(nn.Linear(2, 3), nn.Identity()))
    c = ActivationCollector(wrapped, ["0"])  # a wrapper means the layer it wraps
    assert c.layers == ["0.0"] and c["0"] is c["0.0"]


def test_targets_must_match_the_batch() -> None:
    model = nn.Linear(2, 2)
    c = ActivationCollector(model)
    with c:
        c.set_targets(torch.zeros(3, dtype=torch.long))
        with pytest.raises(ConfigError, match="3 targets but layer '' has a batch of 5"):
            model(torch.randn(5, 2))
        c.set_targets(torch.zeros(5, dtype=torch.long))
        model(torch.randn(5, 2))
        with pytest.raises(ConfigError, match="give labels for every batch or for none"):
            model(torch.randn(5, 2))
    with pytest.raises(ConfigError, match="targets must be a tensor"):
        c.set_targets([1, 2])


# ----------------------------------------------------------------------------- reservoir


def algorithm_r(items: torch.Tensor, capacity: int, seed: int) -> torch.Tensor:
    """The sequential textbook algorithm, with the same random draws as Reservoir."""
    u = torch.rand(len(items), generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64)
    buf = items[:capacity].clone()
    for t in range(capacity, len(items)):
        j = int(u[t] * (t + 1))
        if j < capacity:
            buf[j] = items[t]
    return buf


def test_reservoir_is_algorithm_r_whatever_the_batching() -> None:
    items = torch.arange(3000.0).unsqueeze(1)
    expected = algorithm_r(items, 100, seed=7)
    for size in (3000, 64, 1):
        r = Reservoir(100, 1, seed=7)
        for chunk in items.split(size):
            r.add(chunk)
        x, y = r.samples()
        assert y is None and r.seen == 3000 and x.shape == (100, 1)
        assert torch.equal(x, expected), size
    assert len(x.unique()) == 100
    assert abs(x.mean().item() - 1500) < 300  # uniform: sd of the mean is about 87
    other = Reservoir(100, 1, seed=8)
    other.add(items)
    assert not torch.equal(other.samples()[0], x)


def test_reservoir_keeps_labels_aligned_with_features() -> None:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.zero_()
    c = ActivationCollector(model, reservoir=16, gradients=False)
    with c, torch.no_grad():
        for labels in torch.arange(80).split(8):
            c.set_targets(labels)
            model(labels.float().unsqueeze(1))
    x, y = c[""].samples()
    assert x.shape == (16, 1) and y.dtype == torch.int64
    assert torch.equal(x[:, 0].long(), y)


def test_reservoir_merge_is_a_uniform_sample_of_the_union() -> None:
    a, b = Reservoir(400, 1, seed=0), Reservoir(400, 1, seed=1)
    a.add(torch.zeros(1000, 1), torch.zeros(1000, dtype=torch.long))
    b.add(torch.ones(3000, 1), torch.ones(3000, dtype=torch.long))
    a.merge(b)
    x, y = a.samples()
    assert (a.seen, len(x)) == (4000, 400) and torch.equal(x[:, 0].long(), y)
    assert abs(y.float().mean().item() - 0.75) < 0.08  # sd about 0.02
    empty = Reservoir(400, 1)
    empty.merge(a)
    assert empty.seen == 4000 and empty.labelled
    with pytest.raises(ConfigError, match="different labels"):
        _unlabelled(400).merge(a)


def _unlabelled(capacity: int) -> Reservoir:
    r = Reservoir(capacity, 1)
    r.add(torch.zeros(3, 1))
    return r


# ----------------------------------------------------------------------------- moments, memory


def test_running_moments_merge_equals_single_pass() -> None:
    data = torch.randn(257, 6, dtype=torch.float64) * 3 + 100
    data[5, 2] = torch.nan
    parts = [RunningMoments(6) for _ in range(3)]
    for part, chunk in zip(parts, (data[:1], data[1:90], data[90:]), strict=True):
        part.update(chunk)
    merged = RunningMoments.from_state(parts[0].state()).merge(parts[1]).merge(parts[2])
    single = RunningMoments(6)
    single.update(data)
    clean = torch.cat([data[:, :2], data[:, 3:]], 1)
    col = data[:, 2][~data[:, 2].isnan()]
    for got in (merged, single):
        assert got.count[2] == 256 and got.count[0] == 257
        torch.testing.assert_close(got.mean[[0, 1, 3, 4, 5]], clean.mean(0), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got.var[[0, 1, 3, 4, 5]], clean.var(0), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got.var[2], col.var(), atol=ATOL, rtol=RTOL)
    assert merged.all_reduce_() is merged  # no-op without torch.distributed


def test_float64_batches_keep_float64_precision() -> None:
    data = torch.randn(300, 4, dtype=torch.float64) * 1e-3 + 1e4  # float32 would lose this
    m = RunningMoments(4)
    m.update(data[:100])
    m.update(data[100:])
    torch.testing.assert_close(m.var, data.var(0), atol=0, rtol=1e-9)


def test_update_fraction_equals_update_on_zeros_and_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 5, generator=gen)
    valid = torch.rand(3, 50, 5, generator=gen) > 0.2
    counted, direct = RunningMoments(5), RunningMoments(5)
    for i in range(3):
        hits = x[i] <= 0
        counted.update_fraction(hits, valid[i] if i else None)  # the first batch all valid
        ones = hits.double()
        direct.update(ones if i == 0 else ones.masked_fill(~valid[i], torch.nan))
    for a, b in ((counted.count, direct.count), (counted.mean, direct.mean),
                 (counted.var, direct.var)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="bool batch"):
        counted.update_fraction(x[0])


def test_memory_does_not_grow_with_batches() -> None:
    model = conv_net()
    c = ActivationCollector(model, reservoir=8, saturation=1.0)
    with c:
        for i, x in enumerate(batches(12, 4, 3, 5, 5)):
            c.set_targets(torch.zeros(4, dtype=torch.long))
            model(x).sum().backward()
            if i == 2:  # the reservoir (8 samples) is full after two batches of 4
                early = c.memory_bytes()
    assert c.memory_bytes() == early
    bound = sum(12 * d * 8 + 8 * d * 4 + 8 * 8 + 2 * 2 * 8 for d in (4, 3))
    assert early == bound


def test_nonfinite_count_merge() -> None:
    a, b = NonFiniteCount(), NonFiniteCount()
    a.update(torch.tensor([torch.nan, 1.0, torch.inf]))
    b.update(torch.tensor([[torch.nan, -torch.inf], [torch.nan, 0.0]]))
    a.merge(b)
    assert (a.nan, a.inf) == (3, 2)


# ----------------------------------------------------------------------------- distributed


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.extra = nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, extra: bool = False) -> torch.Tensor:
        y = self.fc(x)
        return self.extra(y) if extra else y


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        data = torch.randn(100, 5, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
        m = RunningMoments(5)
        m.update(data[:30] if rank == 0 else data[30:])
        m.all_reduce_()
        torch.testing.assert_close(m.mean, data.mean(0), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(m.var, data.var(0), atol=ATOL, rtol=RTOL)

        r = Reservoir(20, 1, seed=3)
        idx = torch.arange(300) if rank == 0 else torch.arange(300, 400)
        r.add(idx.float().unsqueeze(1), (idx >= 300).long())
        r.all_gather_()
        x, y = r.samples()
        assert r.seen == 400 and len(x) == 20 and torch.equal((x[:, 0] >= 300).long(), y)
        everyone = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(everyone, x)
        assert torch.equal(everyone[0], everyone[1])

        model = _Branchy()
        xs = batches(4, 6, 3)
        c = ActivationCollector(model, reservoir=5)
        with c:
            for x in xs[rank::2]:
                model(x, extra=rank == 1).sum().backward()
        c.merge_distributed_()
        with torch.no_grad():
            mean, var = moments(torch.cat([model.fc(x) for x in xs]))
        torch.testing.assert_close(c["fc"].mean, mean, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(c["fc"].var, var, atol=ATOL, rtol=RTOL)
        assert (c["fc"].batches, c["extra"].batches, c.steps) == (4, 2, 4)
        assert c["extra"].units == 2 and c["fc"].reservoir.seen == 24 and c.never_ran() == []
        dist.barrier()  # no rank closes its connections while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_distributed_merge_equals_single_process(tmp_path: Path) -> None:
    """Two gloo ranks: this process (rank 0, no second torch import) and a spawned one."""
    init = str(tmp_path / "init")
    child = mp.get_context("spawn").Process(target=_worker, args=(1, 2, init))
    child.start()
    try:
        _worker(0, 2, init)
    finally:
        child.join(timeout=120)
        if child.is_alive():
            child.terminate()
    assert child.exitcode == 0, "rank 1 failed; see its traceback above"
