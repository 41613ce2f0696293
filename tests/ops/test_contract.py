"""The edit contract, checked for every edit on every zoo model.

Each edit (``widen``, ``narrow``, ``deepen``, ``add_skip``, ``remove_block``) is applied to every
layer the zoo lists for it (ids like ``widen-resnet-layer1.0.conv1``), and each test checks one
promise: outputs preserved (eval and train mode, float32 and float64), shapes changed for real,
optimizer state that follows the edit, checkpoint round trips, atomic failure, and an edited
model that is still an ordinary ``nn.Module``.
"""

from __future__ import annotations

import copy
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.asserts import (
    assert_model_unchanged,
    assert_optimizer_unchanged,
    assert_same_function,
    snapshot_model,
    snapshot_optimizer,
)
from helpers.zoo import ZOO, ZooCase
from torch import nn

import neuroexapt as nx
from neuroexapt.errors import FunctionPreservationError, SurgeryError
from neuroexapt.graph import resolve_layer
from neuroexapt.ops.modules import SkipTarget
from neuroexapt.optim import DimMap

BATCH = 4  # batch of the example inputs every edit traces with
LR = {"sgd": 0.01, "adam": 1e-3}  # small enough that 5 steps on a fixed batch lower the loss
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=LR["sgd"], momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=LR["adam"]),
}
SECOND_MOMENTS = {"exp_avg_sq", "max_exp_avg_sq"}  # scaled by scale**2 under a split
PARAM_SIGN = {"widen": 1, "narrow": -1, "deepen": 1, "add_skip": 1, "remove_block": -1}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
EXACT = {"rtol": 1e-6, "atol": 0.0}  # relative only: Adam's second moments are ~1e-8


class InjectedError(RuntimeError):
    """Raised by a monkeypatched step in the middle of an edit."""


# ----------------------------------------------------------------------------- edits


def build(case: ZooCase, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh model of ``case`` under a fixed seed (training mode, as constructed)."""
    torch.manual_seed(0)
    return case.build().to(dtype)


def inputs_of(case: ZooCase, batch: int = BATCH, dtype: torch.dtype = torch.float32) -> tuple:
    """The case's inputs with floating-point tensors cast to ``dtype`` (tokens stay int64)."""
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in case.inputs(batch))


def group_size(model: nn.Module, layer: str, x: tuple) -> int:
    """Number of units ``layer`` produces now."""
    return nx.trace(model, x).group_of(resolve_layer(model, layer)).size


