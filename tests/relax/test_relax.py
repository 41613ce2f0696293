"""neuroexapt.relax: choices by continuous relaxation, searched, then discretised (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.asserts import assert_same_function
from torch import nn

import neuroexapt
from neuroexapt.errors import ConfigError
from neuroexapt.relax import (
    DepthChoice,
    OpChoice,
    WidthChoice,
    arch_parameters,
    choices,
    discretize,
    expected_cost,
    kernel_candidates,
    plot_choices,
    relax,
    search,
    weight_parameters,
)


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), Residual(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5))


def _batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen))
            for _ in range(n)]


SPEC = {"2": "candidates", "0": "width", "4": "depth"}


def _relaxed(mode: str = "gumbel") -> tuple[nn.Module, torch.Tensor]:
    model, x = _cnn(), _batches()[0][0]
    spec = {"2": kernel_candidates(model[2], (3, 5)), "0": {"widths": [8, 16]}, "4": "depth"}
    return relax(model, spec, example_inputs=x, mode=mode), x


def test_relax_keeps_the_function_and_builds_each_kind_of_choice() -> None:
    model, x = _cnn(), _batches()[0][0]
    before = model.eval()(x)
    _relaxed()
    relaxed, _ = _relaxed()
    found = choices(relaxed)
    assert isinstance(found["2"], OpChoice) and isinstance(found["4"], DepthChoice)
    assert isinstance(found["0"], WidthChoice) and found["0"].widths == [8, 16]
    # the candidates start from the layer: the 5x5 kernel is the 3x3 one zero-padded, and in
    # evaluation mode (most probable options: the first candidate, the block, all units)
    # the model computes what it did
    assert_same_function(before, relaxed.eval()(x), x)
    five = found["2"].candidates[1].weight.detach()  # type: ignore[union-attr]
    assert torch.equal(five[..., 1:4, 1:4], found["2"].candidates[0].weight.detach())  # type: ignore[union-attr]
    assert five[..., 0, :].abs().sum() == 0
    assert len(list(arch_parameters(relaxed))) == 3
    assert {id(p) for p in arch_parameters(relaxed)}.isdisjoint(
        {id(p) for p in weight_parameters(relaxed)})


@pytest.mark.parametrize("mode", ["softmax", "gumbel", "hard"])
def test_gradients_reach_every_architecture_parameter(mode: str) -> None:
    model, _ = _relaxed(mode)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():  # the candidates start equal: with equal outputs no option is better
        choices(model)["2"].candidates[1].bias.add_(0.1)  # type: ignore[union-attr]
    reached: set[str] = set()
    for x, y in _batches(6):  # a hard sample may skip an option: a few draws
        F.cross_entropy(model(x), y).backward()
        reached |= {n for n, c in choices(model).items()
                    if c.alpha.grad is not None and c.alpha.grad.abs().sum() > 0}
    assert reached == {"0", "2", "4"}


def _conv_task(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    teacher = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(1, 1, 5, 5, generator=gen))
        x = torch.randn(256, 1, 12, 12, generator=gen)
        y = teacher(x)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_picks_the_kernel_that_made_the_target(seed: int) -> None:
    torch.manual_seed(seed)
    data = _conv_task(seed)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False))
    relax(model, {"0": kernel_candidates(model[0], (3, 5))}, example_inputs=data[0][0][:2])
    result = search(model, data, 15, loss_fn=F.mse_loss, lr=0.05, arch_lr=0.05)
    assert result.chosen == {"0": 1}
    assert result.rows[-1]["p/0/1"] > 0.7


def _wide_task(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=gen)
    y = torch.relu(x @ torch.randn(8, 64, generator=gen)) @ torch.randn(64, 1, generator=gen)
    return [(x[i : i + 32], y[i : i + 32] / 8) for i in range(0, 512, 32)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_task_that_needs_width_keeps_it_and_a_budget_takes_it_away(seed: int) -> None:
    data = _wide_task(seed)
    picked = {}
    for penalty in (0.0, 2.0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
        relax(model, {"0": {"widths": [4, 64]}}, example_inputs=data[0][0][:2])
        picked[penalty] = search(model, data, 20, loss_fn=F.mse_loss, lr=0.05, arch_lr=0.05,
                                 penalty=penalty).chosen["0"]
        assert float(expected_cost(model).detach()) > 0
    assert picked == {0.0: 1, 2.0: 0}


@pytest.mark.parametrize("chosen", [(0, 0, 0), (1, 1, 1), (1, 0, 1), (0, 1, 0)])
def test_discretize_equals_the_relaxed_model_with_hard_choices(chosen: tuple[int, ...],
                                                               tmp_path: Path) -> None:
    model, x = _relaxed()
    found = choices(model)
    with torch.no_grad():
        for name, k in zip(("2", "0", "4"), chosen, strict=True):
            found[name].alpha.zero_()
            found[name].alpha[k] = 3.0
    opt = torch.optim.SGD(weight_parameters(model), lr=0.1, momentum=0.9)
    for xb, yb in _batches(2):  # some optimizer state to migrate
        model.train()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    hard = model.eval()(x)
    discretize(model, optimizer=opt)
    assert_same_function(hard, model(x), x)
    assert not choices(model) and not any(
        isinstance(m, OpChoice | DepthChoice | WidthChoice) for m in model.modules())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert not model._forward_pre_hooks
    assert model[0].out_channels == (16 if chosen[1] else 8)
    assert model[2].kernel_size == ((5, 5) if chosen[0] else (3, 3))
    assert isinstance(model[4], Residual if chosen[2] else nn.Identity)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}  # nothing stale
    model.train()
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()
    # the checkpoint rebuilds the chosen layers on a fresh model
    neuroexapt.save(model, tmp_path / "m.pt")
    loaded, _ = neuroexapt.load(tmp_path / "m.pt", _cnn)
    assert_same_function(model.eval()(x), loaded.eval()(x), x)


def test_search_logs_every_option_and_plots(tmp_path: Path) -> None:
    model, _ = _relaxed()
    result = search(model, _batches(4), 2, log_dir=tmp_path, penalty=0.1, cost="macs")
    assert len(result.rows) == 2 and result.seconds > 0
    assert {"p/2/0", "p/2/1", "p/0/0", "p/0/1", "p/4/0", "p/4/1"} <= result.rows[0].keys()
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 2
    assert plot_choices(result, tmp_path / "choices.png").stat().st_size > 0


def test_bad_specs_are_config_errors_and_change_nothing() -> None:
    model, x = _cnn(), _batches()[0][0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [
        ({"9": "width"}, "9"),
        ({"2": []}, "empty"),
        ({"2": [nn.Conv2d(16, 8, 3, padding=1)]}, "outputs"),
        ({"2": [nn.Conv2d(16, 16, 3)]}, "outputs"),
        ({"2": [nn.Linear(16, 16)]}, "fails on the layer's input"),
        ({"2": "widest"}, "candidate modules, 'width' or 'depth'"),
        ({"2": ["conv"]}, "not an nn.Module"),
        ({"0": {"widths": [0, 16]}}, "widths"),
        ({"7": "width"}, "not possible"),  # the output layer
        ({"0": "depth"}, "input's shape"),
        ({}, "non-empty"),
    ]
    for spec, match in bad:
        with pytest.raises(ConfigError, match=match):
            relax(model, spec, example_inputs=x)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert not choices(model) and not model._forward_pre_hooks
    with pytest.raises(ConfigError, match="no relaxed choice"):
        discretize(model, example_inputs=x)
    with pytest.raises(ConfigError, match="mode"):
        relax(model, {"0": "width"}, example_inputs=x, mode="annealed")


def test_a_width_read_through_layernorm_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    with pytest.raises(ConfigError, match=r"not possible.*combine"):
        relax(model, {"0": "width"}, example_inputs=torch.randn(2, 4))


def test_the_trainer_searches_discretises_and_trains_on(tmp_path: Path) -> None:
    from neuroexapt.train.digits import DigitsCNN, accuracy, load_digits

    x_tr, y_tr, x_te, y_te = load_digits(0)
    train = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, len(y_tr), 64)]
    val = [(x_te[i : i + 128], y_te[i : i + 128]) for i in range(0, len(y_te), 128)]
    torch.manual_seed(0)
    ne = neuroexapt.NeuroExapt(task_type="classification")
    model = ne.wrap_model(DigitsCNN(width=16))
    ne.relax({"features.3": kernel_candidates(model.features[3], (3, 5)),
              "classifier.0": {"widths": [8, 16, 32]}}, example_inputs=x_tr[:4])
    with pytest.raises(ConfigError, match="search_epochs"):
        neuroexapt.Trainer(model=model, progress=False)  # choices need a search
    with pytest.raises(ConfigError, match="unknown search option"):
        neuroexapt.Trainer(model=model, search_epochs=1, search={"lr": 1.0}, progress=False)
    trainer = neuroexapt.Trainer(model=model, lr=3e-3, progress=False, search_epochs=3,
                                 search={"arch_lr": 0.01}, checkpoint_dir=str(tmp_path))
    history = trainer.fit(train, val, epochs=2)
    assert not choices(model) and not model._forward_pre_hooks
    assert len(trainer.search_result.rows) == 3 and len(history["val_metric"]) == 2
    assert (tmp_path / "search" / "history.jsonl").exists()
    assert model.features[3].kernel_size in ((3, 3), (5, 5))
    assert model.classifier[0].out_features in (8, 16, 32)
    assert {op.op for op in neuroexapt.get_history(model)} >= (
        {"choose"} if model.features[3].kernel_size == (5, 5) else set())
    assert accuracy(model, x_te, y_te) > 0.8


def test_search_epochs_without_choices_is_refused() -> None:
    with pytest.raises(ConfigError, match="relaxed choices"):
        neuroexapt.Trainer(model=_cnn(), search_epochs=2, progress=False)


def test_the_guide_quick_start_runs_and_prints_what_it_shows() -> None:
    import contextlib
    import io

    guide = Path(__file__).resolve().parents[2] / "docs" / "api" / "relax.md"
    body = guide.read_text().split("## Quick start\n", 1)[1]
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    shown = body.split("```text\n", 1)[1].split("```", 1)[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(guide), "exec"), {"__name__": "guide"})
    assert out.getvalue() == shown


def test_edits_refuse_a_relaxed_model_until_it_is_discretised() -> None:
    model, x = _relaxed()
    with pytest.raises(neuroexapt.errors.TraceError, match="discretize it first"):
        neuroexapt.narrow(model, "2", remove=[0], example_inputs=x)
    with pytest.raises(ConfigError, match="already has choices"):
        relax(model, {"0": "width"}, example_inputs=x)
    discretize(model)
    neuroexapt.narrow(model, "2", remove=[0], example_inputs=x)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))
        self.o, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.embed(x)
        q, k, v = (f(h).view(b, s, -1, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(self.o(att.transpose(1, 2).reshape(b, s, -1)).mean(1))


def test_a_width_choice_over_attention_heads_keeps_whole_heads() -> None:
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(2, 5, 6)
    with pytest.raises(ConfigError, match="multiples of 4"):
        relax(model, {"q": {"widths": [6, 16]}}, example_inputs=x)
    relax(model, {"q": "width"}, example_inputs=x)
    choice = choices(model)["q"]
    assert isinstance(choice, WidthChoice) and all(w % 4 == 0 for w in choice.widths)
    with torch.no_grad():
        choice.alpha.zero_()
        choice.alpha[0] = 3.0  # the narrowest: whole heads kept
    hard = model.eval()(x)
    discretize(model)
    assert model.q.out_features == model.k.out_features == model.v.out_features == \
        choice.widths[0]
    assert_same_function(hard, model(x), x)


def test_a_weight_with_its_own_parametrization_is_left_alone() -> None:
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.abs()

    model, x = _cnn(), _batches()[0][0]
    parametrize.register_parametrization(model[7], "weight", Positive())
    relax(model, {"2": kernel_candidates(model[2], (3, 5))}, example_inputs=x)
    discretize(model)
    assert parametrize.is_parametrized(model[7], "weight")  # the user's own stays
    with pytest.raises(ConfigError, match="already parametrized"):
        relax(model, {"4.conv": "width"}, example_inputs=x)
