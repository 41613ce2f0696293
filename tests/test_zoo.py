"""Sanity checks for the test zoo, the random-architecture strategies and the assertion helpers."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from helpers.asserts import (
    assert_model_unchanged,
    assert_optimizer_unchanged,
    assert_same_function,
    output_scale,
    snapshot_model,
    snapshot_optimizer,
)
from helpers.random_arch import RandomCase, random_cnns, random_mlps
from helpers.zoo import ZooCase, get_case, list_cases
from hypothesis import given, settings
from torch import fx, nn

BATCH = 4
NUM_CLASSES = {
    "mlp": 5,
    "vgg": 10,
    "resnet": 10,
    "mobilenet": 10,
    "densenet": 10,
    "conv1d": 4,
    "transformer": 5,
}
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)
ADDS = {operator.add, operator.iadd, torch.add}


def _built(case: ZooCase, seed: int = 0) -> nn.Module:
    """Build ``case`` under a fixed seed, in eval mode."""
    torch.manual_seed(seed)
    return case.build().eval()


def _call_order(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of leaf modules in the order the forward pass calls them."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, m in model.named_modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _order_after(model: nn.Module, case: ZooCase, layer: str) -> str:
    """Name of the leaf module the forward pass calls right after ``layer``."""
    order = _call_order(model, case.inputs(BATCH))
    return order[order.index(layer) + 1]


def _reachable(graph: fx.Graph, src: str, dst: str) -> bool:
    """Whether some call of module ``dst`` consumes, transitively, the output of module ``src``."""
    frontier = [n for n in graph.nodes if n.op == "call_module" and n.target == src]
    seen: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.op == "call_module" and user.target == dst:
                return True
            if user not in seen:
                seen.add(user)
                frontier.append(user)
    return False


# ----------------------------------------------------------------------------- zoo


def test_list_cases_matches_expected() -> None:
    assert list_cases() == list(NUM_CLASSES)


def test_get_case_unknown_lists_known() -> None:
    with pytest.raises(KeyError, match="unknown zoo case 'nope'; known cases: mlp, vgg"):
        get_case("nope")


def test_zoo_case_rejects_widen_uniform_outside_widen() -> None:
    case = get_case("mlp")
    with pytest.raises(ValueError, match="widen_uniform_only"):
        ZooCase(**{**case.__dict__, "widen_uniform_only": ("6",)})


@pytest.mark.parametrize("name", list_cases())
def test_forward_shape_and_loss(name: str) -> None:
    case = get_case(name)
    model = _built(case)
    out = model(*case.inputs(BATCH))
    target = case.target(BATCH)
    assert out.shape == (BATCH, NUM_CLASSES[name])
    assert target.shape == (BATCH,) and target.dtype == torch.int64
    assert int(target.min()) >= 0 and int(target.max()) < NUM_CLASSES[name]
    assert torch.isfinite(F.cross_entropy(out, target))


@pytest.mark.parametrize("name", list_cases())
def test_symbolic_trace_matches_model(name: str) -> None:
    case = get_case(name)
    model = _built(case)
    traced = fx.symbolic_trace(model)
    assert_same_function(model, traced, case.inputs(BATCH))


@pytest.mark.parametrize("name", list_cases())
def test_listed_names_exist_with_right_kinds(name: str) -> None:
    case = get_case(name)
    model = _built(case)
    modules = dict(model.named_modules())
    last = _call_order(model, case.inputs(BATCH))[-1]
    for layer in case.widen + case.narrow:
        assert isinstance(modules[layer], PRODUCERS), f"{name}: {layer} is not a producer"
        assert layer != last, f"{name}: {layer} is the output layer"
    for layer in case.deepen:
        assert isinstance(modules[layer], (nn.Conv1d, nn.Conv2d, nn.Linear)), f"{name}: {layer}"
    for block in case.blocks + case.no_shortcut_blocks:
        assert block in modules and list(modules[block].children()), f"{name}: {block}"
    for layer in case.widen_uniform_only:
        following = _order_after(model, case, layer)
        assert isinstance(modules[following], nn.LayerNorm), f"{name}: {layer} -> {following}"


@pytest.mark.parametrize("name", list_cases())
def test_skips_run_in_order_and_connect(name: str) -> None:
    case = get_case(name)
    model = _built(case)
    order = _call_order(model, case.inputs(BATCH))
    graph = fx.symbolic_trace(model).graph
    for src, dst in case.skips:
        assert order.index(src) < order.index(dst), f"{name}: {dst} runs before {src}"
        assert _reachable(graph, src, dst), f"{name}: {dst} input is not downstream of {src}"


@pytest.mark.parametrize("name", list_cases())
def test_blocks_have_shortcut_adds(name: str) -> None:
    case = get_case(name)
    model = _built(case)
    for block in case.blocks + case.no_shortcut_blocks:
        graph = fx.symbolic_trace(model.get_submodule(block)).graph
        has_add = any(n.op == "call_function" and n.target in ADDS for n in graph.nodes)
        assert has_add == (block in case.blocks), f"{name}: {block} residual={has_add}"


@pytest.mark.parametrize("name", list_cases())
def test_small(name: str) -> None:
    model = _built(get_case(name))
    assert sum(p.numel() for p in model.parameters()) < 50_000


@pytest.mark.parametrize("name", list_cases())
def test_deterministic_build_and_data(name: str) -> None:
    case = get_case(name)
    first, second, other = (_built(case, seed) for seed in (3, 3, 4))
    state, same, different = first.state_dict(), second.state_dict(), other.state_dict()
    assert list(state) == list(same)
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert not all(torch.equal(state[k], different[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(case.inputs(2), case.inputs(2), strict=True))
    assert torch.equal(case.target(BATCH), case.target(BATCH))


# ----------------------------------------------------------------------------- random architectures


def _check_random_case(case: RandomCase) -> None:
    """The model runs, traces to the same function, and every listed name is a producer."""
    model = case.model.eval()
    out = model(*case.inputs)
    assert out.ndim == 2 and out.shape[0] == 3, case.description
    assert torch.isfinite(out).all(), case.description
    assert_same_function(model, fx.symbolic_trace(model), case.inputs)
    modules = dict(model.named_modules())
    for layer in case.widen + case.narrow + case.deepen:
        assert isinstance(modules.get(layer), (nn.Conv2d, nn.Linear)), (layer, case.description)
    assert set(case.widen_uniform_only) <= set(case.widen), case.description


@settings(max_examples=20, deadline=None)
@given(random_cnns())
def test_random_cnns_run_and_trace(case: RandomCase) -> None:
    _check_random_case(case)


@settings(max_examples=20, deadline=None)
@given(random_mlps())
def test_random_mlps_run_and_trace(case: RandomCase) -> None:
    _check_random_case(case)
    for layer in case.widen_uniform_only:
        following = f"layers.{int(layer.split('.')[1]) + 1}"
        assert isinstance(case.model.get_submodule(following), nn.LayerNorm), case.description


# ----------------------------------------------------------------------------- assert helpers


def test_output_scale_floor_and_max() -> None:
    assert output_scale(torch.zeros(3)) == 1.0
    assert output_scale((torch.tensor([-5.0, 2.0]), torch.tensor([3.0]))) == 5.0


def test_same_function_accepts_models_and_tensors() -> None:
    model = _built(get_case("mlp"))
    (x,) = get_case("mlp").inputs(BATCH)
    with torch.no_grad():
        y = model(x)
    assert_same_function(model, model, (x,))
    assert_same_function(y, model, x)
    assert_same_function(y, y.clone())


def test_same_function_fails_on_perturbed_output() -> None:
    y = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    scale = output_scale(y)
    assert_same_function(y, y + 0.5e-5 * scale)
    with pytest.raises(AssertionError, match=r"max abs error .* output scale"):
        assert_same_function(y, y + 1e-3 * scale)


def test_same_function_float64_is_tighter() -> None:
    y = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_same_function(y, y + 1e-8, dtype=torch.float32)
    with pytest.raises(AssertionError, match="float64"):
        assert_same_function(y, y + 1e-8)


def test_same_function_tuple_outputs_and_shapes() -> None:
    a, b = torch.ones(2, 3), torch.zeros(4)
    assert_same_function((a, b), (a.clone(), b.clone()))
    perturbed = b.clone()
    perturbed[1] = 0.1
    with pytest.raises(AssertionError, match=r"output 1 differs.*index \(1,\)"):
        assert_same_function((a, b), (a, perturbed))
    with pytest.raises(AssertionError, match="shape differs"):
        assert_same_function(a, torch.ones(2, 4))
    with pytest.raises(AssertionError, match="number of outputs"):
        assert_same_function((a, b), (a,))
    with pytest.raises(AssertionError, match="max abs error inf"):
        assert_same_function(a, torch.full((2, 3), float("nan")))


def test_model_unchanged_detects_each_kind_of_change() -> None:
    model = _built(get_case("vgg"))
    snap = snapshot_model(model)
    assert_model_unchanged(model, snap)
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] += 1e-7
    with pytest.raises(AssertionError, match=r"features\.0\.weight: values changed"):
        assert_model_unchanged(model, snap)

    model = _built(get_case("vgg"))
    snap = snapshot_model(model)
    model.features[1].running_mean.add_(1.0)
    with pytest.raises(AssertionError, match="running_mean"):
        assert_model_unchanged(model, snap)

    model = _built(get_case("vgg"))
    snap = snapshot_model(model)
    model.classifier[0].weight = nn.Parameter(model.classifier[0].weight.detach().clone())
    with pytest.raises(AssertionError, match="Parameter object replaced"):
        assert_model_unchanged(model, snap)

    model = _built(get_case("vgg"))
    snap = snapshot_model(model)
    model.classifier[2] = nn.Linear(32, 11)
    with pytest.raises(AssertionError, match=r"shape \(10, 32\) -> \(11, 32\)"):
        assert_model_unchanged(model, snap)

    model = _built(get_case("vgg"))
    snap = snapshot_model(model)
    model.train()
    with pytest.raises(AssertionError, match="training False -> True"):
        assert_model_unchanged(model, snap)


def _stepped_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    """An MLP and an Adam optimizer with two groups after one step."""
    model = _built(get_case("mlp"))
    opt = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": model[4].parameters(), "lr": 1e-2}],
        lr=1e-3,
    )
    (x,) = get_case("mlp").inputs(BATCH)
    F.cross_entropy(model(x), get_case("mlp").target(BATCH)).backward()
    opt.step()
    return model, opt


def test_optimizer_unchanged_detects_each_kind_of_change() -> None:
    model, opt = _stepped_optimizer()
    snap = snapshot_optimizer(opt)
    assert_optimizer_unchanged(opt, snap)

    opt.param_groups[1]["lr"] = 0.5
    with pytest.raises(AssertionError, match=r"group 1 lr: 0\.01 -> 0\.5"):
        assert_optimizer_unchanged(opt, snap)

    model, opt = _stepped_optimizer()
    snap = snapshot_optimizer(opt)
    opt.state[model[4].weight]["exp_avg"][0, 0] += 1e-9
    with pytest.raises(AssertionError, match=r"state of param\[1\]\[0\] 'exp_avg'"):
        assert_optimizer_unchanged(opt, snap)

    model, opt = _stepped_optimizer()
    snap = snapshot_optimizer(opt)
    opt.param_groups[0]["params"][0] = nn.Parameter(model[0].weight.detach().clone())
    with pytest.raises(AssertionError, match="group 0 params: ids"):
        assert_optimizer_unchanged(opt, snap)

    model, opt = _stepped_optimizer()
    snap = snapshot_optimizer(opt)
    del opt.state[model[0].bias]
    with pytest.raises(AssertionError, match=r"state for param\[0\]\[1\] removed"):
        assert_optimizer_unchanged(opt, snap)