@dataclass(frozen=True)
class Edit:
    """One edit of one zoo case, as the parametrized tests apply it."""

    op: str  # "widen", "narrow", "deepen", "add_skip" or "remove_block"
    case: ZooCase
    target: tuple[str, ...]  # (layer,), or (src, dst) for add_skip
    strategy: str = "split"  # widen only

    @property
    def id(self) -> str:
        """``op-case-target``, with ``-zero`` for zero widening."""
        suffix = "-zero" if self.strategy == "zero" else ""
        return f"{self.op}-{self.case.name}-{'-to-'.join(self.target)}{suffix}"

    def apply(self, model: nn.Module, x: tuple, **kwargs: Any) -> nx.EditRecord:
        """Apply the edit to ``model`` (traced on ``x``); ``kwargs`` go to the edit."""
        layer = self.target[0]
        if self.op == "widen":
            # LayerNorm over the units: only duplicating every unit preserves the function
            uniform = layer in self.case.widen_uniform_only
            by = group_size(model, layer, x) if uniform else 3
            return nx.widen(model, layer, by, example_inputs=x, strategy=self.strategy, **kwargs)
        if self.op == "narrow":
            # a quarter of the units: keeps the transformer's width divisible by its 4 heads
            remove = max(1, group_size(model, layer, x) // 4)
            return nx.narrow(model, layer, remove=remove, example_inputs=x, **kwargs)
        if self.op == "deepen":
            return nx.deepen(model, layer, example_inputs=x, **kwargs)
        if self.op == "add_skip":
            return nx.add_skip(model, *self.target, example_inputs=x, **kwargs)
        return nx.remove_block(model, layer, example_inputs=x, **kwargs)


def edits_of(case: ZooCase, op: str, strategy: str = "split") -> list[Edit]:
    """Every edit ``op`` the zoo lists for ``case``."""
    if op == "add_skip":
        return [Edit(op, case, pair) for pair in case.skips]
    names = {"widen": case.widen, "narrow": case.narrow, "deepen": case.deepen,
             "remove_block": case.blocks}[op]
    return [Edit(op, case, (name,), strategy) for name in names]


def params(edits: list[Edit]) -> list[Any]:
    """``pytest.param`` per edit, with its id."""
    return [pytest.param(e, id=e.id) for e in edits]


ALL = [e for c in ZOO.values() for op in PARAM_SIGN for e in edits_of(c, op)]
WIDEN_ZERO = [
    e for c in ZOO.values() for e in edits_of(c, "widen", "zero")
    if e.target[0] not in c.widen_uniform_only  # fresh units change LayerNorm statistics
]
PRESERVING = [e for e in ALL if e.op in ("widen", "deepen", "add_skip")] + WIDEN_ZERO
GROWING = [e for e in ALL if e.op in ("widen", "deepen", "add_skip")]
UNIFORM_ONLY = [(c, layer) for c in ZOO.values() for layer in c.widen_uniform_only]


# ----------------------------------------------------------------------------- utilities


def outputs(model: nn.Module, x: tuple, seed: int | None = None) -> torch.Tensor:
    """``model(*x)`` without gradients, after ``torch.manual_seed(seed)`` when given."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model(*x)


def loss_of(model: nn.Module, case: ZooCase, x: tuple) -> torch.Tensor:
    """Cross-entropy on the fixed batch; seeded, so dropout draws the same masks every step."""
    torch.manual_seed(0)
    return F.cross_entropy(model(*x), case.target(x[0].shape[0]))


def train(model: nn.Module, opt: torch.optim.Optimizer, case: ZooCase, x: tuple,
          steps: int) -> None:
    """``steps`` optimizer steps on the fixed batch."""
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, case, x).backward()
        opt.step()


def unit_dim(layer: nn.Module) -> int:
    """The weight dimension holding a producer's output units."""
    return 1 if isinstance(layer, nn.Embedding) else 0


def dropout_inputs(model: nn.Module, x: tuple) -> list[tuple[int, ...]]:
    """Input shape of every Dropout call, in eval mode (the model's modes are restored)."""
    shapes: list[tuple[int, ...]] = []
    modes = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
             for m in model.modules() if isinstance(m, nn.Dropout)]
    try:
        outputs(model.eval(), x)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def reindex(t: torch.Tensor, dims: tuple[DimMap, ...], power: int) -> tuple[torch.Tensor, ...]:
    """``t`` re-indexed as the ParamMap documents it, and the mask of entries from old ones."""
    mask = torch.ones_like(t, dtype=torch.bool)
    for dm in dims:
        index = dm.index.long()
        t, mask = (v.index_select(dm.dim, index.clamp(min=0)) for v in (t, mask))
        view = [1] * t.dim()
        view[dm.dim] = -1
        mask = mask & (index >= 0).view(view)
        if dm.scale is not None:
            t = t * dm.scale.to(t.dtype).view(view) ** power
    return t, mask


def state_copy(opt: torch.optim.Optimizer) -> dict[torch.Tensor, dict[str, Any]]:
    """Every parameter's optimizer state, tensors cloned."""
    return {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for p, s in opt.state.items()}


def state_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Optimizer state keyed by parameter name (every parameter, empty when stateless)."""
    return {n: dict(opt.state.get(p, {})) for n, p in model.named_parameters()}


def groups_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyper-parameters, and its parameters as a set of names."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{**g, "params": {names[id(p)] for p in g["params"]}} for g in opt.param_groups]


def assert_same_state(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    """Two name-keyed optimizer states are exactly equal."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key, value in a[name].items():
            other = b[name][key]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"optimizer state {name}.{key} differs"


