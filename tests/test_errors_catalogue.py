"""The bad-input catalogue of docs/errors.md: each row's input gets the error the page names,
with a message that names the problem and the fix, and nothing changed (issue 15)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import neuroexapt
import neuroexapt.core
from neuroexapt import errors
from neuroexapt.core import DNMFramework
from neuroexapt.train.digits import DigitsCNN

X = torch.randn(2, 1, 8, 8)
Y = torch.tensor([0, 1])
PAGE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def _saved(tmp: Path) -> Path:
    model = DigitsCNN()
    neuroexapt.widen(model, "features.0", 2, example_inputs=X)
    neuroexapt.save(model, tmp / "ok.pt")
    return tmp / "ok.pt"


def _facade(call: Callable[[neuroexapt.NeuroExapt], Any]) -> Callable[[nn.Module, Path], Any]:
    def run(model: nn.Module, tmp: Path) -> Any:
        ne = neuroexapt.NeuroExapt()
        ne.wrap_model(model)
        return call(ne)
    return run


def _file(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _cli(text: str) -> Callable[[nn.Module, Path], Any]:
    def run(model: nn.Module, tmp: Path) -> Any:
        from neuroexapt.cli.train import train_command

        (tmp / "run.yaml").write_text(text.replace("RUN", str(tmp / "run")))
        return train_command(str(tmp / "run.yaml"), None, progress=False)
    return run


# (row, call(model, tmp), error type, the words the message must hold)
ROWS: list[tuple[str, Callable[[nn.Module, Path], Any], type[Exception], str]] = [
    ("a layer that does not exist",
     lambda m, t: neuroexapt.widen(m, "features.9", 2, example_inputs=X),
     errors.LayerNotFoundError, r"no layer 'features.9'; did you mean"),
    ("the model's output layer",
     lambda m, t: neuroexapt.widen(m, "classifier.2", 2, example_inputs=X),
     errors.SurgeryError, r"model's output.*edit an inner layer"),
    ("widen by 0", lambda m, t: neuroexapt.widen(m, "features.0", 0, example_inputs=X),
     errors.ConfigError, r"by must be a positive int"),
    ("narrow to nothing",
     lambda m, t: neuroexapt.narrow(m, "features.0", keep=[], example_inputs=X),
     errors.SurgeryError, r"would remove all 8 units"),
    ("units out of range",
     lambda m, t: neuroexapt.narrow(m, "features.0", remove=[99], example_inputs=X),
     errors.ConfigError, r"unit 99, outside 0..7"),
    ("no example inputs", lambda m, t: neuroexapt.widen(m, "features.0", 2),
     errors.ConfigError, r"needs example_inputs="),
    ("example inputs the model does not accept",
     lambda m, t: neuroexapt.widen(m, "features.0", 2, example_inputs=torch.randn(2, 3, 8, 8)),
     errors.TraceError, r"failed before any change.*Pass inputs the model accepts|failed before"),
    ("an unknown widening strategy",
     lambda m, t: neuroexapt.widen(m, "features.0", 2, example_inputs=X, strategy="copy"),
     errors.ConfigError, r"strategy must be 'split' or 'zero'"),
    ("an optimizer that is not one",
     lambda m, t: neuroexapt.widen(m, "features.0", 2, example_inputs=X, optimizer="sgd"),
     errors.ConfigError, r"optimizer= must be a torch.optim.Optimizer"),
    ("a mistyped DNM configuration key",
     lambda m, t: DNMFramework(m, {"morphogenesis_intervall": 2}),
     errors.ConfigError, r"morphogenesis_intervall.*morphogenesis_interval"),
    ("a DNM configuration value out of range",
     lambda m, t: DNMFramework(m, {"morphogenesis_interval": 0}),
     errors.ConfigError, r"morphogenesis_interval"),
    ("an unknown task type", lambda m, t: neuroexapt.NeuroExapt(task_type="ranking"),
     errors.ConfigError, r"unknown task_type 'ranking'; valid"),
    ("a criteria string that tries to call or import",
     _facade(lambda ne: ne.prune_layers("__import__('os').system('x') < 1")),
     errors.ConfigError, r"criteria"),
    ("a criteria string over an unknown metric", _facade(lambda ne: ne.prune_layers("entropi<0.2")),
     errors.ConfigError, r"entropi"),
    ("prune_layers before any data", _facade(lambda ne: ne.prune_layers("entropy<0.2")),
     errors.ConfigError, r"nothing measured yet.*ne.measure"),
    ("a corrupt checkpoint", lambda m, t: neuroexapt.load(_file(t, "bad.pt", b"junk"), DigitsCNN),
     errors.CheckpointError, r"cannot read checkpoint"),
    ("a truncated checkpoint",
     lambda m, t: neuroexapt.load(_file(t, "cut.pt", _saved(t).read_bytes()[:200]), DigitsCNN),
     errors.CheckpointError, r"cannot read checkpoint"),
    ("a foreign checkpoint",
     lambda m, t: (torch.save({"a": 1}, t / "f.pt"), neuroexapt.load(t / "f.pt", DigitsCNN)),
     errors.CheckpointError, r"not a NeuroExapt checkpoint"),
    ("a missing checkpoint", lambda m, t: neuroexapt.load(t / "none.pt", DigitsCNN),
     errors.CheckpointError, r"cannot read checkpoint"),
    ("a model_factory that builds another architecture",
     lambda m, t: neuroexapt.load(_saved(t), lambda: nn.Linear(2, 2)),
     errors.CheckpointError, r"model_factory must build the same architecture"),
    ("prune_to with an amount outside (0, 1)",
     lambda m, t: neuroexapt.prune_to(m, [(X, Y)], 1.5),
     errors.ConfigError, r"amount must be a share in \(0, 1\)"),
    ("prune_to with no data", lambda m, t: neuroexapt.prune_to(m, [], 0.3),
     errors.AnalysisError, r"got no batch"),
    ("round_to larger than every layer",
     lambda m, t: neuroexapt.prune_to(m, [(X, Y)], 0.3, round_to=1000),
     errors.ConfigError, r"round_to=1000 is larger than every prunable layer"),
    ("an empty validation loader",
     lambda m, t: neuroexapt.Trainer(model=m, progress=False).fit([(X, Y)], [], epochs=1),
     errors.AnalysisError, r"val_loader yielded no batch"),
    ("fit for 0 epochs", lambda m, t: neuroexapt.Trainer(model=m, progress=False).fit(
        [(X, Y)], [(X, Y)], epochs=0), errors.ConfigError, r"epochs must be a positive int"),
    ("a NaN loss", lambda m, t: neuroexapt.Trainer(model=m, progress=False, lr=1.0).fit(
        [(X * float("nan"), Y)], [(X, Y)], epochs=1),
     errors.AnalysisError, r"NaN or infinite; lower the learning rate"),
    ("an empty loader to analyze", lambda m, t: neuroexapt.analyze(m, []),
     errors.AnalysisError, r"yielded no batch"),
    ("a relaxed choice with a candidate of another shape",
     lambda m, t: neuroexapt.relax.relax(m, {"features.3": [nn.Conv2d(8, 4, 3, padding=1)]},
                                         example_inputs=X),
     errors.ConfigError, r"candidate 0 of 'features.3'.*outputs"),
    ("search_epochs without relaxed choices",
     lambda m, t: neuroexapt.Trainer(model=m, search_epochs=2, progress=False),
     errors.ConfigError, r"search_epochs needs a model with relaxed choices"),
    ("a mistyped key in a run configuration",
     _cli("model: digits_cnn\ntrain:\n  lerning_rate: 0.1\nrun_dir: RUN\n"),
     errors.ConfigError, r"line 3: unknown key 'train.lerning_rate'"),
    ("an unknown model in a run configuration", _cli("model: no_such_net\nrun_dir: RUN\n"),
     errors.ConfigError, r"unknown model 'no_such_net'"),
    ("an unwritable run folder", _cli("model: digits_cnn\nrun_dir: /proc/neuroexapt-run\n"),
     errors.ConfigError, r"cannot write the run folder"),
    ("a DistributedDataParallel model passed to an edit",
     lambda m, t: neuroexapt.widen(_fake_ddp(m), "features.0", 2, example_inputs=X),
     errors.ConfigError, r"DistributedDataParallel.*edit.*module"),
    ("a torch.compile(fullgraph=True) model given to DNMFramework",
     lambda m, t: neuroexapt.core.DNMFramework(torch.compile(m, fullgraph=True)),
     errors.ConfigError, r"fullgraph=True\) cannot trace.*compile with fullgraph=False"),
    ("resuming a Trainer run that already trained its epochs",
     lambda m, t: (neuroexapt.Trainer(model=DigitsCNN(), checkpoint_dir=str(t),
                                      progress=False).fit([(X, Y)], [(X, Y)], epochs=1),
                   neuroexapt.Trainer(model=m, checkpoint_dir=str(t), progress=False).fit(
                       [(X, Y)], [(X, Y)], epochs=1, resume=True)),
     errors.ConfigError, r"already trained 1 epochs; pass epochs > 1"),
    ("resuming from a checkpoint without a Trainer's state",
     lambda m, t: neuroexapt.Trainer(model=m, progress=False).fit(
         [(X, Y)], [(X, Y)], epochs=1, resume=_saved(t)),
     errors.CheckpointError, r"not a Trainer's resume.pt"),
]


def _fake_ddp(model: nn.Module) -> nn.Module:
    class Fake(nn.parallel.DistributedDataParallel):
        def __init__(self, module: nn.Module) -> None:  # no process group needed
            nn.Module.__init__(self)
            self.module = module

    return Fake(model)


@pytest.mark.parametrize(("row", "call", "error", "words"), ROWS, ids=[r[0] for r in ROWS])
def test_each_bad_input_gets_its_error_and_changes_nothing(
        row: str, call: Callable[[nn.Module, Path], Any], error: type[Exception], words: str,
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DigitsCNN()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        call(model, tmp_path)
    assert isinstance(info.value, errors.NeuroExaptError)
    assert re.search(words, str(info.value), re.S), str(info.value)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in state.items()}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) or \
        row in ("a NaN loss",)  # training steps before the NaN batch change the weights
    assert neuroexapt.get_history(model) == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), \
        "hooks were left on the model"


def test_the_page_lists_every_row() -> None:
    page = PAGE.read_text()
    missing = [row for row, *_ in ROWS if f"| {row} |" not in page]
    assert not missing, missing
    assert len(ROWS) >= 30
