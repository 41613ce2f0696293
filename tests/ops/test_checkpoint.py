"""Checkpoints: round trips of edited models and optimizers, safe loading, atomic saving."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers.zoo import ZOO
from torch import nn

import neuroexapt
from neuroexapt import EditRecord
from neuroexapt.errors import CheckpointError
from neuroexapt.ops import checkpoint as checkpoint_module

CASE = ZOO["resnet"]
X = CASE.inputs(4)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, case: Any = CASE) -> None:
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(*case.inputs(4)), case.target(4)).backward()
    opt.step()
    model.eval()


def edited_resnet() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A ResNet trained for a step, edited four ways with its Adam optimizer, trained again."""
    torch.manual_seed(0)
    model = CASE.build()
    opt = adam(model)
    train_step(model, opt)
    neuroexapt.widen(model, "layer1.0.conv1", 3, example_inputs=X, optimizer=opt)
    neuroexapt.deepen(model, "layer2.0.conv2", optimizer=opt)
    neuroexapt.add_skip(model, "layer1.0.conv1", "layer1.0.conv2", optimizer=opt)
    neuroexapt.narrow(model, "stem.0", remove=2, optimizer=opt)
    train_step(model, opt)
    return model, opt


def build_fresh() -> nn.Module:
    torch.manual_seed(123)  # different initial weights: everything must come from the file
    return CASE.build()


def outputs(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*X)


class RoundTrip(NamedTuple):
    model: nn.Module  # the edited original
    opt: torch.optim.Optimizer
    loaded: nn.Module  # rebuilt from the file
    loaded_opt: torch.optim.Optimizer


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory) -> RoundTrip:
    """Save an edited ResNet with Adam and load it back (once: replaying edits takes time)."""
    model, opt = edited_resnet()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    neuroexapt.save(model, path, optimizer=opt)
    loaded, loaded_opt = neuroexapt.load(path, build_fresh, adam)
    assert loaded_opt is not None
    return RoundTrip(model, opt, loaded, loaded_opt)


def test_round_trip_outputs_and_history(round_trip: RoundTrip) -> None:
    model, loaded = round_trip.model, round_trip.loaded
    assert [r.op for r in neuroexapt.get_history(loaded)] == [
        "widen", "deepen", "add_skip", "narrow",
    ]
    assert neuroexapt.get_history(loaded) == neuroexapt.get_history(model)
    assert torch.equal(outputs(loaded), outputs(model))
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_round_trip_restores_adam_state_by_name(round_trip: RoundTrip) -> None:
    model, opt, loaded, new_opt = round_trip
    assert isinstance(new_opt, torch.optim.Adam)
    names = {id(p): n for n, p in model.named_parameters()}
    new_params = dict(loaded.named_parameters())
    assert len(opt.state) == len(new_opt.state) > 0
    for p, state in opt.state.items():
        new_state = new_opt.state[new_params[names[id(p)]]]
        assert state.keys() == new_state.keys()
        for key, value in state.items():
            assert torch.equal(value, new_state[key]), (names[id(p)], key)
    assert new_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_round_trip_trains_identically(round_trip: RoundTrip) -> None:
    """The same next step from the same state gives the same parameters."""
    model, opt = copy.deepcopy((round_trip.model, round_trip.opt))  # keeps opt -> model links
    loaded, new_opt = copy.deepcopy((round_trip.loaded, round_trip.loaded_opt))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt)
    train_step(loaded, new_opt)
    params = dict(model.named_parameters())
    assert params.keys() == dict(loaded.named_parameters()).keys()
    for name, p in loaded.named_parameters():
        assert torch.allclose(p, params[name], atol=1e-6), name
    assert sum(not torch.equal(params[n], before[n]) for n in params) > len(params) // 2


def test_load_without_optimizer_factory(tmp_path: Path) -> None:
    model = ZOO["mlp"].build()
    neuroexapt.widen(model, "4", 2, example_inputs=ZOO["mlp"].inputs(2))
    neuroexapt.save(model, tmp_path / "m.pt", optimizer=adam(model))
    ckpt = neuroexapt.load(tmp_path / "m.pt", ZOO["mlp"].build)
    assert ckpt.optimizer is None and ckpt.model[4].out_features == 26


def test_load_without_saved_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ZOO["mlp"].build().eval()
    neuroexapt.widen(model, "4", 2, example_inputs=ZOO["mlp"].inputs(2))
    path = tmp_path / "m.pt"
    neuroexapt.save(model, path)
    loaded, opt = neuroexapt.load(path, ZOO["mlp"].build, adam)
    assert isinstance(opt, torch.optim.Adam) and not opt.state
    assert loaded[4].out_features == 26


# ----------------------------------------------------------------------------- safe loading