# ----------------------------------------------------------------------------- 1. outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("edit", params(PRESERVING))
def test_outputs_preserved_in_eval_mode(edit: Edit, dtype: torch.dtype) -> None:
    model = build(edit.case, dtype).eval()
    x, other = inputs_of(edit.case, BATCH, dtype), inputs_of(edit.case, 5, dtype)
    before, other_before = outputs(model, x), outputs(model, other)
    edit.apply(model, x)
    assert_same_function(before, model, x, dtype=dtype)
    assert_same_function(other_before, model, other, dtype=dtype)  # not only the traced batch
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert {t.dtype for t in floats} == {dtype}, "an edit made a tensor of another dtype"


@pytest.mark.parametrize("edit", params(PRESERVING))
def test_outputs_preserved_in_train_mode(edit: Edit) -> None:
    """Same outputs with batch statistics and seeded dropout masks.

    Two modules may legitimately differ in train mode, and are compared in eval mode: a
    Dropout whose input changed width (its mask is drawn over a different number of units,
    so the random streams no longer line up), and a BatchNorm that ``deepen`` inserted (it
    normalises with batch statistics, as the docstring says).
    """
    model = build(edit.case)
    x = inputs_of(edit.case)
    reference = copy.deepcopy(model)
    record = edit.apply(model, x)
    assert model.training and reference.training
    if dropout_inputs(model, x) != dropout_inputs(reference, x):
        for m in [*model.modules(), *reference.modules()]:
            if isinstance(m, nn.Dropout):
                m.eval()
    for name in record.args.get("modules", []):
        if isinstance(model.get_submodule(name), BATCHNORMS):
            model.get_submodule(name).eval()
    assert_same_function(outputs(reference, x, seed=1), outputs(model, x, seed=1))


@pytest.mark.parametrize(("case", "layer"), [
    pytest.param(c, layer, id=f"widen-{c.name}-{layer}-zero") for c, layer in UNIFORM_ONLY
])
def test_widen_zero_refuses_units_under_layernorm(case: ZooCase, layer: str) -> None:
    model = build(case).eval()
    x = inputs_of(case)
    size = group_size(model, layer, x)
    snap = snapshot_model(model)
    with pytest.raises(SurgeryError, match=r"fresh units \(strategy='zero'\) change"):
        nx.widen(model, layer, size, example_inputs=x, strategy="zero")
    assert_model_unchanged(model, snap)
    assert nx.get_history(model) == []


# ----------------------------------------------------------------------------- 2. shapes


@pytest.mark.parametrize("edit", params(ALL))
def test_shapes_change_for_real(edit: Edit) -> None:
    model = build(edit.case).eval()
    x = inputs_of(edit.case)
    count = sum(p.numel() for p in model.parameters())
    old_shape = None
    if edit.op in ("widen", "narrow"):
        old_shape = model.get_submodule(edit.target[0]).weight.shape
    out_shape = outputs(model, x).shape
    record = edit.apply(model, x)
    assert record.params_before == count
    assert record.params_after == sum(p.numel() for p in model.parameters())
    assert (record.params_after - record.params_before) * PARAM_SIGN[edit.op] > 0
    if old_shape is not None:
        layer = model.get_submodule(record.args["layer"])
        dim = unit_dim(layer)
        change = record.args["by"] if edit.op == "widen" else len(record.args["keep"]) - \
            old_shape[dim]
        expected = list(old_shape)
        expected[dim] += change
        assert list(layer.weight.shape) == expected
    for batch in (1, 5):
        assert outputs(model, inputs_of(edit.case, batch)).shape == (batch, *out_shape[1:])


@pytest.mark.parametrize(("case", "block"), [
    pytest.param(c, b, id=f"remove_block-{c.name}-{b}")
    for c in ZOO.values() for b in c.no_shortcut_blocks
])
def test_remove_block_refuses_blocks_without_shortcut(case: ZooCase, block: str) -> None:
    model = build(case).eval()
    x = inputs_of(case)
    snap = snapshot_model(model)
    with pytest.raises(SurgeryError, match=rf"'{block}' ends in '\w+', not in a residual addition"):
        nx.remove_block(model, block, example_inputs=x)
    assert_model_unchanged(model, snap)
    assert nx.get_history(model) == []


# ----------------------------------------------------------------------------- 3. optimizer


def assert_trains_exactly(opt: torch.optim.Optimizer, model: nn.Module) -> None:
    """The optimizer holds each current parameter once, and no state for anything else."""
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    current = {id(p) for p in model.parameters()}
    assert len(held) == len(set(held)), "a parameter appears twice in the optimizer"
    assert set(held) == current, "the optimizer holds stale or misses current parameters"
    assert {id(p) for p in opt.state} <= current, "state left for a parameter that is gone"


def assert_state_follows(opt: torch.optim.Optimizer, record: nx.EditRecord,
                         old: dict[torch.Tensor, dict[str, Any]]) -> None:
    """Each re-indexed parameter and its state match the old ones under the ParamMap."""
    pmap = record.param_map
    assert pmap is not None
    for change in pmap.changed:
        expected, mask = reindex(change.old.detach(), change.dims, 1)
        assert expected.shape == change.new.shape
        torch.testing.assert_close(change.new.detach()[mask], expected[mask], **EXACT)
        if change.old not in old:
            continue
        state = opt.state[change.new]
        assert state.keys() == old[change.old].keys()
        for key, value in state.items():
            before = old[change.old][key]
            if before.dim() == 0:
                assert torch.equal(value, before), key
                continue
            assert value.shape == change.new.shape, key
            want, _ = reindex(before, change.dims, 2 if key in SECOND_MOMENTS else 1)
            torch.testing.assert_close(value[mask], want[mask], **EXACT, msg=key)
            assert not value[~mask].any(), f"fresh units start with non-zero {key}"
    gone = {id(c.old) for c in pmap.changed} | {id(p) for p in pmap.removed}
    for p, s in old.items():
        if id(p) not in gone:  # untouched parameters keep their state as is
            assert_same_state({"p": opt.state[p]}, {"p": s})
    for p, ref in pmap.added:
        assert p not in opt.state
        home = [i for i, g in enumerate(opt.param_groups) if any(q is ref for q in g["params"])]
        assert home and any(q is p for q in opt.param_groups[home[0]]["params"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("edit", params(ALL))
def test_optimizer_state_follows_edit(edit: Edit, name: str) -> None:
    model = build(edit.case)
    x = inputs_of(edit.case)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, edit.case, x, 3)
    old = state_copy(opt)
    producer = None
    if edit.op in ("widen", "narrow"):
        producer = model.get_submodule(edit.target[0])
        old_weight = producer.weight
    record = edit.apply(model, x, optimizer=opt)
    assert_trains_exactly(opt, model)
    assert_state_follows(opt, record, old)
    if producer is not None:  # the producer's surviving units keep their rows of state
        dim = unit_dim(producer)
        new_weight = model.get_submodule(record.args["layer"]).weight
        units = torch.tensor(record.args["keep"] if edit.op == "narrow" else
                             range(old_weight.shape[dim]))
        new_state, old_state = opt.state[new_weight], old[old_weight]
        for key in old_state:
            if old_state[key].dim():
                got = new_state[key].narrow(dim, 0, len(units))
                assert torch.equal(got, old_state[key].index_select(dim, units)), key
    train(model, opt, edit.case, x, 1)  # the edited model trains


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("edit", params(GROWING))
def test_training_continues_after_edit(edit: Edit, name: str) -> None:
    model = build(edit.case)
    x = inputs_of(edit.case)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, edit.case, x, 3)
    edit.apply(model, x, optimizer=opt)
    with torch.no_grad():
        start = loss_of(model, edit.case, x).item()
    train(model, opt, edit.case, x, 5)
    with torch.no_grad():
        end = loss_of(model, edit.case, x).item()
    assert end < start, f"loss went from {start:.5f} to {end:.5f} in 5 steps after the edit"


# ----------------------------------------------------------------------------- 4. checkpoints