class Payload:
    """Unpickling this runs ``os.mkdir(marker)`` (harmless, but code from the file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def malicious_file(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "evil.pt"
    torch.save({"format": "neuroexapt-checkpoint", "version": 1, "history": [],
                "state_dict": {}, "payload": Payload(marker)}, path)
    return path


def test_malicious_pickle_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = malicious_file(tmp_path, marker)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*evil\.pt"):
        neuroexapt.load(path, CASE.build)
    assert not marker.exists()


def test_malicious_payload_is_live(tmp_path: Path) -> None:
    """Control for the test above: an unsafe load of the same file does run the payload."""
    marker = tmp_path / "pwned"
    torch.load(malicious_file(tmp_path, marker), weights_only=False)
    assert marker.is_dir()


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(CASE.build().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"weights\.pt' is not a NeuroExapt checkpoint"):
        neuroexapt.load(path, CASE.build)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip or a pickle")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*garbage\.pt"):
        neuroexapt.load(garbage, CASE.build)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*missing\.pt"):
        neuroexapt.load(tmp_path / "missing.pt", CASE.build)


def test_unknown_edit_in_history(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    record = {"op": "teleport", "target": "fc", "args": {}, "inputs": [[[2, 3, 16, 16],
              "torch.float32"]], "params_before": 1, "params_after": 1}
    torch.save({"format": "neuroexapt-checkpoint", "version": 1, "history": [record],
                "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"unknown edit 'teleport'"):
        neuroexapt.load(path, CASE.build)


# ----------------------------------------------------------------------------- atomic saving


def test_failed_save_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = ZOO["mlp"].build().eval()
    x = ZOO["mlp"].inputs(2)
    neuroexapt.widen(model, "4", 2, example_inputs=x)
    path = tmp_path / "model.pt"
    neuroexapt.save(model, path)
    expected = outputs_of(model, x)
    neuroexapt.widen(model, "4", 3)  # the model moves on; the next save fails half-way

    def broken_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        neuroexapt.save(model, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left
    loaded = neuroexapt.load(path, ZOO["mlp"].build).model
    assert len(neuroexapt.get_history(loaded)) == 1
    assert loaded[4].out_features == 26
    assert torch.equal(outputs_of(loaded, x), expected)


def outputs_of(model: nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*x)


def test_save_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    model = ZOO["mlp"].build()
    path = tmp_path / "model.pt"
    neuroexapt.save(model, path)
    neuroexapt.widen(model, "4", 1, example_inputs=ZOO["mlp"].inputs(2))
    neuroexapt.save(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert neuroexapt.load(path, ZOO["mlp"].build).model[4].out_features == 25


def test_save_rejects_a_foreign_optimizer(tmp_path: Path) -> None:
    model = ZOO["mlp"].build()
    other = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(CheckpointError, match=r"1 parameters that are not in the model"):
        neuroexapt.save(model, tmp_path / "m.pt", optimizer=other)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- replay


def test_replay_on_a_different_architecture_names_the_edit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ZOO["mlp"].build()
    neuroexapt.widen(model, "4", 2, example_inputs=ZOO["mlp"].inputs(2))
    path = tmp_path / "m.pt"
    neuroexapt.save(model, path)
    with pytest.raises(CheckpointError, match=r"replaying edit 0 \(widen '4'\) on a fresh VGG "
                       r"failed: .*model_factory must build the same architecture"):
        neuroexapt.load(path, ZOO["vgg"].build)


def test_weights_that_do_not_fit_the_rebuilt_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ZOO["mlp"].build()
    neuroexapt.widen(model, "4", 2, example_inputs=ZOO["mlp"].inputs(2))
    path = tmp_path / "m.pt"
    neuroexapt.save(model, path)

    def wider() -> nn.Module:  # same names, hidden layer 4 has 30 units instead of 24
        return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.1),
                             nn.Linear(32, 30), nn.ReLU(), nn.Linear(30, 5))

    with pytest.raises(CheckpointError, match=r"weights in '.*m\.pt' do not fit the rebuilt"):
        neuroexapt.load(path, wider)


# ----------------------------------------------------------------------------- records


def test_edit_record_dict_round_trip() -> None:
    model = ZOO["mlp"].build()
    record = neuroexapt.widen(model, "4", 2, example_inputs=ZOO["mlp"].inputs(2))
    data = record.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain data only
    again = EditRecord.from_dict(json.loads(json.dumps(data)))
    assert again == record
    assert again.to_dict() == data
    assert again.param_map is None
    assert data["op"] == "widen" and data["args"]["by"] == 2
    assert data["inputs"] == [[[2, 16], "torch.float32"]]


def _valid() -> dict[str, Any]:
    return {"op": "widen", "target": "4", "args": {"layer": "4"},
            "inputs": [[[2, 16], "torch.float32"]], "params_before": 1, "params_after": 2}


@pytest.mark.parametrize(
    "data",
    [
        {k: v for k, v in _valid().items() if k != "op"},
        {k: v for k, v in _valid().items() if k != "params_after"},
        {**_valid(), "args": [1, 2]},
        {**_valid(), "args": {"layer": torch.zeros(1)}},
        {**_valid(), "inputs": "abc"},
        {**_valid(), "inputs": [[["x"], "torch.float32"]]},
        {**_valid(), "params_before": "many"},
        None,
        ["op", "widen"],
    ],
    ids=["no-op", "no-params_after", "args-list", "args-tensor", "inputs-str",
         "inputs-shape", "params-str", "none", "list"],
)
def test_from_dict_rejects_malformed_data(data: Any) -> None:
    with pytest.raises(CheckpointError, match=r"malformed edit record"):
        EditRecord.from_dict(data)


def test_restore_resumes_a_wrapped_model_in_place(tmp_path: Path) -> None:
    """``restore(path, model)``: the model is its second argument, unwrapped all the same."""
    torch.manual_seed(0)
    edited = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    neuroexapt.widen(edited, "0", 2, example_inputs=(torch.randn(2, 4),))
    neuroexapt.save(edited, tmp_path / "a.pt")
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert neuroexapt.restore(tmp_path / "a.pt", nn.DataParallel(fresh)) is None
    assert fresh[0].out_features == 10 and torch.equal(fresh[0].weight, edited[0].weight)
    assert neuroexapt.get_history(fresh) == neuroexapt.get_history(edited)