def assert_round_trip(model: nn.Module, opt: torch.optim.Optimizer, case: ZooCase,
                      path: Path) -> None:
    """save then load gives the same outputs, history, optimizer state and next step."""
    nx.save(model, path, optimizer=opt)
    loaded, loaded_opt = nx.load(path, case.build, lambda m: OPTIMIZERS["sgd"](m.parameters()))
    assert loaded_opt is not None
    assert type(loaded) is type(model)
    assert nx.get_history(loaded) == nx.get_history(model)
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = inputs_of(case)
    assert torch.equal(outputs(loaded.eval(), x), outputs(model.eval(), x))
    assert_same_state(state_by_name(loaded, loaded_opt), state_by_name(model, opt))
    assert groups_by_name(loaded, loaded_opt) == groups_by_name(model, opt)
    model.train()
    loaded.train()
    train(model, opt, case, x, 1)
    train(loaded, loaded_opt, case, x, 1)
    torch.testing.assert_close(outputs(loaded.eval(), x), outputs(model.eval(), x))


@pytest.mark.parametrize("edit", params(ALL))
def test_checkpoint_round_trip_after_one_edit(edit: Edit, tmp_path: Path) -> None:
    model = build(edit.case)
    x = inputs_of(edit.case)
    opt = OPTIMIZERS["sgd"](model.parameters())
    train(model, opt, edit.case, x, 2)
    edit.apply(model, x, optimizer=opt)
    train(model, opt, edit.case, x, 1)
    assert_round_trip(model, opt, edit.case, tmp_path / "ck.pt")


def sequence_of(case: ZooCase) -> list[Edit]:
    """Four or five different edits, one after the other.

    remove_block comes last, on a block that holds neither end of the skip (remove_block
    refuses to cut a skip connection).
    """
    pairs = [(skip, block) for skip in reversed(case.skips) for block in [*case.blocks, None]
             if block is None or not any(n.startswith(f"{block}.") for n in skip)]
    skip, block = pairs[0]
    seq = [
        Edit("narrow", case, (case.narrow[0],)),
        Edit("widen", case, (case.widen[-1],)),
        Edit("deepen", case, (case.deepen[0],)),
        Edit("add_skip", case, skip),
    ]
    return seq + ([Edit("remove_block", case, (block,))] if block else [])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in ZOO.values()])
def test_checkpoint_round_trip_after_edit_sequence(case: ZooCase, tmp_path: Path) -> None:
    model = build(case)
    x = inputs_of(case)
    opt = OPTIMIZERS["sgd"](model.parameters())
    seq = sequence_of(case)
    for edit in seq:
        train(model, opt, case, x, 1)
        edit.apply(model, x, optimizer=opt)
        assert_trains_exactly(opt, model)
    assert [r.op for r in nx.get_history(model)] == [e.op for e in seq]
    assert_round_trip(model, opt, case, tmp_path / "ck.pt")


# ----------------------------------------------------------------------------- 5. atomicity


def fail_after(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, then raise: the edit fails after its partial work."""

    def failing(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise InjectedError("injected failure")

    return failing


def module(name: str) -> Any:
    """The module ``neuroexapt.ops.<name>`` (``neuroexapt.ops.deepen`` is also a function)."""
    return importlib.import_module(f"neuroexapt.ops.{name}")


def inject(monkeypatch: pytest.MonkeyPatch, op: str, where: str) -> None:
    """Make ``op`` fail after it changed the model ("body") or in optimizer migration."""
    if where == "migrate":
        target: tuple[Any, str] = (module("edit"), "migrate")
    elif op in ("widen", "narrow"):
        target = (module("apply"), "_sync")  # after every tensor was replaced
    elif op == "deepen":
        target = (module("deepen"), "_insert")  # after the Chain was put in place
    elif op == "add_skip":
        target = (SkipTarget, "add_source")  # after both layers were wrapped
    else:
        target = (module("edit"), "edited_outputs")  # after the block was replaced
    monkeypatch.setattr(*target, fail_after(getattr(*target)))


@pytest.mark.parametrize("where", ["body", "migrate"])
@pytest.mark.parametrize("edit", params(ALL))
def test_failed_edit_changes_nothing(edit: Edit, where: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(edit.case)
    x = inputs_of(edit.case)
    opt = OPTIMIZERS["sgd"](model.parameters())
    train(model, opt, edit.case, x, 1)
    Edit("widen", edit.case, (edit.case.widen[-1],)).apply(model, x, optimizer=opt)
    train(model, opt, edit.case, x, 1)
    history, text = nx.get_history(model), repr(model)
    model_snap, opt_snap = snapshot_model(model), snapshot_optimizer(opt)
    with monkeypatch.context() as patch:
        inject(patch, edit.op, where)
        with pytest.raises(InjectedError):
            edit.apply(model, x, optimizer=opt)
    assert_model_unchanged(model, model_snap)
    assert repr(model) == text  # size attributes (in_features, out_channels) restored too
    assert_optimizer_unchanged(opt, opt_snap)
    assert nx.get_history(model) == history
    edit.apply(model, x, optimizer=opt)  # nothing half-done is left in the way
    assert_trains_exactly(opt, model)
    assert len(nx.get_history(model)) == len(history) + 1


@pytest.mark.parametrize("edit", params([e for e in ALL if e.op == "widen"]))
def test_verify_rejects_noisy_widen_atomically(edit: Edit) -> None:
    model = build(edit.case)
    x = inputs_of(edit.case)
    opt = OPTIMIZERS["adam"](model.parameters())
    train(model, opt, edit.case, x, 1)
    model_snap, opt_snap = snapshot_model(model), snapshot_optimizer(opt)
    with pytest.raises(FunctionPreservationError, match=r"changed the model's outputs"):
        edit.apply(model, x, optimizer=opt, noise=0.5, verify=True)
    assert_model_unchanged(model, model_snap)
    assert_optimizer_unchanged(opt, opt_snap)
    assert nx.get_history(model) == []


@pytest.mark.parametrize(("case", "layer"), [
    pytest.param(c, layer, id=f"widen-{c.name}-{layer}") for c, layer in UNIFORM_ONLY
])
def test_verify_rejects_approximate_widen_atomically(case: ZooCase, layer: str) -> None:
    model = build(case).eval()
    x = inputs_of(case)
    snap = snapshot_model(model)
    with pytest.raises(FunctionPreservationError, match=r"max error .* exceeds the tolerance"):
        # 4: a multiple of the transformer's heads, not of the units under LayerNorm
        nx.widen(model, layer, 4, example_inputs=x, allow_approximate=True, verify=True)
    assert_model_unchanged(model, snap)
    assert nx.get_history(model) == []


# ----------------------------------------------------------------------------- 6. plain module


@pytest.mark.parametrize("edit", params(ALL))
def test_edited_model_stays_a_plain_module(edit: Edit) -> None:
    model = build(edit.case, torch.float64)
    cls = type(model)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)  # edits keep each tensor's requires_grad
    model.eval()
    x = inputs_of(edit.case, BATCH, torch.float64)
    record = edit.apply(model, x)
    assert type(model) is cls
    pmap = record.param_map
    assert pmap is not None and not pmap.is_empty()
    for change in pmap.changed:
        assert isinstance(change.new, nn.Parameter) and change.new.is_leaf
        assert change.new.requires_grad == change.old.requires_grad
        assert (change.new.dtype, change.new.device) == (change.old.dtype, change.old.device)
    for p, ref in pmap.added:
        assert isinstance(p, nn.Parameter) and p.is_leaf
        assert ref is None or (p.dtype, p.device) == (ref.dtype, ref.device)
    assert not any(m.training for m in model.modules()), "an edit left a module in train mode"
    nx.trace(model, x)  # tracing leaves fx Proxies in skip sources
    model.train()
    model(*x).sum().backward()  # and training leaves non-leaf activations there
    model.eval()
    assert torch.equal(outputs(copy.deepcopy(model), x), outputs(model, x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    assert type(clone) is cls
    assert nx.get_history(clone) == nx.get_history(model)
    assert torch.equal(outputs(clone, x), outputs(model, x))
